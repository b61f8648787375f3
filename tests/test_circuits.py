"""Circuits, copying, composition and communication channels (`headscope.weights.circuits`) against float64 dense
recomputations and against the scores and head outputs of real Hugging Face forwards, on tiny models of every architecture."""
import math, re
import pytest
import torch
from headscope.models import tiny_model, TINY_ARCHS
from headscope.arch import arch_spec, blocks, get_module
from headscope.cache import run_with_cache
from headscope.weights.core import model_weights, unscaled_norm
from headscope.weights.circuits import (NotBilinearError, check_bilinear, ov_circuit, qk_circuit, rotary_matrix, full_ov_circuit,
                                        full_qk_circuit, copying_scores, top_copied_tokens, composition_scores, random_composition,
                                        communication_channels)

QK_NORM = ("qwen3", "olmo2", "gemma3")                          # queries and keys normalised: no QK circuit
BILINEAR = tuple(a for a in TINY_ARCHS if a not in QK_NORM)
MATRIX = ("gpt2", "llama", "qwen2", "gpt_neox", "phi3", "gemma")   # dense checks of every function
OVERRIDES = {"gemma2": dict(attn_logit_softcapping=None, attn_implementation="eager")}   # scores are hooked after the softcap; no SDPA

def _model(arch, n_layers=2, **kw): return tiny_model(arch, n_layers=n_layers, **{**OVERRIDES.get(arch, {}), **kw}).double()

def _zero_qk_bias(m):
    "Qwen 2 and GPT-NeoX add query/key biases: the score is then bilinear plus linear terms, so zero them for exact checks"
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias") and any(s in n for s in ("q_proj", "k_proj", "query_key_value", "qkv_proj", "c_attn")): p.zero_()
    return m

def _ids(n=20, seed=0): return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))

def _centre(model):
    "The projector a LayerNorm reader applies to what is written (identity for RMSNorm models)"
    d = model.config.get_text_config().hidden_size
    ln = arch_spec(model).ln1
    is_ln = ln is not None and isinstance(get_module(blocks(model)[0], ln), torch.nn.LayerNorm)
    return torch.eye(d, dtype=torch.float64) - (1 / d if is_ln else 0)

# ---- circuits against real forwards

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_ov_circuit_reproduces_the_head_output(arch):
    m = _model(arch)
    w, l = model_weights(m), 1
    x_name = f"blocks.{l}.ln1.hook_normalized" if arch_spec(m).ln1 else f"blocks.{l}.hook_resid_pre"   # OLMo 2: no norm before attention
    c = run_with_cache(m, _ids(), names=[x_name, f"blocks.{l}.attn.hook_pattern", f"blocks.{l}.attn.hook_z"])
    x, A, z = c[x_name][0], c[f"blocks.{l}.attn.hook_pattern"][0], c[f"blocks.{l}.attn.hook_z"][0]
    for h in range(4):
        ov = ov_circuit(m, l, h, fold_norms=False)
        real = z[:, h] @ w.W_O[l, h]                                   # what head h adds to the residual stream
        pred = A[h] @ (x @ ov.A) @ ov.B + w.b_V[l, h] @ w.W_O[l, h]   # Σ_k A[p, k] x_k W_V W_O, plus the value bias
        torch.testing.assert_close(pred, real, rtol=1e-6, atol=1e-9)

@pytest.mark.parametrize("arch", BILINEAR)
def test_qk_circuit_gives_the_forward_scores_at_every_offset(arch):
    m = _zero_qk_bias(_model(arch))
    ids = _ids(24)
    for l in range(2):
        c = run_with_cache(m, ids, names=[f"blocks.{l}.ln1.hook_normalized", f"blocks.{l}.attn.hook_attn_scores"])
        x, s = c[f"blocks.{l}.ln1.hook_normalized"][0], c[f"blocks.{l}.attn.hook_attn_scores"][0]
        scale = get_module(blocks(m)[l], arch_spec(m).attn).scaling
        for h in (0, 3):
            for d in (0, 1, 4, 7):          # within Gemma 2's 8-token sliding window
                qk = qk_circuit(m, l, h, offset=d, fold_norms=False)
                pred, real = ((x[d:] @ qk.A) @ qk.B * x[:len(x) - d]).sum(-1), s[h].diagonal(-d) / scale
                torch.testing.assert_close(pred, real, rtol=1e-5, atol=1e-5 * float(real.abs().max()))
                if d and rotary_matrix(m, l, d) is not None:     # the circuit of another offset is wrong: the test can fail
                    wrong = qk_circuit(m, l, h, offset=d + 1, fold_norms=False)
                    assert ((x[d:] @ wrong.A) @ wrong.B * x[:len(x) - d]).sum(-1).sub(real).abs().max() > 1e-3 * real.abs().max()

