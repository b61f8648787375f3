#!/usr/bin/env python
"""CD-T against path patching for the same question, one IOI pair, SmolLM2-135M (fp32, CPU).

The question: how much does each of the 270 heads contribute to the logit difference
logit(" Mary") - logit(" John") at the final position of
"When Mary and John went to the store, John gave a drink to"?

Contestants, in one process, on the same token ids:
- path patching to the logits (`path_patching(..., "each", "logits")`), the baseline P11 compares with:
  every head corrupted in turn (ABC prompt), all other heads frozen; the default reuses the clean
  prefix's KV cache, so only the final token is recomputed per head;
- the same with `reuse_prefix=False`: every patched run covers the whole prompt, like CD-T's;
- CD-T (`cdt_head_contributions`), forward only, no corrupted prompt: each head as the source, the heads
  of one layer batched, each layer's batch run from that layer up (`stabilise=True`, the default);
- CD-T over the last ten layers only (what the chapter runs);
- circuit discovery, the question P11's speed claim is about: the k=3 heads that matter most for the logit
  difference, then for each of them the k heads that matter most to it, to depth 2 and 3. CD-T answers every
  level from its one sweep (`cd_t_circuit`: each source's part of every later head's direct effect is read on
  the way); path patching needs a sweep per receiver (senders -> logits, then senders -> each chosen head
  via its q/k/v at the final position, all senders upstream of it), as the IOI paper's iterative search does.

Printed: best wall time of `--repeats` calls (each after waiting for a quiet machine), the ratio to
path patching, and how the two rankings agree (top-10 overlap by signed score, Pearson) over the heads
both cover. Writes bench/results/bench_cdt.json.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_cdt.py [--repeats 3] [--threads 1]"""
import argparse, json, pathlib, sys, time
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_cache import Quiet, versions, log

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Alice and Bob went to the store, Charlie gave a drink to"

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from headscope.models import load_model
    from headscope.causal.cdt import cdt_head_contributions, cd_t_circuit
    from headscope.causal.paths import path_patching
    from headscope.causal.metrics import agreement
    from headscope.tokens import single_token_id
    m = load_model()
    tok = m.tokenizer
    mary, john = single_token_id(tok, " Mary"), single_token_id(tok, " John")
    ld = lambda lg: lg[:, mary] - lg[:, john]
    late = list(range(20, 30))
    runs = {
        "path patching (prefix KV)": lambda: path_patching(m, CLEAN, CORRUPT, ld, "each", "logits", progress=False),
        "path patching (full prompt)": lambda: path_patching(m, CLEAN, CORRUPT, ld, "each", "logits", reuse_prefix=False, progress=False),
        "CD-T, 270 heads": lambda: cdt_head_contributions(m, CLEAN, " Mary", " John", progress=False),
        "CD-T, layers 20-29": lambda: cdt_head_contributions(m, CLEAN, " Mary", " John", layers=late, progress=False),
    }
    def pp_circuit(k, depth, layers=None):
        "The iterative path-patching search with CD-T's `circuit` rule: the k best senders of each receiver, level by level"
        first = path_patching(m, CLEAN, CORRUPT, ld, "each", "logits", layers=layers, progress=False)
        edges, frontier = [(t.name, "logits", t.score) for t in first.top(k)], [t.name for t in first.top(k)]
        seen, lo = set(frontier), min(layers) if layers else 0
        for _ in range(depth - 1):
            new = []
            for r in frontier:
                up = [l for l in (layers or range(30)) if l < int(r[1:r.index("H")])]
                if not up: continue                                   # nothing upstream within the layers searched
                res = path_patching(m, CLEAN, CORRUPT, ld, "each", [r], via="qkv", pos=-1, layers=up, progress=False)
                new += [(t.name, r, t.score) for t in res.top(k)]
            edges += new
            frontier = [s for s in dict.fromkeys(s for s, _, _ in new) if s not in seen]
            seen |= set(frontier)
        return edges
    SCOPES = {"all": None, "20-29": late}
    for scope, ls in SCOPES.items():
        for k, depth in ((3, 2), (3, 3)):
            runs[f"path patching circuit {scope} k={k} depth={depth}"] = lambda k=k, depth=depth, ls=ls: pp_circuit(k, depth, ls)
            runs[f"CD-T circuit {scope} k={k} depth={depth}"] = lambda k=k, depth=depth, ls=ls: cd_t_circuit(m, CLEAN, " Mary", " John", k=k, depth=depth, layers=ls, progress=False)
    quiet, best, res = Quiet(120.0), {}, {}
    for name, fn in runs.items():
        fn()                                            # warm-up
        ts = []
        for _ in range(args.repeats):
            quiet(); t0 = time.perf_counter(); res[name] = fn(); ts.append(time.perf_counter() - t0)
        best[name] = min(ts)
    base = best["path patching (prefix KV)"]
    log(f"{'contestant':32s} {'best s':>8s} {'/ path patching':>16s}")
    for name, t in best.items(): log(f"{name:32s} {t:8.2f} {t / base:16.2f}")
    pp, cd, cd_late = res["path patching (prefix KV)"], res["CD-T, 270 heads"], res["CD-T, layers 20-29"]
    agree_all = agreement(cd, pp)
    agree_late = agreement(cd_late, pp.scores[20:30])
    log(f"CD-T vs path patching, all 270 heads: {agree_all}")
    log(f"CD-T vs path patching, layers 20-29 (chance top-10 overlap 100/90 = 1.1 heads): {agree_late}")
    log(f"top-10 CD-T (all): {[t.name for t in cd.top(10)]}")
    log(f"top-10 CD-T (20-29): {[t.name for t in cd_late.top(10)]}")
    log(f"top-10 path patching: {[t.name for t in pp.top(10)]}")
    circuits = {}
    for scope in SCOPES:
        for k, depth in ((3, 2), (3, 3)):
            a, b = f"CD-T circuit {scope} k={k} depth={depth}", f"path patching circuit {scope} k={k} depth={depth}"
            ce, pe = res[a].edges, res[b]
            nodes = lambda es: {n for e in es for n in e[:2] if n != "logits"}
            circuits[f"{scope} k={k} depth={depth}"] = dict(speedup=best[b] / best[a], cdt_nodes=sorted(nodes(ce)), pp_nodes=sorted(nodes(pe)),
                                                           shared_nodes=sorted(nodes(ce) & nodes(pe)))
            log(f"circuit, heads of layers {scope}, k={k} depth={depth}: CD-T {best[a]:.2f} s vs path patching {best[b]:.2f} s "
                f"({best[b] / best[a]:.2f}x); heads CD-T {len(nodes(ce))}, path patching {len(nodes(pe))}, shared {sorted(nodes(ce) & nodes(pe))}")
    out = dict(versions=versions(), threads=args.threads, repeats=args.repeats, quiet_calls=quiet.quiet, calls=quiet.calls,
               best_s=best, ratio_to_path_patching={k: v / base for k, v in best.items()},
               circuits=circuits, agreement_all=agree_all, agreement_layers_20_29=agree_late,
               top10=dict(cdt_all=[t.name for t in cd.top(10)], cdt_late=[t.name for t in cd_late.top(10)], path_patching=[t.name for t in pp.top(10)]))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "bench_cdt.json").write_text(json.dumps(out, indent=1))
    log(f"wrote {HERE / 'results' / 'bench_cdt.json'}")

if __name__ == "__main__": main()
