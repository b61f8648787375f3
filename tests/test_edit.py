"Steer2Edit (headscope.probes.edit): hook-applied edit == weight-applied edit == a plain-torch W + delta; exact undo; errors before any forward"
import copy
import pytest, torch
from headscope.models import tiny_model
from headscope.tokens import to_inputs
from headscope.hooking import hooks
from headscope.probes.steering import diff_in_means, steering_vector
from headscope.probes.edit import component_attribution, steer_to_edit, rank1_edit, WeightEdit, edit_sweep

POS, NEG = ["the cat sat down", "a good dog ran"], ["the bad rat sat", "a sad hog ran off"]
TEXT = ["the quick brown fox", "hello there"]

def _setup(arch, dtype=torch.float64, layers=(0, 1), seed=0):
    m = tiny_model(arch, n_layers=2, seed=seed, dtype=dtype)
    v = diff_in_means(m, POS, NEG, layers=list(layers), progress=False)
    return m, v, component_attribution(m, v, POS, NEG, progress=False)

def _by_hand(model, e):
    "A deep copy with every W_c + lam k u^T written by hand into the Hugging Face weights (no headscope helper)"
    m2, d = copy.deepcopy(model), model.config
    dh = d.hidden_size // d.num_attention_heads
    with torch.no_grad():
        for c, u, k, lam in zip(e.components, e.u, e.k, e.lam.tolist()):
            if c.startswith("MLP"):
                l = int(c[3:]); blk = m2.transformer.h[l] if hasattr(m2, "transformer") else m2.model.layers[l]
                if hasattr(m2, "transformer"): blk.mlp.c_proj.weight += lam * torch.outer(k, u)       # Conv1D [in out]
                else: blk.mlp.down_proj.weight += lam * torch.outer(u, k)                              # Linear [out in]
            else:
                l, h = map(int, c[1:].split("H"))
                if hasattr(m2, "transformer"): m2.transformer.h[l].attn.c_proj.weight[h*dh:(h+1)*dh] += lam * torch.outer(k, u)
                else: m2.model.layers[l].self_attn.o_proj.weight[:, h*dh:(h+1)*dh] += lam * torch.outer(u, k)
    return m2

@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_hook_equals_weight_equals_plain_torch(arch):
    m, v, at = _setup(arch)
    e = steer_to_edit(m, at, strength=3., components=["L1H0", "L0H2", "MLP1", "MLP0"])   # heads and MLPs of both layers
    x = to_inputs(m, TEXT, padding_side="left")
    with torch.no_grad():
        base = m(**x).logits
        ref = _by_hand(m, e)(**x).logits
        with e.applied(m): lw = m(**x).logits
        with hooks(m, e.hooks(m)): lh = m(**x).logits
        after = m(**x).logits
    assert (ref - base).abs().max() > 1e-3                      # the edit does something
    torch.testing.assert_close(lw, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(lh, ref, rtol=0, atol=1e-10)
    assert torch.equal(after, base)

@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "olmo2", "phi3", "gpt_neox"])
def test_undo_is_bit_exact(arch):
    m, v, at = _setup(arch, dtype=torch.float32, layers=(1,), seed=1)
    W0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    e = steer_to_edit(m, at, m=5, strength=7.)
    with e.applied(m):
        assert any(not torch.equal(W0[n], p) for n, p in m.named_parameters())
        e2 = (e * 0.3).apply(m)
        with pytest.raises(RuntimeError, match="Undo the later edit"): e.undo(m)
        e2.undo(m)
    assert all(torch.equal(W0[n], p) for n, p in m.named_parameters())
    with pytest.raises(RuntimeError):                                   # restored even when the block raises
        with e.applied(m): raise RuntimeError("boom")
    assert all(torch.equal(W0[n], p) for n, p in m.named_parameters())

def test_calibration_adds_strength_v_on_the_mean_input():
    m, v, at = _setup("llama")
    e = steer_to_edit(m, at, m=6, strength=2.5)
    added = {}
    for c in e.components:
        l = int(c[3:]) if c.startswith("MLP") else int(c[1:].split("H")[0])
        added[l] = added.get(l, 0) + at.x_mean[c] @ e.delta(c)
    for l, a in added.items(): torch.testing.assert_close(a, 2.5 * v.vectors[l].double(), rtol=0, atol=1e-9)

