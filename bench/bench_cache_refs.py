#!/usr/bin/env python
"""headscope run_with_cache (no patterns) against plain torch hooks that only keep references, with minor page faults per call.

    .venv/bin/python bench/bench_cache_refs.py float32 12     # dtype, rounds (~2 min)

Prints median time, ratio to the plain forward (median and paired) and minor faults per call."""
import torch, time, resource, statistics, sys, gc
torch.set_num_threads(2)
from headscope.models import load_model
from headscope.cache import run_with_cache
dtype = getattr(torch, sys.argv[1]) if len(sys.argv)>1 else torch.float32
m = load_model(dtype=dtype)
g = torch.Generator().manual_seed(0)
IDS = torch.randint(0, 49152, (8,128), generator=g)
L = m.config.num_hidden_layers
KINDS = ("hook_resid_pre", "attn.hook_pattern", "attn.hook_z", "hook_mlp_out")
def names(p): return [f"blocks.{l}.{k}" for l in range(L) for k in KINDS if p or k!="attn.hook_pattern"]
NP, NN = names(True), names(False)
def plain():
    with torch.no_grad(): return m(input_ids=IDS, use_cache=False)
def refs():
    acts=[]; hs=[]
    for l in range(L):
        mod=m.model.layers[l]
        hs.append(mod.register_forward_pre_hook(lambda mo,a,kw: acts.append(a[0] if a else kw["hidden_states"]), with_kwargs=True))
        hs.append(mod.self_attn.o_proj.register_forward_pre_hook(lambda mo,a: acts.append(a[0])))
        hs.append(mod.mlp.register_forward_hook(lambda mo,a,o: acts.append(o)))
    try:
        with torch.no_grad(): out=m(input_ids=IDS, use_cache=False)
    finally:
        for h in hs: h.remove()
    return acts, out
def hsp(): return run_with_cache(m, IDS, names=NP)
def hsn(): return run_with_cache(m, IDS, names=NN)
C = dict(plain=plain, refs=refs, hs_nopat=hsn)
T = {k:[] for k in C}; F={k:[] for k in C}
for k,f in C.items(): f()
for r in range(int(sys.argv[2]) if len(sys.argv)>2 else 5):
    for k,f in C.items():
        gc.collect()
        f0=resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t0=time.perf_counter()
        out=f(); t=time.perf_counter()-t0
        F[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt-f0); T[k].append(t); del out
for k in C:
    print(f"{k:10s} med {statistics.median(T[k]):.3f} min {min(T[k]):.3f} x {statistics.median(T[k])/statistics.median(T['plain']):.3f} paired {statistics.median([a/b for a,b in zip(T[k],T['plain'])]):.3f} minflt {statistics.median(F[k]):.0f}")
