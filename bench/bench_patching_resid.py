"""Activation patching of the residual stream at every layer x position (`resid_pre`, `pos="each"`), one IOI pair,
side by side with TransformerLens' `get_act_patch_resid_pre` on the same model and token ids.

    bash bench/setup_peers.sh                                          # once
    bench/.venvs/peers/bin/python bench/bench_patching_resid.py        # ~5 min (--repeats 2)

Contestants (SmolLM2-135M-Instruct fp32, 2 threads, 14 tokens, 30 layers x 14 positions = 420 patches):
- headscope `activation_patching(kind="resid_pre", pos="each")`, the default: patches grouped by position,
  each group run on the corrupted prompt's KV cache of the positions before it (only tokens p..n-1 fed);
- the same with `reuse_prefix=False` (full 14-token runs, batched 64 patches per forward: the previous path);
- TransformerLens 4.3 bridge: `transformer_lens.patching.get_act_patch_resid_pre(bridge, corrupt, clean_cache, metric)`
  (one forward per patch). Skipped when transformer-lens is not importable.
"""
import argparse, json, pathlib, sys, time
import torch
HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
from bench_cache import hf_dir, Quiet, versions, log
from bench_patching import CLEAN, CORRUPT

def tl_contestant(d, ids_c, ids_k, mary, john):
    try:
        from transformer_lens.model_bridge import TransformerBridge
        from transformer_lens.patching import get_act_patch_resid_pre
        bridge = TransformerBridge.boot_transformers(str(d), device="cpu", dtype=torch.float32)
    except Exception as e:
        log(f"transformer-lens: not available ({type(e).__name__}: {e}); run bench/setup_peers.sh and use its venv"); return None
    metric = lambda logits: logits[0, -1, mary] - logits[0, -1, john]
    def run():
        with torch.no_grad():
            _, cache = bridge.run_with_cache(ids_c, names_filter=lambda nm: nm.endswith("hook_resid_pre"))
            return get_act_patch_resid_pre(bridge, ids_k, cache, metric).float()    # [layer pos], raw metric
    return run

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet-budget", type=float, default=300)
    ap.add_argument("--no-tl", action="store_true")
    ap.add_argument("--out", default=str(HERE/"results"/"bench_patching_resid.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from headscope.models import load_model
    from headscope.causal.patching import activation_patching
    from headscope.causal.metrics import logit_diff
    m = load_model(); tk = m.tokenizer
    ids_c, ids_k = (tk(s, return_tensors="pt")["input_ids"] for s in (CLEAN, CORRUPT))
    mary, john = (tk.encode(s, add_special_tokens=False)[0] for s in (" Mary", " John"))
    metric = lambda lg: logit_diff(lg, mary, john)
    hs = lambda **kw: activation_patching(m, ids_c, ids_k, metric, "resid_pre", "each", progress=False, **kw).raw
    runs = {"headscope (prefix KV per position, default)": hs, "headscope reuse_prefix=False": lambda: hs(reuse_prefix=False)}
    if not a.no_tl:
        tl = tl_contestant(hf_dir(), ids_c, ids_k, mary, john)
        if tl is not None: runs["transformer-lens get_act_patch_resid_pre"] = tl
    quiet, times, grids = Quiet(a.quiet_budget), {}, {}
    for k, f in runs.items(): grids[k] = f()
    for r in range(a.repeats):
        for k, f in runs.items():
            quiet()
            t = time.perf_counter(); grids[k] = f(); times.setdefault(k, []).append(time.perf_counter() - t)
    ref = "transformer-lens get_act_patch_resid_pre" if "transformer-lens get_act_patch_resid_pre" in runs else "headscope reuse_prefix=False"
    log(f"SmolLM2-135M fp32, 1 IOI pair ({ids_c.shape[1]} tokens), resid_pre x every layer x position, {a.threads} threads, "
        f"best of {a.repeats} ({quiet.quiet}/{quiet.calls} calls on a quiet machine)"); log(versions())
    rows, t_ref = {}, min(times[ref])
    for k in runs:
        d = float((grids[k] - grids[ref]).abs().max())
        rows[k] = dict(best_s=min(times[k]), all_s=times[k], speedup_vs_ref=t_ref / min(times[k]), max_abs_diff_vs_ref=d)
        log(f"{k:45s} {min(times[k]):8.3f} s   x{t_ref / min(times[k]):6.1f} vs {ref}   max |diff| {d:.2e}")
    pathlib.Path(a.out).write_text(json.dumps(dict(rows=rows, versions=versions(), threads=a.threads, tokens=ids_c.shape[1], reference=ref), indent=1))

if __name__ == "__main__": main()
