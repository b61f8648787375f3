"CD-T (`headscope.causal.cdt`): exact splits on several architectures, toys with known answers, hooks gone, errors early"
import pytest, torch
from headscope.models import tiny_model
from headscope.cache import run_with_cache
from headscope.causal.cdt import contextual_decomposition, cdt_head_contributions, cd_t_circuit, _Engine, _inputs
from headscope.causal.dla import direct_logit_attribution

ARCHS = ("llama", "gpt2", "qwen2", "gpt_neox", "phi3", "olmo2", "gemma2")

def _model(arch, dtype=torch.float32, n_layers=3, seed=1, biases=True, **kw):
    "A tiny model; biases made random (HF initialises them to zero) so that their handling is tested"
    m = tiny_model(arch, n_layers=n_layers, seed=seed, dtype=dtype, **kw)
    if biases:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("bias") and "norm" not in n and "ln" not in n: p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m

def _ids(n=2, L=9, seed=0): return torch.randint(3, 200, (n, L), generator=torch.Generator().manual_seed(seed))

def _real(m, ids):
    c = run_with_cache(m, ids, names="blocks.*.hook_resid_post")
    return torch.stack([c["resid_post", l] for l in range(m.config.num_hidden_layers)], 1), c.logits

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parts_sum_to_the_real_run(arch, dtype):
    "rel + irrel is the real hook_resid_post at every layer (plain HF forward), for head, multi-head and embedding sources"
    m, ids = _model(arch, dtype), _ids()
    real, logits = _real(m, ids)
    tol = 1e-4 if dtype == torch.float32 else 1e-6   # HF's RMSNorm computes in float32 even in a float64 model
    for src, stab in (("L1H2", True), ([(0, 1), (2, 0)], False), ("embed", True)):
        d = contextual_decomposition(m, ids, src, stabilise=stab)
        err = (d.rel + d.irrel - real).abs().max() / real.abs().max()
        assert err < tol, (src, float(err))
        assert float(d.rel[:, -1].abs().max()) > 1e-4
        if arch != "gemma2":                           # Gemma 2 soft-caps its logits: CD-T splits them before the tanh
            assert (d.rel_logits + d.irrel_logits - logits).abs().max() < 10 * tol * logits.abs().max()
    if arch in ("gpt2", "gpt_neox") and dtype == torch.float64:   # LayerNorm archs compute in float64 throughout: exact to rounding
        assert (d.rel + d.irrel - real).abs().max() < 1e-12

@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_all_embeddings_leave_nothing_but_biases(arch):
    "With the source = all of the embeddings and no biases, irrel is 0 everywhere; with biases it is not"
    ids = _ids()
    assert float(contextual_decomposition(_model(arch, biases=False), ids, "embed").irrel.abs().max()) == 0.
    if arch != "llama":
        assert float(contextual_decomposition(_model(arch, biases=True), ids, "embed").irrel.abs().max()) > 1e-3

def test_span_is_causal():
    "Positions before an embedding span owe it nothing; the span itself owes it most"
    d = contextual_decomposition(_model("gpt2"), _ids(), "embed", pos=[4, 5])
    assert float(d.rel[:, :, :4].abs().max()) < 1e-6
    assert float(d.scores[0, 4:6].min()) > 0.1 and float(d.scores[-1, 6:].min()) > 1e-3

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_layer_linear_toy_equals_dla(arch):
    "MLP output zeroed: with frozen patterns and norms the model is linear, so CD-T = direct logit attribution (computed independently)"
    m = _model(arch, torch.float64, n_layers=1, seed=3, initializer_range=0.2)
    with torch.no_grad():
        down = m.model.layers[0].mlp.down_proj if arch == "llama" else m.transformer.h[0].mlp.c_proj
        down.weight.zero_()
        if down.bias is not None: down.bias.zero_()
    ids = _ids(3, 8, 1)
    hc = cdt_head_contributions(m, ids, 65, 66, stabilise=False, progress=False)
    dla = direct_logit_attribution(m, ids, 65, 66)
    torch.testing.assert_close(hc.per_prompt.double(), dla.heads.double(), atol=1e-6, rtol=1e-5)
    assert float(hc.scores.abs().max()) > 0.05

def test_zeroed_head_contributes_nothing():
    "A head whose W_O is zero contributes nothing (to rounding: rel is read as full - irrel), to the logits and to every later head; others do"
    for arch, dtype, tol in (("gpt2", torch.float64, 1e-12), ("llama", torch.float32, 1e-5)):   # (HF's RMSNorm is float32 even in float64)
        m = _model(arch, dtype, n_layers=3, seed=3, initializer_range=0.2)
        with torch.no_grad():                                                          # L1H2 (d_head 16)
            if arch == "llama": m.model.layers[1].self_attn.o_proj.weight[:, 32:48] = 0
            else: m.transformer.h[1].attn.c_proj.weight[32:48] = 0                     # Conv1D: [in out]
        hc = cdt_head_contributions(m, _ids(3, 8, 1), 65, 66, progress=False)
        big, pair = float(hc.scores.abs().max()), hc.pair.nan_to_num()
        assert float(hc.per_prompt[:, 1, 2].abs().max()) <= tol * big
        assert float(pair[:, hc.heads.index("L1H2")].abs().max()) <= tol * float(pair.abs().max())
        assert big > 1e-3 and float(pair.abs().max()) > 1e-4

