"""Attribution patching and edge attribution patching against independent references.

References: one forward per patch (`naive_patching`) where the metric is linear in the patched
activation; float64 central finite differences along the clean-minus-corrupted direction; sums that
follow from the residual stream being the sum of its writes, with gradients taken by plain autograd
on hooked runs; and, for every edge, a float64 finite difference that changes the input of the
receiver alone (a pre-hook on its norm, or its own q/k/v recomputed from a perturbed residual)."""
import pytest, torch
from torch import nn
from headscope.models import tiny_model
from headscope.arch import model_dims, arch_spec, blocks, get_module, act_name, post_rotary_kind
from headscope.cache import run_with_cache
from headscope.hooking import hooks, forward
from headscope.causal.metrics import logit_diff, agreement
from headscope.causal.patching import activation_patching, KINDS
from headscope.causal.reference import naive_patching
from headscope.causal.attribution import (attribution_patching, edge_attribution_patching, frozen_params,
                                   AttributionResult, EdgeScores, eap_nodes)

METRIC = lambda lg: logit_diff(lg, 5, 6)
METRIC64 = lambda lg: lg[:, 5] - lg[:, 6]     # no cast to float32: finite differences in float64 need it

def prompts(n_pos=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (2, n_pos), generator=g), torch.randint(3, 250, (2, n_pos), generator=g)

def model_for(arch, dtype=torch.float32, **kw):
    return tiny_model(arch, n_layers=2, seed=0, initializer_range=0.1, dtype=dtype, **kw)

# (a) where the metric is linear in the activation, the estimate is the exact patching result
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_exact_where_linear(arch):
    m = model_for(arch)
    m.model.norm = nn.Identity()
    with torch.no_grad(): m.model.layers[-1].mlp.down_proj.weight.zero_()   # last layer: attention only, then the unembedding
    clean, corrupt = prompts()
    for kind in ["z", "v", "pattern", "attn_out", "resid_mid", "resid_post", "mlp_out"]:
        for pos in [-1, None, "each", 2]:
            ref = naive_patching(m, clean, corrupt, METRIC, kind, pos, layers=[1])
            got = attribution_patching(m, clean, corrupt, METRIC, kind, pos, layers=[1], progress=False)
            assert torch.allclose(got.raw, ref, atol=1e-4), (kind, pos, (got.raw - ref).abs().max())
    assert ref.abs().max() > 0.1     # the check is not vacuous: the patches move the metric

# (b) the same grid, axes and baselines as activation patching
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_grids_match_patching(arch):
    m = model_for(arch)
    clean, corrupt = prompts(5)
    for kind in KINDS:
        for pos in [-1, None, "each"]:
            ex = activation_patching(m, clean, corrupt, METRIC, kind, pos, progress=False)
            at = attribution_patching(m, clean, corrupt, METRIC, kind, pos, progress=False)
            assert (tuple(at.scores.shape), at.axes, at.kind, at.pos) == (tuple(ex.scores.shape), ex.axes, ex.kind, ex.pos), (kind, pos)
            assert abs(at.clean - ex.clean) < 1e-5 and abs(at.corrupt - ex.corrupt) < 1e-5
    ex = activation_patching(m, clean, corrupt, METRIC, "z", None, layers=[1], progress=False)
    at = attribution_patching(m, clean, corrupt, METRIC, "z", None, layers=[1], exact=ex, progress=False)
    assert torch.equal(at.exact, ex.scores) and set(at.agreement) >= {"pearson", "spearman", "topk_abs", "topk_signed", "n"}
    assert "vs exact" in repr(at)

# (c) each cell is the directional derivative along clean - corrupted, checked by float64 finite differences
@pytest.mark.parametrize("kind,pos,layer,head,p", [("q", None, 0, 1, None), ("k", -1, 0, 1, 6), ("pattern", None, 1, 2, None),
                                                   ("resid_pre", "each", 1, None, 3), ("z", "each", 0, 3, 2), ("mlp_out", None, 0, None, None)])
