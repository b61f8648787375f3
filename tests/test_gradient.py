"""Head-gate gradients and Fisher scores against independent references.

References: finite differences of the loss in float64 with one head's slice of the output projection's input
scaled by 1 ± ε through a plain PyTorch pre-hook; the same gate put there by hand and differentiated one
sequence at a time (the per-sample loop behind `grad_abs` and `fisher`); a hand-computed Spearman with ties."""
import math, pytest, torch
from headscope.models import tiny_model
from headscope.arch import arch_spec, get_module, blocks, model_dims
from headscope.data.needles import text_tokens
from headscope.heads.gradient import gradient_importance, GradientImportance, GRADIENT_SCORES
from headscope.causal.metrics import agreement
from _checks import assert_no_hooks, O_PROJ

def _proj(model, l):
    "Layer `l`'s output projection, whose input is `z` flattened over heads"
    arch = model.config.model_type
    return getattr(get_module(blocks(model)[l], arch_spec(model).attn), O_PROJ.get(arch, "o_proj"))

def _loss(model, ids, gates=None, scale=None):
    "Mean next-token loss of a plain HF forward; `gates` {layer: [head] tensor} or `scale` (layer, head, s) on the projection input, or neither"
    H, hs = model_dims(model).n_heads, []
    def pre(l):
        def f(mod, args):
            x = args[0].unflatten(-1, (H, -1))                       # [batch pos head d_head]
            if gates is not None: x = x * gates[l][:, None]
            else:
                s = torch.ones(H, dtype=x.dtype); s[scale[1]] = scale[2]; x = x * s[:, None]
            return (x.flatten(-2),)
        return f
    for l in (list(gates) if gates is not None else [scale[0]] if scale is not None else []): hs.append(_proj(model, l).register_forward_pre_hook(pre(l)))
    try:
        with torch.set_grad_enabled(gates is not None): lg = model(ids).logits[:, :-1]
    finally:
        for h in hs: h.remove()
    lp = torch.log_softmax(lg.double(), -1)
    return -lp.gather(-1, ids[:, 1:, None])[..., 0].mean()

def _per_row_reference(model, ids):
    "∂L_row/∂g `[batch layer head]`, one sequence and one plain autograd call at a time"
    d, out = model_dims(model), []
    for b in range(len(ids)):
        g = {l: torch.ones(d.n_heads, dtype=next(model.parameters()).dtype, requires_grad=True) for l in range(d.n_layers)}
        out.append(torch.stack(torch.autograd.grad(_loss(model, ids[b:b + 1], gates=g), [g[l] for l in range(d.n_layers)])))
    return torch.stack(out).double()

@pytest.fixture(scope="module")
def gqa64():
    "Tiny Llama in float64 with grouped-query attention (4 query heads, 2 KV heads), its RMSNorms in float64 too"
    m = tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2, dtype=torch.float64, seed=1)
    for mod in m.modules():      # transformers' LlamaRMSNorm rounds through float32, which would drown a finite difference
        if type(mod).__name__ == "LlamaRMSNorm":
            mod.forward = lambda x, mod=mod: mod.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)
    return m

def test_gate_grad_matches_finite_differences(gqa64):
    ids = text_tokens(gqa64.tokenizer, 3, 14, seed=2)
    r = gradient_importance(gqa64, ids, n_samples=0, progress=False)
    for l, h in [(0, 0), (0, 3), (1, 1), (1, 2)]:
        D = lambda e: float(_loss(gqa64, ids, scale=(l, h, 1 + e)) - _loss(gqa64, ids, scale=(l, h, 1 - e))) / (2 * e)
        fd = D(1e-5)                             # central difference: O(ε²) = 1e-10, rounding 1e-16 / ε = 1e-11
        assert math.isclose(float(r.gate_grad[l, h]), fd, rel_tol=1e-7, abs_tol=1e-10), (l, h, float(r.gate_grad[l, h]), fd)
        assert math.isclose(float(r.scores["grad_loss"][l, h]), -fd, rel_tol=1e-7, abs_tol=1e-10)

@pytest.mark.filterwarnings("ignore:.*no SDPA attention")
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "gpt_neox"])
def test_per_sequence_scores_match_a_per_sample_loop(arch):
    m = tiny_model(arch, n_layers=2, n_heads=4, dtype=torch.float64, seed=3)
    ids = text_tokens(m.tokenizer, 5, 11, seed=4)
    r = gradient_importance(m, ids, n_samples=0, batch_size=2, progress=False)     # three chunks of rows
    ref = _per_row_reference(m, ids)
    assert torch.allclose(r.per_seq.double(), ref, rtol=1e-10, atol=1e-14)
    assert torch.allclose(r.scores["grad_abs"].double(), ref.abs().mean(0), rtol=1e-10, atol=1e-14)
    assert torch.allclose(r.scores["fisher"].double(), ref.pow(2).mean(0), rtol=1e-10, atol=1e-16)
    assert torch.allclose(r.gate_grad.double(), ref.mean(0), rtol=1e-10, atol=1e-14)
    assert math.isclose(r.loss, float(_loss(m, ids)), rel_tol=1e-9)

