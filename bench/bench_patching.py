#!/usr/bin/env python
"""Activation patching of every head's output at the final position, one IOI pair, SmolLM2-135M (fp32, CPU).

Contestants, in one process, on the same token ids and the same metric (logit(" Mary") - logit(" John")):
- headscope, naive loop: `naive_patching`, one hooked forward per head (270 forwards);
- headscope, batched: `activation_patching(..., reuse_prefix=False)`, all 270 patches stacked along the
  batch of one forward;
- headscope, batched + prefix KV: the default; the corrupted prompt's prefix runs once and its KV cache is
  shared, so only the final token is recomputed for the 270 patched rows;
- TransformerLens 4.3 (TransformerBridge on the same HF folder): `generic_activation_patch` with
  `layer_pos_head_vector_patch_setter` on `hook_z` over the 270 (layer, final pos, head) indices, which
  is what its `get_act_patch_attn_head_out_by_pos` does, restricted to the final position (one forward
  per patch). Skipped when transformer-lens is not importable (run it in bench/.venvs/peers).

Each timed call waits for a quiet machine first (the cores are shared). Printed: best time, ratio to
headscope's naive loop, and the largest |difference| of each raw grid from the naive loop's.

    bash bench/setup_peers.sh                                        # once
    bench/.venvs/peers/bin/python bench/bench_patching.py [--repeats 3] [--threads 2]

Writes bench/results/bench_patching.json."""
import argparse, json, pathlib, sys, time
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_cache import hf_dir, Quiet, versions, log

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Alice and Bob went to the store, Charlie gave a drink to"

def tl_contestant(d, ids_clean, ids_corrupt, mary, john):
    "TransformerLens' own patching loop through its bridge, final position, every head"
    try:
        from transformer_lens.model_bridge import TransformerBridge
        from transformer_lens.patching import generic_activation_patch, layer_pos_head_vector_patch_setter
        import pandas as pd
        bridge = TransformerBridge.boot_transformers(str(d), device="cpu", dtype=torch.float32)
    except Exception as e:
        log(f"transformer-lens: not available ({type(e).__name__}: {e}); run bench/setup_peers.sh and use its venv"); return None
    L, H, n = bridge.cfg.n_layers, bridge.cfg.n_heads, ids_clean.shape[1]
    index = pd.DataFrame([(l, n - 1, h) for l in range(L) for h in range(H)], columns=["layer", "pos", "head_index"])
    metric = lambda logits: logits[0, -1, mary] - logits[0, -1, john]
    def run():
        with torch.no_grad():
            _, cache = bridge.run_with_cache(ids_clean, names_filter=lambda nm: nm.endswith("attn.hook_z"))
            out = generic_activation_patch(bridge, ids_corrupt, cache, metric, layer_pos_head_vector_patch_setter, "z", index_df=index)
        return out.view(L, H).float()
    return run

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet-budget", type=float, default=300, help="seconds in all to wait for an idle machine")
    ap.add_argument("--no-tl", action="store_true", help="skip TransformerLens")
    ap.add_argument("--out", default=str(HERE/"results"/"bench_patching.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from headscope.models import load_model
    from headscope.causal.patching import activation_patching
    from headscope.causal.reference import naive_patching
    from headscope.causal.metrics import logit_diff
    m = load_model()
    tk = m.tokenizer
    ids_c, ids_k = (tk(s, return_tensors="pt")["input_ids"] for s in (CLEAN, CORRUPT))
    assert ids_c.shape == ids_k.shape, (ids_c.shape, ids_k.shape)
    mary, john = (tk.encode(s, add_special_tokens=False)[0] for s in (" Mary", " John"))
    metric = lambda lg: logit_diff(lg, mary, john)
    runs = {
        "headscope naive loop": lambda: naive_patching(m, ids_c, ids_k, metric, "z", -1),
        "headscope batched": lambda: activation_patching(m, ids_c, ids_k, metric, "z", -1, batch_size=270, reuse_prefix=False, progress=False).raw,
        "headscope batched + prefix KV": lambda: activation_patching(m, ids_c, ids_k, metric, "z", -1, batch_size=270, progress=False).raw,
    }
    if not a.no_tl:
        tl = tl_contestant(hf_dir(), ids_c, ids_k, mary, john)
        if tl is not None: runs["transformer-lens bridge"] = tl
    quiet = Quiet(a.quiet_budget)
    times, grids = {}, {}
    for k, f in runs.items(): grids[k] = f()                 # warm-up (and the grids compared below)
    for r in range(a.repeats):
        for k, f in runs.items():
            quiet()
            t = time.perf_counter(); grids[k] = f(); times.setdefault(k, []).append(time.perf_counter() - t)
    base = min(times["headscope naive loop"])
    log(f"SmolLM2-135M fp32, 1 IOI pair ({ids_c.shape[1]} tokens), 270 heads' hook_z at the final position, "
        f"{a.threads} threads, best of {a.repeats} ({quiet.quiet}/{quiet.calls} calls on a quiet machine)")
    log(versions())
    rows = {}
    for k in runs:
        d = float((grids[k] - grids["headscope naive loop"]).abs().max())
        rows[k] = dict(best_s=min(times[k]), all_s=times[k], speedup_vs_naive=base / min(times[k]), max_abs_diff_vs_naive=d)
        log(f"{k:32s} {min(times[k]):8.3f} s   x{base / min(times[k]):7.1f} vs naive   max |diff| vs naive {d:.2e}")
    if "transformer-lens bridge" in rows:
        t_tl = rows["transformer-lens bridge"]["best_s"]
        for k in ("headscope batched", "headscope batched + prefix KV"):
            log(f"{k} is {t_tl / rows[k]['best_s']:.1f}x faster than TransformerLens' patching helper")
    pathlib.Path(a.out).write_text(json.dumps(dict(rows=rows, versions=versions(), threads=a.threads, tokens=ids_c.shape[1]), indent=1))

if __name__ == "__main__": main()
