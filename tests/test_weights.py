"""`headscope.weights`: `FactoredMatrix` against dense float64 linear algebra, and `model_weights` against what every
tiny architecture really computes (plain torch hooks on its modules and a spy on its eager attention function; nothing
of headscope's hooking), with and without folded norms."""
import sys, warnings
import pytest, torch
from torch import nn
from headscope.models import tiny_model, TINY_ARCHS
from headscope.arch import arch_spec, model_dims, blocks, get_module
from headscope.weights.factored import FactoredMatrix
from headscope.weights.core import model_weights, unscaled_norm, norm_affine, WEIGHT_NAMES, ModelWeights

EXACT, NORMED = 1e-9, 1e-5   # float64 paths; anything through an RMSNorm (transformers computes those in float32)
f64 = dict(dtype=torch.float64)

def maxdiff(a, b): return (a.double() - b.double()).abs().max().item()

# ---------------------------------------------------------------- FactoredMatrix

@pytest.fixture
def fm():
    g = torch.Generator().manual_seed(0)
    return FactoredMatrix(torch.randn(3, 4, 7, 5, generator=g, **f64), torch.randn(4, 5, 9, generator=g, **f64))

def test_factored_products(fm):
    AB = fm.A @ fm.B
    assert fm.shape == (3, 4, 7, 9) and maxdiff(fm.AB, AB) < EXACT and maxdiff(fm.T.AB, AB.mT) < EXACT
    X, Y = torch.randn(9, 2, **f64), torch.randn(6, 7, **f64)
    assert maxdiff((fm @ X).AB, AB @ X) < EXACT and maxdiff((Y @ fm).AB, Y @ AB) < EXACT
    assert maxdiff((fm @ fm.T).AB, AB @ AB.mT) < EXACT and (fm @ fm.T).mdim == 5
    assert maxdiff(fm @ torch.ones(9, **f64), AB.sum(-1)) < EXACT and maxdiff(torch.ones(7, **f64) @ fm, AB.sum(-2)) < EXACT
    assert maxdiff((3 * fm).AB, 3 * AB) < EXACT and maxdiff((fm / 2).AB, AB / 2) < EXACT

def test_factored_indexing(fm):
    AB = fm.AB
    for idx in ((1, 2), (slice(None), 3), (Ellipsis, 0), (-1,), (torch.tensor([0, 2]),)):
        assert maxdiff(fm[idx].AB, AB[idx + (slice(None), slice(None))]) < EXACT, idx   # leading dims only: `...` too
    with pytest.raises(IndexError, match="2 leading dims to index, not 3"): fm[0, 0, 0]
    assert fm.unsqueeze(0).shape == (1, 3, 4, 7, 9) and fm.unsqueeze(-3).shape == (3, 4, 1, 7, 9)

@pytest.mark.parametrize("l,m,r", [(7, 5, 9), (40, 3, 6), (6, 3, 40), (4, 9, 5), (8, 8, 8)])
def test_factored_svd_and_norm(l, m, r):
    g = torch.Generator().manual_seed(l * m * r)
    f = FactoredMatrix(torch.randn(2, 3, l, m, generator=g, **f64), torch.randn(2, 3, m, r, generator=g, **f64))
    U, S, Vh = f.svd()
    k = min(l, m, r)
    assert U.shape == (2, 3, l, k) and S.shape == (2, 3, k) and Vh.shape == (2, 3, k, r)
    assert maxdiff(U @ torch.diag_embed(S) @ Vh, f.AB) < EXACT
    assert maxdiff(S, torch.linalg.svdvals(f.AB)[..., :k]) < EXACT
    assert maxdiff(f.norm(), torch.linalg.matrix_norm(f.AB)) < EXACT
    assert maxdiff(f.U @ f.collapse_l(), f.AB) < EXACT and maxdiff(f.collapse_r() @ f.Vh, f.AB) < EXACT

@pytest.mark.parametrize("l,m", [(8, 3), (4, 6)])
def test_factored_eigenvalues(l, m):
    g = torch.Generator().manual_seed(l + m)
    f = FactoredMatrix(torch.randn(2, l, m, generator=g, **f64), torch.randn(2, m, l, generator=g, **f64))
    ev, k = f.eigenvalues, min(l, m)
    assert ev.shape == (2, k)
    for i in range(2):
        dense = torch.linalg.eigvals(f.AB[i])
        dense = dense[dense.abs().argsort(descending=True)[:k]]     # AB's others are zeros
        d = (ev[i][:, None] - dense[None]).abs()
        assert d.min(1).values.max() < 1e-8 and d.min(0).values.max() < 1e-8

