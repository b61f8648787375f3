#!/usr/bin/env python
"""Head detection, side by side: headscope's pattern scores against TransformerLens' head detector.

Both read SmolLM2-135M-Instruct (fp32, CPU, 2 threads) on the same token ids: `text_tokens(tok, 8, 128)`
for previous-token scores and `repeated_tokens(tok, 8, 32)` (`[BOS] r_1..r_32 r_1..r_32`) for duplicate
and induction scores, the defaults of `pattern_scores`; every sequence starts with the BOS
`<|im_start|>` (id 1), which is also what TransformerLens' `to_tokens` prepends to a string.

- headscope: `pattern_scores(load_model(), text, repeated)`, all 11 scores, from queries and keys
  in tiles (never the pattern), on the SDPA model.
- TransformerLens 4.3: `transformer_lens.head_detector.detect_head(bridge, seqs, name)` for
  "previous_token_head", "duplicate_token_head" and "induction_head", on
  `TransformerBridge.boot_transformers(<the HF folder of bench_cache.py>)` (eager attention).
  `detect_head` only tokenizes strings (`model.to_tokens(seq)`); to hand it the same ids, it gets a
  proxy whose `to_tokens` returns the stored ids of a key, with `cfg` and `run_with_cache` the bridge's.
  Everything else (detection patterns, caching, scoring) is TransformerLens' own code.

Printed: per score, Pearson and Spearman correlation and max |difference| of the two [layer head]
maps as each library defines the score; then headscope's own streaming statistics (`attention_stats`
through `hooks(observe=...)`) evaluated under TransformerLens' definition, which must agree to
float rounding; then the time of headscope's whole battery against the detector's three scores,
round robin in this process.

    bash bench/setup_peers.sh                                  # once; idempotent
    bench/.venvs/peers/bin/python bench/bench_census_tl.py     # ~5-10 min (--repeats 5)

Writes bench/results/bench_census_tl.json."""
import argparse, gc, json, os, pathlib, statistics, sys, time
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_cache import hf_dir, Quiet, versions, log    # the same HF folder, quiet-wait and versions

OUT_JSON = HERE/"results"/"bench_census_tl.json"
TL_NAMES = {"prev_token": ("previous_token_head", "text"), "duplicate": ("duplicate_token_head", "repeated"),
            "induction": ("induction_head", "repeated")}

# ---------------------------------------------------------------------------------------------
class FixedIds:
    "What `detect_head` needs of a model (`cfg`, `to_tokens`, `run_with_cache`), with `to_tokens` returning stored ids"
    def __init__(self, bridge, table:dict): self.bridge, self.cfg, self.table = bridge, bridge.cfg, table
    def to_tokens(self, seq):
        return torch.cat([self.table[s] for s in seq]) if isinstance(seq, list) else self.table[seq]
    def run_with_cache(self, *a, **kw): return self.bridge.run_with_cache(*a, **kw)

def tl_scores(proxy, keys:dict, exclude_bos:bool)->dict:
    "The three detector scores, each the mean over sequences of `detect_head(...)` (its list behaviour)"
    from transformer_lens.head_detector import detect_head
    return {s: detect_head(proxy, keys[inp], name, exclude_bos=exclude_bos).float()
            for s, (name, inp) in TL_NAMES.items()}

def tl_cache_shared(bridge, proxy, keys:dict)->dict:
    "The same three scores with one `run_with_cache` per sequence, shared by duplicate and induction (`cache=`)"
    from transformer_lens.head_detector import detect_head
    out = {s: [] for s in TL_NAMES}
    for k in keys["text"]:
        _, c = bridge.run_with_cache(proxy.table[k], remove_batch_dim=True)
        out["prev_token"].append(detect_head(proxy, k, "previous_token_head", cache=c)); del c
    for k in keys["repeated"]:
        _, c = bridge.run_with_cache(proxy.table[k], remove_batch_dim=True)
        out["duplicate"].append(detect_head(proxy, k, "duplicate_token_head", cache=c))
        out["induction"].append(detect_head(proxy, k, "induction_head", cache=c)); del c
    return {s: torch.stack(v).mean(0) for s, v in out.items()}