@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gemma"])
def test_folded_qk_circuit_reads_the_unscaled_norm(arch):
    m = _zero_qk_bias(_model(arch))
    if arch == "gpt_neox":   # a LayerNorm bias feeds the queries and keys linearly: zero it too for a pure bilinear score
        with torch.no_grad(): blocks(m)[1].input_layernorm.bias.zero_()
    c = run_with_cache(m, _ids(), names=["blocks.1.hook_resid_pre", "blocks.1.attn.hook_attn_scores"])
    x = unscaled_norm(get_module(blocks(m)[1], arch_spec(m).ln1), c["blocks.1.hook_resid_pre"][0])
    s = c["blocks.1.attn.hook_attn_scores"][0, 2] / get_module(blocks(m)[1], arch_spec(m).attn).scaling
    qk = qk_circuit(m, 1, 2, offset=3)
    torch.testing.assert_close(((x[3:] @ qk.A) @ qk.B * x[:-3]).sum(-1), s.diagonal(-3), rtol=1e-5, atol=1e-6)

# ---- rotary rotations

@pytest.mark.parametrize("arch,kw", [("llama", {}), ("gpt_neox", {}), ("phi3", dict(partial_rotary_factor=0.5)), ("qwen2", {})])
def test_rotary_matrix_is_a_relative_rotation(arch, kw):
    m = _model(arch, **kw)
    R = {d: rotary_matrix(m, 0, d) for d in (0, 2, 3, 5)}
    I = torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(R[0], I, atol=1e-12, rtol=0)
    torch.testing.assert_close(R[5] @ R[5].T, I, atol=1e-6, rtol=0)
    torch.testing.assert_close(R[2] @ R[3], R[5], atol=1e-6, rtol=0)     # rotations by the offset compose
    assert (R[3] - I).abs().max() > 1e-2
    if arch in ("gpt_neox", "phi3"):    # partial rotary: the dimensions past rot_dim do not turn
        c = m.config
        frac = (getattr(c, "rope_parameters", None) or {}).get("partial_rotary_factor") or getattr(c, "partial_rotary_factor", None) or c.rotary_pct
        rot = int(16 * frac)
        assert rot < 16
        torch.testing.assert_close(R[3][rot:, rot:], torch.eye(16 - rot, dtype=torch.float64), atol=1e-12, rtol=0)

def test_models_without_rotary_ignore_the_offset():
    m = _model("gpt2")
    assert rotary_matrix(m, 0, 3) is None
    torch.testing.assert_close(qk_circuit(m, 1, 0, offset=7).AB, qk_circuit(m, 1, 0).AB, rtol=0, atol=0)

# ---- dense recomputation

@pytest.mark.parametrize("arch", MATRIX)
def test_full_circuits_copying_and_copied_tokens_match_dense(arch):
    m, (l, h) = _model(arch), (1, 2)
    w, C = model_weights(m, fold_norms=True), _centre(m)
    full = w.W_E @ w.W_V[l, h] @ w.W_O[l, h] @ C @ w.W_U                       # [d_vocab d_vocab]
    torch.testing.assert_close(full_ov_circuit(m, l, h).AB, full)
    R = rotary_matrix(m, l, 2)
    Rq = w.W_Q[l, h] if R is None else w.W_Q[l, h] @ R
    torch.testing.assert_close(full_qk_circuit(m, l, h, offset=2).AB, w.W_E @ Rq @ w.W_K[l, h].T @ w.W_E.T)
    cs = copying_scores(m)
    for ll in range(2):
        for hh in range(4):
            lam = torch.linalg.eigvals(w.W_E @ w.W_V[ll, hh] @ w.W_O[ll, hh] @ w.W_U)
            torch.testing.assert_close(cs.scores[ll, hh], lam.real.sum() / lam.abs().sum(), rtol=1e-7, atol=1e-8)
    ref = full.diagonal() - full.mean(-1)
    tc = top_copied_tokens(m, l, h, k=7)
    assert tc.ids.tolist() == ref.topk(7).indices.tolist()
    torch.testing.assert_close(tc.diagonal, full.diagonal()[tc.ids])
    assert len(tc.tokens) == 7 and "<table>" in tc._repr_html_()