def test_factored_errors(fm):
    with pytest.raises(ValueError, match=r"A \[2, 3\].*B \[4, 5\]"): FactoredMatrix(torch.randn(2, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="do not broadcast"): FactoredMatrix(torch.randn(2, 3, 4), torch.randn(5, 4, 3))
    with pytest.raises(ValueError, match=r"\[3, 4, 7, 9\] @ \[8, 2\]"): fm @ torch.randn(8, 2, **f64)
    with pytest.raises(ValueError, match="square AB"): fm.BA
    with pytest.raises(ValueError, match="square AB"): fm.eigenvalues
    with pytest.raises(TypeError, match="use `@`"): fm * torch.ones(3)

# ---------------------------------------------------------------- model_weights on every tiny architecture

def tiny64(arch, **kw):
    "float64, eager, with random norm weights and biases (the tiny models start them at 1 and 0, hiding mistakes)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = tiny_model(arch, seed=1, attn_implementation="eager", **kw).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1: p.add_(torch.randn(p.shape, generator=g, **f64) * 0.5)
    return m

def record(m, ids):
    "Input and output of every module, and the q, k, v `[batch pos head d_head]` each eager attention call received"
    rec, qkv, hs = {}, {}, []
    def keep(name):
        def f(mod, args, kwargs, out): rec[name] = (args[0] if args else kwargs.get("hidden_states"), out[0] if isinstance(out, tuple) else out)
        return f
    for n, mod in m.named_modules(): hs.append(mod.register_forward_hook(keep(n), with_kwargs=True))
    modeling = sys.modules[type(get_module(blocks(m)[0], arch_spec(m).attn)).__module__]
    eager = modeling.eager_attention_forward
    def spy(module, query, key, value, *args, **kwargs):
        qkv[module.layer_idx] = [t.transpose(1, 2) for t in (query, key, value)]
        return eager(module, query, key, value, *args, **kwargs)
    modeling.eager_attention_forward = spy
    try:
        with torch.no_grad(): logits = m(ids).logits
    finally:
        modeling.eager_attention_forward = eager
        for h in hs: h.remove()
    return rec, qkv, logits

class Run:
    "One recorded forward of a tiny model, and its weights as read by `model_weights`"
    def __init__(self, arch, fold):
        self.m = tiny64(arch)
        self.ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(2))
        self.rec, self.seen, self.logits = record(self.m, self.ids)
        self.sp, self.d, self.fold = arch_spec(self.m), model_dims(self.m), fold
        self.w = {n: model_weights(self.m, fold)[n] for n in WEIGHT_NAMES}
        self.wkv = {n: model_weights(self.m, fold, expand_kv=False)[n] for n in ("W_K", "W_V", "b_K", "b_V")}
        self.tol = NORMED if fold else EXACT
        self.rotary = any(n.endswith("rotary_emb") for n, _ in self.m.named_modules())
    def at(self, l, p): return self.rec[f"{self.sp.layers}.{l}" + (f".{p}" if p else "")]
    def reads(self, l, norm, module):
        "What a sublayer's matrices read: the norm's output, or (folded) the unscaled normalised input of the norm"
        if not self.fold or norm is None: return self.at(l, module)[0]
        return unscaled_norm(get_module(blocks(self.m)[l], norm), self.at(l, norm)[0])

@pytest.fixture(scope="module", params=[(a, f) for a in TINY_ARCHS for f in (False, True)], ids=lambda p: f"{p[0]}-{'fold' if p[1] else 'plain'}")
def run(request): return Run(*request.param)

def test_embeddings(run):
    w, ids = run.w, run.ids
    pos = w["W_pos"][:ids.shape[1]] if w["W_pos"] is not None else 0
    assert maxdiff(w["W_E"][ids] + pos, run.at(0, "")[0]) < EXACT     # what enters block 0 (Gemma's sqrt(d_model) included)