def test_bf16_model_reduces_in_float32():
    m32 = tiny_model("llama", n_layers=2, n_heads=4, seed=5)
    m16 = tiny_model("llama", n_layers=2, n_heads=4, seed=5, dtype=torch.bfloat16)
    ids = text_tokens(m32.tokenizer, 4, 24, seed=6)
    a = gradient_importance(m32, ids, n_samples=2, progress=False)
    b = gradient_importance(m16, ids, n_samples=2, progress=False)
    for k in GRADIENT_SCORES: assert b.scores[k].dtype == torch.float32 and b.scores[k].isfinite().all(), k
    assert agreement(b.scores["grad_loss"], a.scores["grad_loss"])["pearson"] > 0.9     # bf16 rounding, not a different quantity

def test_state_restored_and_no_hooks_left(gqa64):
    m = tiny_model("llama", n_layers=2, n_heads=4, seed=7)
    ps = list(m.parameters())
    for i, p in enumerate(ps): p.requires_grad_(i % 2 == 0)        # a mix, as after partial freezing
    before = [p.requires_grad for p in ps]
    m.train(); blocks(m)[1].eval()                                  # a mix of modes too
    modes = [x.training for x in m.modules()]
    ids = text_tokens(m.tokenizer, 2, 10)
    with torch.no_grad(): r = gradient_importance(m, ids, n_samples=1, progress=False)   # works under no_grad
    assert r.fisher_kl is not None and (r.fisher_kl >= 0).all()
    assert [p.requires_grad for p in ps] == before and all(p.grad is None for p in ps)
    assert [x.training for x in m.modules()] == modes
    assert_no_hooks(m)
    boom = blocks(m)[1].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("a failing forward")))
    with pytest.raises(RuntimeError, match="a failing forward"): gradient_importance(m, ids, progress=False)
    boom.remove()
    assert [p.requires_grad for p in ps] == before and [x.training for x in m.modules()] == modes
    assert_no_hooks(m)

def test_bad_input_refused_before_any_forward(gqa64):
    calls = []
    h = gqa64.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = text_tokens(gqa64.tokenizer, 2, 8)
    try:
        for bad, kw, msg in [(ids.float(), {}, "integers"), (ids[None], {}, r"\[batch pos\]"), (ids[:0], {}, "at least one row"), (ids[:, :1], {}, "at least 2"),
                             (ids + 1000, {}, "vocabulary"), (ids, dict(n_samples=-1), "n_samples"), (ids, dict(n_samples=True), "n_samples"),
                             (ids, dict(batch_size=0), "batch_size")]:
            with pytest.raises((ValueError, TypeError), match=msg): gradient_importance(gqa64, bad, progress=False, **kw)
    finally: h.remove()
    assert not calls

def test_spearman_with_ties_by_hand():
    # ranks of a = [1, 2, 2, 3] are [0, 1.5, 1.5, 3] (the tie shares its average); of b, [0, 2, 1, 3]; centred:
    # [-1.5, 0, 0, 1.5] and [-1.5, .5, -.5, 1.5] -> 4.5 / sqrt(4.5 · 5)
    a, b = torch.tensor([[1., 2.], [2., 3.]]), torch.tensor([[10., 30.], [20., 40.]])
    got = agreement(a, b, k=1)
    assert math.isclose(got["spearman"], 4.5 / math.sqrt(4.5 * 5), rel_tol=1e-12)
    assert got["topk_abs"] == 1.0                       # the top cell of both holds 3 and 40
    assert agreement(torch.tensor([4., 3., 2., 1.]), torch.tensor([1., 2., 3., 4.]), k=1)["spearman"] == pytest.approx(-1.0, abs=1e-12)

def test_compare_table(gqa64):
    ids = text_tokens(gqa64.tokenizer, 2, 10)
    r = gradient_importance(gqa64, ids, n_samples=1, progress=False)
    exact = {"loss_zero": r.scores["grad_loss"].clone(), "kl_zero": -r.scores["grad_loss"]}
    df = r.compare(exact, k=3)
    assert len(df) == 4 * 2 and set(df["exact"]) == set(exact)
    row = lambda e, x: df[(df.estimate == e) & (df.exact == x)].iloc[0]
    assert math.isclose(row("grad_loss", "loss_zero").spearman, 1.0) and math.isclose(row("grad_loss", "kl_zero").spearman, -1.0)
    assert "L" in repr(r) and "hs-heads" in r._repr_html_()
