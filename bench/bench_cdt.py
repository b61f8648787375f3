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
- CD-T over the last ten layers only (what the chapter runs).

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
    from headscope.causal.cdt import cdt_head_contributions
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
    out = dict(versions=versions(), threads=args.threads, repeats=args.repeats, quiet_calls=quiet.quiet, calls=quiet.calls,
               best_s=best, ratio_to_path_patching={k: v / base for k, v in best.items()},
               agreement_all=agree_all, agreement_layers_20_29=agree_late,
               top10=dict(cdt_all=[t.name for t in cd.top(10)], cdt_late=[t.name for t in cd_late.top(10)], path_patching=[t.name for t in pp.top(10)]))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "bench_cdt.json").write_text(json.dumps(out, indent=1))
    log(f"wrote {HERE / 'results' / 'bench_cdt.json'}")

if __name__ == "__main__": main()