def test_values_keys_queries(run):
    w, wkv, d = run.w, run.wkv, run.d
    g, P = d.n_heads // d.n_kv_heads, slice(0, 1) if run.rotary else slice(None)   # rotary is the identity at position 0
    for l, blk in enumerate(blocks(run.m)):
        attn, (sq, sk, sv) = get_module(blk, run.sp.attn), run.seen[l]
        x = run.reads(l, run.sp.ln1, run.sp.attn)
        proj = lambda W, b: torch.einsum("bpm,hmd->bphd", x, W[l]) + b[l]
        assert maxdiff(proj(wkv["W_V"], wkv["b_V"]), sv) < run.tol
        assert maxdiff(proj(w["W_V"], w["b_V"]), sv.repeat_interleave(g, 2)) < run.tol
        q, k = proj(w["W_Q"], w["b_Q"]), proj(wkv["W_K"], wkv["b_K"])
        assert maxdiff(proj(w["W_K"], w["b_K"]), k.repeat_interleave(g, 2)) < EXACT
        if hasattr(attn, "q_proj"):   # pre-norm, pre-rotary: the projections' own outputs, at every position
            assert maxdiff(q.flatten(-2), run.at(l, f"{run.sp.attn}.q_proj")[1]) < run.tol
            assert maxdiff(k.flatten(-2), run.at(l, f"{run.sp.attn}.k_proj")[1]) < run.tol
        if hasattr(attn, "q_norm"):
            qn = lambda n, t: n(t) if n.weight.numel() == d.d_head else n(t.flatten(-2)).view(t.shape)
            q, k = qn(attn.q_norm, q), qn(attn.k_norm, k)
        assert maxdiff(q[:, P], sq[:, P]) < NORMED and maxdiff(k[:, P], sk[:, P]) < NORMED
        # a query and a key at the same position are turned by the same angle: their product is rotary-free
        assert maxdiff((q * k.repeat_interleave(g, 2)).sum(-1), (sq * sk.repeat_interleave(g, 2)).sum(-1)) < NORMED

def test_output_projection(run):
    w, d = run.w, run.d
    for l, blk in enumerate(blocks(run.m)):
        attn = get_module(blk, run.sp.attn)
        z, o = run.at(l, f"{run.sp.attn}." + next(n for n in ("o_proj", "c_proj", "dense") if hasattr(attn, n)))
        out = torch.einsum("bphd,hdm->bpm", z.view(*z.shape[:2], d.n_heads, d.d_head), w["W_O"][l]) + w["b_O"][l]
        assert maxdiff(out, o) < EXACT

def test_mlp(run):
    w = run.w
    for l, blk in enumerate(blocks(run.m)):
        mlp = get_module(blk, run.sp.mlp)
        act = getattr(mlp, "act_fn", None) or getattr(mlp, "act", None) or getattr(mlp, "activation_fn")
        x = run.reads(l, run.sp.ln2, run.sp.mlp)
        h = x @ w["W_in"][l] + w["b_in"][l]
        h = act(x @ w["W_gate"][l] + w["b_gate"][l]) * h if run.d.gated else act(h)
        assert (w["W_gate"] is None) == (not run.d.gated)
        assert maxdiff(h @ w["W_out"][l] + w["b_out"][l], run.at(l, run.sp.mlp)[1]) < run.tol

def test_unembed(run):
    x_in, x_out = run.rec[run.sp.ln_final]
    x = unscaled_norm(get_module(run.m, run.sp.ln_final), x_in) if run.fold else x_out
    lg = x @ run.w["W_U"] + run.w["b_U"]
    if cap := getattr(run.m.config, "final_logit_softcapping", None): lg = torch.tanh(lg / cap) * cap   # Gemma 2
    assert maxdiff(lg, run.logits) < run.tol

def test_circuits_are_the_products(run):
    w = run.w
    assert maxdiff(w["OV"].AB, w["W_V"] @ w["W_O"]) < EXACT and maxdiff(w["QK"].AB, w["W_Q"] @ w["W_K"].mT) < EXACT
    assert w["OV"].shape == w["QK"].shape == (run.d.n_layers, run.d.n_heads, run.d.d_model, run.d.d_model)

# ---------------------------------------------------------------- conventions, liveness, errors

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_norm_affine_reproduces_every_norm(arch):
    m = tiny64(arch)
    x = torch.randn(5, m.config.hidden_size if hasattr(m.config, "hidden_size") else 64, **f64)
    norms = [mod for mod in m.modules() if "Norm" in type(mod).__name__ and getattr(mod, "weight", None) is not None
             and mod.weight.numel() == x.shape[-1]]
    assert norms
    with torch.no_grad():
        for norm in norms:
            s, b = norm_affine(norm)
            assert maxdiff(unscaled_norm(norm, x) * s + (0 if b is None else b), norm(x)) < NORMED, type(norm).__name__

