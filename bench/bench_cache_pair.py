"""headscope's cached forward against the plain forward, paired call by call, in one process.

A lighter companion of bench_cache.py (headscope only, main venv): alternates a plain forward and
`run_with_cache` of resid_pre, pattern, z and mlp_out for all layers of SmolLM2 on 8 x 128 tokens,
and prints the median of the per-pair time ratios (pairs seconds apart share the machine's state).

    .venv/bin/python bench/bench_cache_pair.py [--attn eager|sdpa] [--dtype float32|bfloat16] [--tune-malloc] [--no-patterns]
"""
import argparse, gc, statistics, time, torch
from headscope import load_model, run_with_cache
from headscope.cache import tune_malloc

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--attn", default="eager"); p.add_argument("--dtype", default="float32")
p.add_argument("--tune-malloc", action="store_true"); p.add_argument("--no-patterns", action="store_true")
p.add_argument("--pairs", type=int, default=9)
a = p.parse_args()
torch.set_num_threads(2)
if a.tune_malloc: print("tune_malloc:", tune_malloc())
m = load_model(dtype=getattr(torch, a.dtype), attn_implementation=a.attn)
ids = torch.randint(0, m.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
names = ["blocks.*.hook_resid_pre", "blocks.*.attn.hook_z", "blocks.*.hook_mlp_out"] + ([] if a.no_patterns else ["blocks.*.attn.hook_pattern"])
def plain():
    with torch.no_grad(): return m(ids, use_cache=False)
def cached(): return run_with_cache(m, ids, names=names)
for f in (plain, cached): f(); gc.collect()
r = []
for _ in range(a.pairs):
    t = time.perf_counter(); o = plain(); tp = time.perf_counter() - t; del o; gc.collect()
    t = time.perf_counter(); o = cached(); tc = time.perf_counter() - t; del o; gc.collect()
    r.append(tc / tp)
print(f"attn={a.attn} dtype={a.dtype} patterns={not a.no_patterns} tune_malloc={a.tune_malloc}: "
      f"cached/plain median {statistics.median(r):.3f} (pairs: {' '.join(f'{x:.2f}' for x in r)})")