# ---------------------------------------------------------------------------------------------
# headscope's streaming statistics under TransformerLens' definition
def tl_definition(model, ids:torch.Tensor, detection, exclude_bos:bool)->torch.Tensor:
    """`detect_head`'s "mul" score computed from `attention_stats` (no pattern formed): per sequence
    sum_{i,j} A[i,j] D[i,j] / sum_{i,j} A[i,j], with column 0 zeroed in both sums under `exclude_bos`,
    then the mean over sequences. D is TransformerLens' own detection pattern of that sequence; each
    query's keys with D = 1 are gathered one per round (`targets`), all rounds in one forward."""
    from headscope.hooking import hooks, forward
    from headscope.heads.stats import attention_stats
    from headscope.arch import model_dims
    B, n = ids.shape
    L = model_dims(model).n_layers
    Ds = [detection(ids[b:b+1]) for b in range(B)]                       # [n n] each, 0/1
    if exclude_bos: Ds = [D.clone().index_fill_(1, torch.tensor([0]), 0) for D in Ds]
    per_row = [[D[i].nonzero()[:, 0].tolist() for i in range(n)] for D in Ds]
    R = max(1, max(len(js) for rows in per_row for js in rows))
    rounds = torch.full((R, B, n), -1, dtype=torch.long)                  # round r: the r-th key of each query
    for b, rows in enumerate(per_row):
        for i, js in enumerate(rows):
            for r, j in enumerate(js): rounds[r, b, i] = j
    num, den = {}, {}
    def obs(l):
        def f(module, q, k, v, mask, kw):
            for r in range(R):
                st = attention_stats(q, k, mask, kw.get("scaling"), kw.get("softcap"), rounds[r])
                num[l] = num.get(l, 0) + st.target.double().sum(-1)              # [batch head]
                if r == 0:                                                         # sum of A (rows sum to 1), minus column 0
                    den[l] = (1 - st.sink.double()).sum(-1) if exclude_bos else st.target.new_full(st.target.shape[:2], n).double()
        return f
    with torch.no_grad(), hooks(model, observe={l: obs(l) for l in range(L)}):
        forward(model, {"input_ids": ids})
    return torch.stack([(num[l] / den[l]).mean(0) for l in range(L)]).float()   # [layer head]