def test_cells_are_directional_derivatives(kind, pos, layer, head, p):
    m = model_for("llama", dtype=torch.float64)
    clean, corrupt = prompts()
    name = act_name(post_rotary_kind(m, kind), layer)   # q, k: what attention scores with (hook_rot_q/rot_k: Llama has rotary)
    cc = run_with_cache(m, clean, names=[name])
    pa = 2 if kind == "pattern" else 1
    ha = 1 if kind == "pattern" else 2
    def f(eps):
        def h(act, hook):
            idx = [slice(None)] * act.ndim
            if p is not None: idx[pa] = p
            if head is not None: idx[ha] = head
            act = act.clone(); idx = tuple(idx)
            act[idx] = act[idx] + eps * (cc[name][idx] - act[idx])
            return act
        with hooks(m, [(name, h)]), torch.no_grad(): return float(METRIC64(forward(m, {"input_ids": corrupt}).logits[:, -1]).mean())
    ref = _fd(f)
    res = attribution_patching(m, clean, corrupt, METRIC64, kind, pos, layers=[layer], progress=False)
    cell = [0] + ([head] if head is not None else []) + ([p] if pos == "each" else [])
    assert abs(float(res.raw[tuple(cell)]) - res.corrupt - ref) < 1e-4 * max(1, abs(ref)), (float(res.raw[tuple(cell)]) - res.corrupt, ref)

def _fd(f, e=2e-2):
    "f'(0) by central differences with one Richardson step (error O(e^4)): the models' RMSNorm computes in float32 even in float64 models"
    d = lambda e: (f(e) - f(-e)) / (2 * e)
    return (4 * d(e / 2) - d(e)) / 3

# (e) activations only: no parameter gradient, flags back as they were (also after an error)
def test_no_parameter_grads():
    m = model_for("qwen2")
    m.lm_head.weight.requires_grad_(False)
    flags = [p.requires_grad for p in m.parameters()]
    clean, corrupt = prompts()
    attribution_patching(m, clean, corrupt, METRIC, "z", None, progress=False)
    edge_attribution_patching(m, clean, corrupt, METRIC, progress=False)
    assert all(p.grad is None for p in m.parameters())
    assert [p.requires_grad for p in m.parameters()] == flags
    def bad(lg): raise RuntimeError("bad metric")
    with pytest.raises(RuntimeError, match="bad metric"): attribution_patching(m, clean, corrupt, bad, progress=False)
    with pytest.raises(RuntimeError, match="bad metric"): edge_attribution_patching(m, clean, corrupt, bad, progress=False)
    assert [p.requires_grad for p in m.parameters()] == flags and all(p.grad is None for p in m.parameters())
    with frozen_params(m): assert not any(p.requires_grad for p in m.parameters())
    assert [p.requires_grad for p in m.parameters()] == flags

def test_agreement_reference():
    torch.manual_seed(0)
    a, b = torch.randn(40), torch.randn(40)
    ag = agreement(a, b, k=5)
    assert abs(ag["pearson"] - float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 1e-6
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    assert abs(ag["spearman"] - float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])) < 1e-9
    top = lambda x: set(x.topk(5).indices.tolist())
    assert ag["topk_abs"] == len(top(a.abs()) & top(b.abs())) / 5 and ag["topk_signed"] == len(top(a) & top(b)) / 5

# (d) EAP: sums fixed by the residual stream, and every edge by finite differences through its receiver alone
def _grads(m, x, names):
    "∂(mean metric)/∂act at each hook in `names`, by plain autograd on a hooked forward (parameters frozen)"
    keep = {}
    def h(act, hook):   # a copy that the forward really uses (a read-only resid_mid is not on the model's path)
        out = act.clone(); out.retain_grad(); keep[hook.name] = out; return out
    with hooks(m, [(n, h) for n in names]), frozen_params(m), torch.enable_grad():
        emb = get_module(m, arch_spec(m).embed)
        hd = emb.register_forward_hook(lambda mod, a, o: o.requires_grad_(True))   # start the graph at the embeddings
        try: METRIC(forward(m, x).logits[:, -1]).mean().backward()
        finally: hd.remove()
    return {n: keep[n].grad for n in names}, {n: keep[n].detach() for n in names}