def _dense_composition(w, C, kind, l1, h1, l2, h2):
    ov1 = w.W_V[l1, h1] @ w.W_O[l1, h1] @ C
    rd = {"Q": w.W_Q[l2, h2] @ w.W_K[l2, h2].T, "K": (w.W_Q[l2, h2] @ w.W_K[l2, h2].T).T,
          "V": w.W_V[l2, h2] @ w.W_O[l2, h2] @ C}[kind]
    return (ov1 @ rd).norm() / (ov1.norm() * rd.norm())

@pytest.mark.parametrize("arch", MATRIX)
@pytest.mark.parametrize("kind", ["Q", "K", "V"])
def test_composition_scores_match_dense(arch, kind):
    m = _model(arch, n_layers=3)
    w, C = model_weights(m, fold_norms=True), _centre(m)
    res = composition_scores(m, kind, progress=False)
    assert res.scores.shape == (3, 4, 3, 4) and res.scores.dtype == torch.float64
    for l1 in range(3):
        for l2 in range(3):
            for h1, h2 in ((0, 1), (3, 3), (2, 0)):
                v = res.scores[l1, h1, l2, h2]
                if l2 <= l1: assert v.isnan(); continue
                torch.testing.assert_close(v, _dense_composition(w, C, kind, l1, h1, l2, h2), rtol=1e-9, atol=1e-12)
    best = res.top(1, reader=(2, 1))[0]
    dense = {(a, b): float(_dense_composition(w, C, kind, a, b, 2, 1)) for a in range(2) for b in range(4)}
    assert best.index == max(dense, key=dense.get) and best.name == f"L{best.index[0]}H{best.index[1]}"
    assert res.top(3)[0].score == float(res.scores.nan_to_num(-1).max())
    assert len(res.to_pandas().query("score == score")) == 16 * 3      # pairs (0,1), (0,2), (1,2) of 4 x 4 heads
    assert "σ above random" in res._repr_html_()

def test_composition_of_some_reader_layers():
    m = _model("llama", n_layers=3)
    full, part = composition_scores(m, "K", progress=False), composition_scores(m, "K", layers=[2], progress=False)
    torch.testing.assert_close(part.scores[:2, :, 2], full.scores[:2, :, 2])
    assert part.scores[:, :, :2].isnan().all()

def test_random_baseline_is_chance_level():
    # independent isotropic matrices: E|AB|^2 = |A|^2 |B|^2 / d_model, so scores sit near 1/sqrt(d_model)
    for d, r in ((64, 16), (256, 32)):
        b = random_composition(d, r, seeds=2)
        assert len(b) == 64 and abs(float(b.mean()) * math.sqrt(d) - 1) < 0.1 and float(b.std()) < 0.2 / math.sqrt(d)