# ---------------------------------------------------------------------------------------------
def compare(a:torch.Tensor, b:torch.Tensor)->dict:
    "Pearson and Spearman correlation over all heads, max |a - b|, and the overlap of the top-10 heads"
    a, b = a.double().flatten(), b.double().flatten()
    ok = a.isfinite() & b.isfinite()
    a, b = a[ok], b[ok]
    pear = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    rk = lambda x: x.argsort().argsort().double()
    spear = float(torch.corrcoef(torch.stack([rk(a), rk(b)]))[0, 1])
    top = lambda x: set(x.topk(10).indices.tolist())
    return {"pearson": round(pear, 6), "spearman": round(spear, 6), "max_abs_diff": float((a - b).abs().max()),
            "max_a": float(a.max()), "max_b": float(b.max()), "top10_overlap": len(top(a) & top(b))}

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-seq", type=int, default=8); p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--half", type=int, default=32); p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per contestant after one warm-up")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet-budget", type=float, default=120,
                   help="seconds in all to wait, before timed calls, for other processes to stop running (0: never)")
    p.add_argument("--hf-dir", help="an HF folder of SmolLM2 (default: bench/.cache/smollm2-hf, made once)")
    p.add_argument("--out", default=str(OUT_JSON), help="JSON file to write ('' for none)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import warnings
    from headscope.models import load_model
    from headscope.heads.patterns import pattern_scores
    from headscope.data.needles import text_tokens, repeated_tokens
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens import head_detector as hd
    d = hf_dir(args.hf_dir)
    model = load_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(str(d), device="cpu", dtype=torch.float32)
    tok = model.tokenizer
    text = text_tokens(tok, args.n_seq, args.seq_len, seed=args.seed)
    rep = repeated_tokens(tok, args.n_seq, args.half, seed=args.seed)
    n, nr, T = text.shape[1], rep.shape[1], args.half
    keys = {"text": [f"text{i}" for i in range(len(text))], "repeated": [f"rep{i}" for i in range(len(rep))]}
    proxy = FixedIds(bridge, {k: text[i:i+1] for i, k in enumerate(keys["text"])} | {k: rep[i:i+1] for i, k in enumerate(keys["repeated"])})
    bos = tok.bos_token_id
    tl_bos = int(bridge.to_tokens("Hello")[0, 0])
    # chance duplicates among the random tokens (beyond the planted repeat) enter TL's duplicate/induction patterns
    chance = sum(int((hd.get_duplicate_token_head_detection_pattern(rep[b:b+1]).sum() - T).item()) for b in range(len(rep)))
    meta = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": torch.get_num_threads(), "n_seq": args.n_seq,
            "text_len": n, "repeated_len": nr, "half": T, "seed": args.seed, "hf_dir": str(d), "versions": versions(),
            "bos_id": bos, "all_start_with_bos": bool((text[:, 0] == bos).all() and (rep[:, 0] == bos).all()),
            "tl_to_tokens_prepends": tl_bos, "bridge_attn": bridge.original_model.config._attn_implementation,
            "chance_duplicate_pairs": chance, "loadavg_start": os.getloadavg()[0]}
    log(f"bench_census_tl: {args.n_seq} x {n} text tokens, {args.n_seq} x {nr} repeated (T={T}), {meta['threads']} threads; "
        f"BOS id {bos} first in every row: {meta['all_start_with_bos']}; TL's to_tokens prepends id {tl_bos}; "
        f"bridge attention: {meta['bridge_attn']}; chance duplicate pairs: {chance}")
    log(" ".join(f"{k}={v}" for k, v in meta["versions"].items()))

    # --- agreement -------------------------------------------------------------------------------
    hs = pattern_scores(model, text, rep, progress=False)
    tl = {False: tl_scores(proxy, keys, False), True: tl_scores(proxy, keys, True)}
    shared = tl_cache_shared(bridge, proxy, keys)
    det = {"prev_token": hd.get_previous_token_head_detection_pattern,
           "duplicate": hd.get_duplicate_token_head_detection_pattern, "induction": hd.get_induction_head_detection_pattern}
    ids_of = {"text": text, "repeated": rep}
    hs_tl = {ex: {s: tl_definition(model, ids_of[TL_NAMES[s][1]], det[s], ex) for s in TL_NAMES} for ex in (False, True)}
    # the closed form for the default ("mul", BOS kept): TL divides by all n rows, headscope averages over its rows
    scale = {"prev_token": (n - 1)/n, "duplicate": T/nr, "induction": T/nr}
    rows = []
    for s in TL_NAMES:
        rows.append({"score": s, "headscope": s, "tl": "default", **compare(hs[s], tl[False][s])})
        rows.append({"score": s, "headscope": f"{s}_nobos", "tl": "exclude_bos", **compare(hs[f"{s}_nobos"], tl[True][s])})
        rows.append({"score": s, "headscope": f"{s} x {scale[s]:.4f} (closed form)", "tl": "default",
                     **compare(hs[s]*scale[s], tl[False][s])})
        for ex in (False, True):
            rows.append({"score": s, "headscope": "attention_stats under TL's definition", "tl": "exclude_bos" if ex else "default",
                         **compare(hs_tl[ex][s], tl[ex][s])})
        rows.append({"score": s, "headscope": "(TL, cache shared)", "tl": "default", **compare(shared[s], tl[False][s])})
    hdr = f"{'score':10} {'headscope':42} {'TL':11} {'pearson':>8} {'spearman':>8} {'max|diff|':>9} {'max hs':>7} {'max TL':>7} {'top10':>5}"
    log("\n" + hdr + "\n" + "-"*len(hdr))
    for r in rows:
        log(f"{r['score']:10} {r['headscope']:42} {r['tl']:11} {r['pearson']:8.4f} {r['spearman']:8.4f} {r['max_abs_diff']:9.2e} "
            f"{r['max_a']:7.3f} {r['max_b']:7.3f} {r['top10_overlap']:5d}")
    log("top10: heads shared by the two top-10 lists; max hs / max TL: the largest score in each map")

    # --- time --------------------------------------------------------------------------------------
    quiet = Quiet(args.quiet_budget)
    fns = {"headscope pattern_scores (11 scores)": lambda: pattern_scores(model, text, rep, progress=False),
           "TL detect_head x3 (3 scores)": lambda: tl_scores(proxy, keys, False),
           "TL detect_head x3, cache shared": lambda: tl_cache_shared(bridge, proxy, keys)}
    times = {k: [] for k in fns}
    for f in fns.values():
        with torch.no_grad(): f()                                     # warm-up
    for _ in range(args.repeats):
        for k, f in fns.items():
            quiet()
            t = time.perf_counter()
            with torch.no_grad(): out = f()
            times[k].append(time.perf_counter() - t); del out; gc.collect()
    base = times["TL detect_head x3 (3 scores)"]
    timing = [{"name": k, "median_s": round(statistics.median(ts), 3), "min_s": round(min(ts), 3), "times_s": [round(t, 3) for t in ts],
               "paired_vs_tl": round(statistics.median(t/b for t, b in zip(ts, base)), 3), "min_vs_tl": round(min(ts)/min(base), 3)}
              for k, ts in times.items()]
    hdr = f"{'contestant':38} {'median s':>8} {'min s':>7} {'x TL paired':>11} {'x TL min':>8}"
    log("\n" + hdr + "\n" + "-"*len(hdr))
    for r in timing:
        log(f"{r['name']:38} {r['median_s']:8.3f} {r['min_s']:7.3f} {r['paired_vs_tl']:11.3f} {r['min_vs_tl']:8.3f}")
    meta.update(loadavg_end=os.getloadavg()[0], timed_calls_started_quiet=f"{quiet.quiet}/{quiet.calls}",
                waited_for_quiet_s=round(quiet.waited, 1), repeats=args.repeats)
    log(f"x TL paired: median over rounds of time / the detector's time in the same round; "
        f"{meta['timed_calls_started_quiet']} timed calls started with no other process running; "
        f"load average {meta['loadavg_start']:.1f} at start, {meta['loadavg_end']:.1f} at end")

    if args.out:
        out = pathlib.Path(args.out); out.parent.mkdir(parents=True, exist_ok=True)
        L2 = lambda t: [[round(float(x), 6) for x in row] for row in t]
        maps = {"headscope": {k: L2(v) for k, v in hs.items()},
                "tl_default": {k: L2(v) for k, v in tl[False].items()}, "tl_exclude_bos": {k: L2(v) for k, v in tl[True].items()},
                "headscope_under_tl_default": {k: L2(v) for k, v in hs_tl[False].items()},
                "headscope_under_tl_exclude_bos": {k: L2(v) for k, v in hs_tl[True].items()}}
        out.write_text(json.dumps({"meta": meta, "agreement": rows, "timing": timing, "maps": maps}, indent=1) + "\n")
        log(f"wrote {out}")

if __name__ == "__main__": main()