def test_save_load_roundtrip(tmp_path):
    m, v, at = _setup("llama")
    e = steer_to_edit(m, at, m=3, strength=1.)
    e.save(tmp_path / "e.safetensors"); e2 = WeightEdit.load(tmp_path / "e.safetensors", m)
    assert e2.components == e.components and torch.equal(e2.u, e.u) and torch.equal(e2.lam, e.lam)
    assert all(torch.equal(a, b) for a, b in zip(e.k, e2.k))
    with pytest.raises(ValueError, match="other sizes|made for a model"):
        WeightEdit.load(tmp_path / "e.safetensors", tiny_model("llama", n_layers=3))

def test_errors_before_any_forward():
    m, v, at = _setup("llama")
    calls = []
    h = m.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for kw, msg in ((dict(m=0), "m must be an int"), (dict(m=11), "m must be an int"), (dict(m=True), "m must be an int"),
                        (dict(strength=float("nan")), "strength must be finite"), (dict(strength="big"), "strength must be a real number"),
                        (dict(components=["L5H0"]), "were not scored"), (dict(components=["head0"]), "were not scored")):
            with pytest.raises((ValueError, TypeError), match=msg): steer_to_edit(m, at, **kw)
        with pytest.raises(ValueError, match="Unknown component"): rank1_edit(m, "attn0", torch.ones(64), torch.ones(16))
        with pytest.raises(IndexError, match="head 7 does not exist"): rank1_edit(m, "L1H7", torch.ones(64), torch.ones(16))
        with pytest.raises(ValueError, match="input width"): rank1_edit(m, "MLP1", torch.ones(64), torch.ones(16))
        for kw, msg in ((dict(m=0), "m must be an int"), (dict(components=["MLP9"]), "were not scored")):
            with pytest.raises(ValueError, match=msg): edit_sweep(m, v, at, [0, 1], ["the cat"], (["a"], ["x"]), "the dog ran", **kw)
        with pytest.raises(ValueError, match=r"strengths\[1\] must be finite"): edit_sweep(m, v, at, [0, float("inf")], ["the cat"], (["a"], ["x"]), "the dog ran")
        with pytest.raises(ValueError, match="has no direction"): component_attribution(m, steering_vector(torch.ones(64), layers=1), POS, NEG, layers=[0], progress=False)
        with pytest.raises(ValueError, match="`negative` is empty"): component_attribution(m, v, POS, [], progress=False)
        assert not calls
    finally: h.remove()

def test_sandwich_hooks_refuse_mlp_but_weights_work():
    m, v, at = _setup("gemma2", dtype=torch.float32, layers=(1,))
    e = steer_to_edit(m, at, components=["MLP1", "L1H0"])
    with pytest.raises(ValueError, match="apply\\(\\)"): e.hooks(m)
    x = to_inputs(m, TEXT, padding_side="left")
    with torch.no_grad():
        ref = _by_hand_gemma(m, e)(**x).logits
        with e.applied(m): lw = m(**x).logits
    torch.testing.assert_close(lw, ref, rtol=0, atol=1e-5)

def _by_hand_gemma(model, e):
    m2, dh = copy.deepcopy(model), model.config.head_dim
    with torch.no_grad():
        for c, u, k, lam in zip(e.components, e.u, e.k, e.lam.tolist()):
            if c.startswith("MLP"): m2.model.layers[int(c[3:])].mlp.down_proj.weight += (lam * torch.outer(u, k)).float()
            else:
                l, h = map(int, c[1:].split("H")); m2.model.layers[l].self_attn.o_proj.weight[:, h*dh:(h+1)*dh] += (lam * torch.outer(u, k)).float()
    return m2

@pytest.mark.slow
def test_smollm2_edit_apply_undo_and_hooks(smollm2):
    P, N = ["The interview went brilliantly. I feel", "My team won the final. I feel"], ["The interview went horribly. I feel", "My team lost the final. I feel"]
    v = diff_in_means(smollm2, P, N, layers=12, progress=False).normalised()
    at = component_attribution(smollm2, v, P, N, progress=False)
    e = steer_to_edit(smollm2, at, m=3, strength=16.)
    W0 = {n: p.detach().clone() for n, p in smollm2.named_parameters() if ".12." in n}
    x = to_inputs(smollm2, ["The weather today is"])
    with torch.no_grad():
        with e.applied(smollm2): lw = smollm2(**x).logits
        with hooks(smollm2, e.hooks(smollm2)): lh = smollm2(**x).logits
    torch.testing.assert_close(lh, lw, rtol=0, atol=2e-3)
    assert all(torch.equal(W0[n], p) for n, p in smollm2.named_parameters() if ".12." in n)