@pytest.mark.parametrize("arch", MATRIX)
@pytest.mark.parametrize("side", ["writer", "reader"])
def test_channels_match_dense_components(arch, side):
    m = _model(arch, n_layers=3)
    w, C = model_weights(m, fold_norms=True), _centre(m)
    ov1, rd = w.W_V[0, 1] @ w.W_O[0, 1] @ C, (w.W_Q[2, 3] @ w.W_K[2, 3].T).T
    U, S, Vh = torch.linalg.svd(ov1 if side == "writer" else rd)
    comps = [S[i] * torch.outer(U[:, i], Vh[i]) for i in range(16)]     # dense rank-1 components of the split head
    score = lambda a, b: (a @ b).norm() / (a.norm() * b.norm())
    ref = torch.stack([score(c, rd) if side == "writer" else score(ov1, c) for c in comps])
    ch = communication_channels(m, (0, 1), (2, 3), "K", side=side)
    torch.testing.assert_close(ch.scores, ref, rtol=1e-8, atol=1e-10)
    contrib = torch.stack([(c @ rd if side == "writer" else ov1 @ c).norm() ** 2 for c in comps])
    torch.testing.assert_close(ch.share, contrib / (ov1 @ rd).norm() ** 2, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(torch.tensor(ch.full, dtype=torch.float64), score(ov1, rd))
    assert ch.baseline_scores.shape == (64, 16) and 1 <= ch.n_components() <= 16
    assert len(communication_channels(m, (0, 1), (2, 3), rank=3).scores) == 3

# ---- bad input

def test_bad_heads_and_layers():
    m = _model("llama")
    for f, msg in ((lambda: ov_circuit(m, 2, 0), "layers 0..1"), (lambda: ov_circuit(m, 0, 4), "heads 0..3"),
                   (lambda: qk_circuit(m, 0, 0, offset=-2), "int >= 0"), (lambda: qk_circuit(m, 0, 0, offset=1.5), "int >= 0"),
                   (lambda: top_copied_tokens(m, 0, 0, k=0), "positive integer"),
                   (lambda: composition_scores(m, "QK"), "one of Q, K, V"), (lambda: composition_scores(m, layers=5), "layers 0..1"),
                   (lambda: communication_channels(m, (1, 0), (1, 1)), "later layer"),
                   (lambda: communication_channels(m, (1, 0), (0, 1)), "later layer"),
                   (lambda: communication_channels(m, (0, 0), (1, 9)), "heads 0..3"),
                   (lambda: communication_channels(m, 0, (1, 0)), "(layer, head)"),
                   (lambda: communication_channels(m, (0, 0), (1, 0), side="both"), "side must be"),
                   (lambda: composition_scores(m, progress=False).top(2, reader=(0, 7)), "heads 0..3")):
        with pytest.raises((ValueError, IndexError, TypeError), match=re.escape(msg)): f()

@pytest.mark.parametrize("arch", QK_NORM)
def test_qk_norm_models_have_no_qk_circuit(arch):
    m = _model(arch, n_layers=3)
    for f in (lambda: check_bilinear(m), lambda: qk_circuit(m, 0, 0), lambda: full_qk_circuit(m, 0, 0, offset=1),
              lambda: composition_scores(m, "K"), lambda: composition_scores(m, "Q"),
              lambda: communication_channels(m, (0, 0), (1, 0), "K")):
        with pytest.raises(NotBilinearError, match="not a bilinear form"): f()
    assert not composition_scores(m, "V", progress=False).scores[0, :, 1].isnan().any()   # V-composition is still defined
    assert copying_scores(m).scores.shape == (3, 4)

# ---- SmolLM2 and the induction toy

@pytest.mark.slow
def test_smollm2_rotary_scores_and_key_writers(smollm2):
    ids = smollm2.tokenizer(" ".join(["The quick brown fox jumps over the lazy dog, again and again."] * 4), return_tensors="pt")["input_ids"]
    c = run_with_cache(smollm2, ids, names=["blocks.18.ln1.hook_normalized", "blocks.18.attn.hook_attn_scores"])
    x, s = c["blocks.18.ln1.hook_normalized"][0], c["blocks.18.attn.hook_attn_scores"][0, 6] / blocks(smollm2)[18].self_attn.scaling
    for d in (0, 1, 9, 30):
        qk = qk_circuit(smollm2, 18, 6, offset=d, fold_norms=False)
        real = s.diagonal(-d)
        assert ((x[d:] @ qk.A) @ qk.B * x[:len(x) - d]).sum(-1).sub(real).abs().max() < 1e-4 * real.abs().max()
    ks = composition_scores(smollm2, "K", layers=18, progress=False)
    writers = [t.index for t in ks.top(3, reader=(18, 6))]
    assert writers[:2] == [(17, 8), (16, 0)] and ks.z()[16, 0, 18, 6] > 100

@pytest.mark.slow
def test_toy_previous_token_head_k_composes_with_induction_head():
    from headscope.toys import train_induction, repeated_symbols, random_symbols
    from headscope.heads.patterns import pattern_scores
    toy, _ = train_induction(steps=300, progress=False)
    g = torch.Generator().manual_seed(0)
    pat = pattern_scores(toy, text=random_symbols(8, 40, g, toy.tokenizer), repeated=repeated_symbols(8, 20, g, toy.tokenizer), progress=False)
    prev, ind = (0, int(pat["prev_token"][0].argmax())), (1, int(pat["induction"][1].argmax()))
    kc = composition_scores(toy, "K", progress=False)
    top = kc.top(1)[0]
    assert top.index[:2] == prev and pat["induction"][top.index[2:]] > 0.4 and kc.z()[prev + ind] > 5