def test_matches_the_two_row_reference():
    "rel read as full - irrel equals rel carried in rows of its own with P11's rules applied to it (tests/_cdt_reference.py)"
    from _cdt_reference import reference_split
    for arch in ("llama", "gpt2", "gpt_neox", "phi3", "gemma2"):
        m, ids = _model(arch, torch.float64), _ids()
        tol = 1e-12 if arch in ("gpt2", "gpt_neox") else 1e-6      # HF's RMSNorm computes in float32 even in a float64 model
        for heads, stab in (([(1, 2)], True), ([(0, 1), (2, 0)], False)):
            rel, irrel = reference_split(m, ids, heads, stabilise=stab)
            d = contextual_decomposition(m, ids, heads, stabilise=stab)
            scale = float(d.full.abs().max())
            assert float((d.rel[:, heads[0][0]:] - rel).abs().max()) < tol * scale, (arch, heads)
            assert float((d.irrel[:, heads[0][0]:] - irrel).abs().max()) < tol * scale, (arch, heads)
            assert float(rel[:, -1].abs().max()) > 1e-4

def test_sweep_matches_single_decompositions():
    "Each cell of the batched sweep (heads of a layer together, from that layer up) is the one-source decomposition's logit difference"
    m, ids = _model("qwen2", torch.float64), _ids(2, 7)
    hc = cdt_head_contributions(m, ids, 65, [66, 70], layers=[0, 2], pos=[-1, -2], batch_size=3, progress=False)
    assert hc.per_prompt.shape == (2, 2, 4) and hc.axis_index()["layer"] == [0, 2]
    for l, h in ((0, 1), (2, 3)):
        d = contextual_decomposition(m, ids, (l, h), pos=[5, 6])
        rel = d.rel_logits[:, -1, 65] - d.rel_logits[:, -1, torch.tensor([66, 70])].diagonal()
        torch.testing.assert_close(hc.per_prompt[:, [0, 2].index(l), h].double(), rel, atol=1e-5, rtol=1e-5)
    real = _real(m, ids)[1][:, -1]
    torch.testing.assert_close(hc.total, (real[:, 65] - real[torch.arange(2), torch.tensor([66, 70])]).double())

def test_circuit_search():
    "Top-k heads to the logits first, then for each target its k strongest earlier heads, with the sweep's own scores"
    m, ids = _model("llama", n_layers=3, seed=3, initializer_range=0.2), _ids(2, 8, 1)
    c = cd_t_circuit(m, ids, 65, 66, k=2, depth=3, progress=False)
    hc = c.contributions
    first = [e for e in c.edges if e[1] == "logits"]
    assert [e[0] for e in first] == [t.name for t in hc.top(2)]
    P, lay = hc.pair.mean(0), lambda n: int(n[1:n.index("H")])
    for s, t, v in c.edges:
        if t != "logits":
            assert lay(s) < lay(t) and abs(v - float(P[hc.heads.index(s), hc.heads.index(t)])) < 1e-6
    assert {n for e in c.edges for n in e[:2] if n != "logits"} == set(c.nodes)
    assert "hs-circuit" in c._repr_html_()

def test_hooks_removed_even_when_a_run_fails():
    "Nothing stays attached, and the attention implementation comes back, after a success and after an exception"
    m, ids = _model("gpt2"), _ids()
    impl = m.config._attn_implementation
    contextual_decomposition(m, ids, "L0H0")
    def boom(act, hook): raise RuntimeError("boom")
    eng = _Engine(m, _inputs(m, ids))
    h0 = eng.resid_pre(0)
    with pytest.raises(RuntimeError, match="boom"): eng.run(0, h0, 1, [("blocks.1.attn.hook_z", boom)])
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())
    assert m.config._attn_implementation == impl

def test_bad_input_fails_before_any_forward():
    m, ids = _model("llama"), _ids()
    calls = []
    h = m.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for f, msg in ((lambda: contextual_decomposition(m, ids, "MLP0"), "MLP cannot be a source"),
                       (lambda: contextual_decomposition(m, ids, (3, 0)), "layer 3 does not exist"),
                       (lambda: contextual_decomposition(m, ids, "L0H0", pos=12), "positions 0..8"),
                       (lambda: cdt_head_contributions(m, ids, "two tokens?", progress=False), "answer"),
                       (lambda: cdt_head_contributions(m, ["ab", "abcd"], 65, progress=False), "one token length"),
                       (lambda: cd_t_circuit(m, ids, 65, depth=0), "positive integers")):
            with pytest.raises((ValueError, IndexError, TypeError), match=msg): f()
    finally: h.remove()
    assert not calls

@pytest.mark.slow
def test_smollm2_early_head_stays_finite(smollm2):
    "SmolLM2's massive activation (layer 11) makes the plain rules overflow for a layer-0 source; P11's sign rule keeps the split finite and exact"
    p = "When Mary and John went to the store, John gave a drink to"
    d = contextual_decomposition(smollm2, p, "L0H0")
    assert torch.isfinite(d.rel).all() and torch.isfinite(d.rel_logits).all()
    assert float((d.rel + d.irrel - d.full).abs().max() / d.full.abs().max()) < 1e-5
    real, _ = _real(smollm2, smollm2.tokenizer(p, return_tensors="pt")["input_ids"])
    assert float((d.full - real).abs().max() / real.abs().max()) < 1e-5
    plain = contextual_decomposition(smollm2, p, "L0H0", stabilise=False)
    assert not torch.isfinite(plain.rel[:, -1]).all()      # documented: why stabilise=True is the default