def test_gemma_embedding_scale_and_tied_unembedding():
    m = tiny64("gemma")
    w, E = model_weights(m), m.model.embed_tokens.weight
    assert maxdiff(w.W_E, E * 64 ** 0.5) < EXACT and torch.equal(w.W_U, E.detach().T)
    assert w.W_U.untyped_storage().data_ptr() == E.untyped_storage().data_ptr()          # a view of the tied parameter
    assert any("sqrt(d_model)" in n for n in w.fold_notes)

def test_views_are_live_and_folding_leaves_the_model_alone():
    m = tiny64("qwen2")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    w, wf = model_weights(m), model_weights(m, fold_norms=True)
    for n in WEIGHT_NAMES: wf[n]
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    with torch.no_grad(): m.model.layers[0].self_attn.k_proj.bias[16 + 3] += 2.    # KV head 1, d_head 3
    assert maxdiff(w.b_K[0, 2:4, 3] - before["model.layers.0.self_attn.k_proj.bias"][19], torch.full((2,), 2.)) < EXACT
    assert not w.W_Q.requires_grad

def test_multi_query_and_no_prenorm():
    m = tiny64("llama", n_kv_heads=1)
    w, wkv = model_weights(m), model_weights(m, expand_kv=False)
    assert wkv.W_V.shape == (2, 1, 64, 16) and w.W_V.shape == (2, 4, 64, 16)
    assert all(torch.equal(w.W_V[:, h], wkv.W_V[:, 0]) for h in range(4))
    o = tiny64("olmo2")                                 # no norm before attention or MLP: nothing to fold into W_Q, W_in
    assert torch.equal(model_weights(o, fold_norms=True).W_Q, model_weights(o).W_Q)
    assert not torch.equal(model_weights(o, fold_norms=True).W_U, model_weights(o).W_U)

@pytest.mark.parametrize("arch,expect", [("gemma2", ["post_attention_layernorm", "soft-capped"]), ("qwen3", ["q_norm", "per head"]),
                                         ("olmo2", ["over all heads together", "No norm before"]), ("gpt_neox", ["parallel"]),
                                         ("gpt2", ["LayerNorm", "W_pos"]), ("llama", ["Rotary"])])
def test_fold_notes(arch, expect):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore"); notes = " ".join(model_weights(tiny_model(arch)).fold_notes)
    assert "never folded" in notes and all(e in notes for e in expect), notes

def test_repr_and_errors():
    m = tiny_model("gpt2")
    w = model_weights(m)
    text, page = repr(w), w._repr_html_()
    assert "W_gate" in text and "not a gated MLP" in text and "[layer head d_model d_head] = (2, 4, 64, 16)" in text
    assert "<table>" in page and "&lt;" not in text
    with pytest.raises(KeyError, match="it has: W_E"): w["W_X"]
    with pytest.raises(TypeError, match="expand_kv is True or False"): model_weights(m, expand_kv="no")
    with pytest.raises(ValueError, match="Supported"): model_weights(nn.Linear(2, 2))

def test_half_precision():
    m = tiny_model("llama", dtype=torch.bfloat16)
    w = model_weights(m, fold_norms=True)
    assert w.W_Q.dtype == torch.bfloat16 and w.OV.S.dtype == torch.float32 and w.OV.S.shape == (2, 4, 16)

# ---------------------------------------------------------------- SmolLM2

@pytest.mark.slow
def test_smollm2(smollm2):
    w = model_weights(smollm2)
    assert w.W_Q.shape == (30, 9, 576, 64) and model_weights(smollm2, expand_kv=False).W_K.shape == (30, 3, 576, 64)
    assert w.W_in.shape == w.W_gate.shape == (30, 576, 1536) and w.W_U.shape == (576, 49152)
    ov = w.OV[18, 6]
    assert maxdiff(ov.S, torch.linalg.svdvals(ov.AB.double())[:64]) < 1e-3
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    rec, _, logits = record(smollm2, ids)                 # module hooks only matter here (SDPA: the eager spy stays idle)
    wf, l = model_weights(smollm2, fold_norms=True), 18
    x = unscaled_norm(smollm2.model.layers[l].input_layernorm, rec[f"model.layers.{l}.input_layernorm"][0])
    q = torch.einsum("bpm,hmd->bphd", x, wf.W_Q[l]).flatten(-2)
    assert maxdiff(q, rec[f"model.layers.{l}.self_attn.q_proj"][1]) < 1e-4
    x = unscaled_norm(smollm2.model.norm, rec["model.norm"][0])
    assert maxdiff(x @ wf.W_U + wf.b_U, logits) < 1e-3