@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_eap_sums(arch):
    m = model_for(arch)
    L, H = model_dims(m).n_layers, model_dims(m).n_heads
    clean, corrupt = prompts()
    es = edge_attribution_patching(m, clean, corrupt, METRIC, progress=False)
    raw = es.scores * (es.clean - es.corrupt)
    ix = {n: i for i, n in enumerate(es.nodes)}
    names = [f"blocks.{l}.{s}" for l in range(L) for s in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")]
    g, acts = _grads(m, {"input_ids": corrupt}, names)
    cc = run_with_cache(m, clean, names=names)
    tol = 1e-4 * max(1., float(raw.abs().max()))
    for l in range(L):
        pre, mid, post = (f"blocks.{l}.{s}" for s in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post"))
        # into MLP{l}: Δresid_mid · (∂m/∂resid_mid - ∂m/∂resid_post), the gradient through the MLP alone
        want = float(((cc[mid] - acts[mid]) * (g[mid] - g[post])).sum())
        assert abs(float(raw[:, ix[f"MLP{l}"]].sum()) - want) < tol
        # into the heads of layer l together: Δresid_pre · (∂m/∂resid_pre - ∂m/∂resid_mid)
        heads = [ix[f"L{l}H{h}"] for h in range(H)]
        want = float(((cc[pre] - acts[pre]) * (g[pre] - g[mid])).sum())
        assert abs(float(raw[:, heads].sum()) - want) < tol
    last = f"blocks.{L-1}.hook_resid_post"
    assert abs(float(raw[:, ix["logits"]].sum()) - float(((cc[last] - acts[last]) * g[last]).sum())) < tol
    heads = [ix[f"L{l}H{h}"] for l in range(L) for h in range(H)]        # parts: the head receivers' q, k, v inputs
    assert torch.allclose(sum(es.parts.values())[:, heads], es.scores[:, heads], atol=1e-5 * max(1., float(es.scores.abs().max())))

def _out_proj(attn): return next(getattr(attn, n) for n in ("o_proj", "c_proj") if hasattr(attn, n))

def _writes(m, clean, corrupt):
    "Each node's write into the residual stream, clean minus corrupted: {node: [batch pos d_model]}"
    d, spec = model_dims(m), arch_spec(m)
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.{s}" for l in range(d.n_layers) for s in ("attn.hook_z", "hook_mlp_out")]
    c, k = run_with_cache(m, clean, names=names), run_with_cache(m, corrupt, names=names)
    out = {"embed": c[names[0]] - k[names[0]]}
    for l in range(d.n_layers):
        proj = _out_proj(get_module(blocks(m)[l], spec.attn))
        for h in range(d.n_heads):
            only = lambda z: proj(z.masked_fill(torch.arange(d.n_heads)[None, None, :, None] != h, 0).flatten(2))   # head h alone
            with torch.no_grad(): out[f"L{l}H{h}"] = only(c[f"blocks.{l}.attn.hook_z"]) - only(k[f"blocks.{l}.attn.hook_z"])
        out[f"MLP{l}"] = c[f"blocks.{l}.hook_mlp_out"] - k[f"blocks.{l}.hook_mlp_out"]
    return out


def _metric_with(m, x, fwd=(), pre=()):
    "Mean metric with headscope hooks `fwd` and raw PyTorch forward pre-hooks `pre` = [(module, fn)]"
    hs = [mod.register_forward_pre_hook(fn) for mod, fn in pre]
    try:
        with hooks(m, list(fwd)), torch.no_grad(): return float(METRIC64(forward(m, x).logits[:, -1]).mean())
    finally:
        for h in hs: h.remove()

@pytest.mark.parametrize("arch,kv", [("llama", 2), ("gpt2", None)])
def test_eap_every_edge_by_finite_differences(arch, kv):
    m = model_for(arch, dtype=torch.float64, **({"n_kv_heads": kv} if kv else {}))
    d, spec = model_dims(m), arch_spec(m)
    L, H, group = d.n_layers, d.n_heads, d.n_heads // d.n_kv_heads
    clean, corrupt = prompts()
    x = {"input_ids": corrupt}
    es = edge_attribution_patching(m, clean, corrupt, METRIC64, progress=False)
    den = es.clean - es.corrupt
    W = _writes(m, clean, corrupt)
    ix = {n: i for i, n in enumerate(es.nodes)}
    add = lambda D: (lambda mod, a: (a[0] + D,) + tuple(a[1:]))
    def qkv_at(l, D):   # q, k, v of layer l when its attention reads resid_pre + D
        keep = {}
        def h(act, hook): keep[hook.name.split("_")[-1]] = act
        with hooks(m, [(f"blocks.{l}.attn.hook_{s}", h) for s in "qkv"]):
            _metric_with(m, x, pre=[(get_module(blocks(m)[l], spec.ln1), add(D))])
        return keep
    def swap(l, which, head, D):   # metric when only `which` of `head` (query head for q, KV head for k/v) reads resid_pre + D
        new = qkv_at(l, D)
        def h(act, hook):
            s = hook.name.split("_")[-1]; act = act.clone(); act[:, :, head] = new[s][:, :, head]; return act
        return _metric_with(m, x, fwd=[(f"blocks.{l}.attn.hook_{s}", h) for s in which])
    tol = lambda ref: 1e-4 * max(1., abs(ref))      # float32 scores, float32 norms
    checked = 0
    for u, v, s in es.edges():
        D = W[u]
        if v == "logits":
            ref = _fd(lambda e: _metric_with(m, x, fwd=[(f"blocks.{L-1}.hook_resid_post", lambda a, hk: a + e * D)]))
            assert abs(s * den - ref) < tol(ref), (u, v)
        elif v.startswith("MLP"):
            l = int(v[3:])
            ref = _fd(lambda e: _metric_with(m, x, pre=[(get_module(blocks(m)[l], spec.ln2), add(e * D))]))
            assert abs(s * den - ref) < tol(ref), (u, v)
        else:
            l, h = map(int, v[1:].split("H"))
            ref = _fd(lambda e: swap(l, "q", h, e * D))             # the query of head h alone
            assert abs(float(es.parts["q"][ix[u], ix[v]]) * den - ref) < tol(ref), (u, v, "q")
            if group == 1:                                            # no sharing: the whole head, q k v together
                ref = _fd(lambda e: swap(l, "qkv", h, e * D))
                assert abs(s * den - ref) < tol(ref), (u, v)
            if h % group == 0:                                        # a KV head: the k and v parts of its query heads together
                g = h // group
                cols = [ix[f"L{l}H{j}"] for j in range(g * group, (g + 1) * group)]
                for part in "kv":
                    ref = _fd(lambda e: swap(l, part, g, e * D))
                    assert abs(float(es.parts[part][ix[u], cols].sum()) * den - ref) < tol(ref), (u, v, part)
        checked += 1
    assert checked == 54

def test_eap_nodes_edges_and_errors():
    m = model_for("qwen2")
    clean, corrupt = prompts()
    es = edge_attribution_patching(m, clean, corrupt, METRIC, progress=False)
    assert es.nodes == eap_nodes(2, 4) == ["embed", "L0H0", "L0H1", "L0H2", "L0H3", "MLP0",
                                           "L1H0", "L1H1", "L1H2", "L1H3", "MLP1", "logits"]
    e = es.edges()
    assert len(e) == 54 and [abs(s) for *_, s in e] == sorted([abs(s) for *_, s in e], reverse=True)
    assert es.edges(3) == e[:3] and all(abs(s) >= 0.05 for *_, s in es.edges(threshold=0.05))
    pairs = {(a, b) for a, b, _ in e}
    assert ("L0H0", "MLP0") in pairs and ("L0H0", "L0H1") not in pairs and ("MLP0", "L0H1") not in pairs and ("L1H0", "MLP0") not in pairs
    assert "EdgeScores(12 nodes, 54 edges" in repr(es)
    for arch in ("gpt_neox", "gemma2", "olmo2"):
        with pytest.raises(ValueError, match="sequential pre-norm"):
            edge_attribution_patching(tiny_model(arch, n_layers=2), clean, corrupt, METRIC, progress=False)
