"""`attention_with_stats`: the Triton kernel against the chunked torch reference, and the reference against
a float64 pattern. On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, conftest.py); on a
CUDA machine (`TRITON_INTERPRET=0 pytest tests/test_kernel_attention_stats.py`) it runs compiled."""
import math
import pytest, torch
import headscope.kernels as K
from headscope.kernels import attention_with_stats, attention_with_stats_reference, force_backend
from headscope.kernels.attention_stats import STAT_NAMES

DEV = "cuda" if torch.cuda.is_available() else "cpu"
triton_ok = pytest.mark.skipif(not K.HAS_TRITON or not (K.interpreting() or torch.cuda.is_available()),
                               reason="needs triton and either TRITON_INTERPRET=1 or a CUDA device")

def _inputs(b, h, kvh, nq, nk, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g) * 1.5
    k = torch.randn(b, kvh, nk, d, generator=g) * 1.5
    v = torch.randn(b, kvh, nk, d, generator=g)
    tg = torch.randint(-1, nk, (b, nq), generator=g).minimum(torch.arange(nk - nq, nk))
    return [t.to(DEV, dtype) for t in (q, k, v)] + [tg.to(DEV)]

def _pattern64(q, k, mask, scaling=None, softcap=None):
    "The attention pattern in float64, formed the way transformers' eager path forms it"
    b, h, nq, d = q.shape
    nkv, nk = k.shape[1], k.shape[2]
    s = q.double() @ k.double().repeat_interleave(h // nkv, 1).transpose(-1, -2) * (d ** -0.5 if scaling is None else scaling)
    if softcap is not None: s = torch.tanh(s / softcap) * softcap
    ok = (torch.arange(nk, device=q.device)[None] <= torch.arange(nk - nq, nk, device=q.device)[:, None]) if mask is None else mask
    return torch.softmax(s.masked_fill(~ok, -math.inf), -1)

def _close(got:dict, ref:dict, atol=2e-5, rtol=1e-4):
    for n in STAT_NAMES:
        x, y = got[n], ref[n]
        assert x.shape == y.shape, (n, x.shape, y.shape)
        if n == "argmax": assert torch.equal(x, y), n; continue
        assert torch.equal(torch.isnan(x), torch.isnan(y)), n
        ok = ~torch.isnan(y)
        torch.testing.assert_close(x[ok].float(), y[ok].float(), atol=atol, rtol=rtol, msg=lambda m: f"{n}: {m}")

def _sliding(nq, nk, w, b):
    i, j = torch.arange(nk - nq, nk)[:, None], torch.arange(nk)[None]
    m = (j <= i) & (i - j < w)
    m = m[None, None].expand(b, 1, nq, nk).clone()
    m[-1, :, :, :3] = False                              # left padding of the last row's first keys
    m[-1, :, :, 3] = True                                # ... which still sees its first real key
    return m.to(DEV)

def test_reference_against_float64_pattern():
    "The chunked reference equals statistics read off a float64 pattern (GQA, sliding mask, KV offset, tiles smaller than the input)"
    from headscope.heads.stats import stats_from_pattern
    q, k, v, tg = _inputs(2, 6, 2, 29, 37, 16)
    for mask in (None, _sliding(29, 37, 9, 2)):
        A = _pattern64(q, k, None if mask is None else mask[:, :1].squeeze(1)[:, None])
        ref = stats_from_pattern(A.cpu(), tg.cpu())
        out, got = attention_with_stats_reference(q, k, v, mask, targets=tg, q_chunk=8, k_chunk=5)
        torch.testing.assert_close(out.double(), A @ v.double().repeat_interleave(3, 1), atol=1e-5, rtol=1e-5)
        for n in STAT_NAMES:
            x, y = got[n].cpu().double(), getattr(ref, n).double()
            if n == "argmax": assert torch.equal(x.long(), y.long()); continue
            ok = ~torch.isnan(y)
            assert torch.equal(torch.isnan(x), torch.isnan(y)), n
            torch.testing.assert_close(x[ok], y[ok], atol=1e-5, rtol=1e-5)

CASES = {   # b, h, kvh, nq, nk, d, mask, softcap, gates
    "causal 1x7": (1, 3, 1, 7, 7, 5, False, None, None),
    "gqa sliding+padding": (2, 6, 2, 37, 37, 24, True, None, "head"),
    "kv cache offset": (2, 4, 4, 3, 45, 16, False, None, "batch head"),
    "softcap, 33 queries": (1, 2, 1, 33, 33, 40, False, 7.5, None),
}

@triton_ok
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(case):
    b, h, kvh, nq, nk, d, use_mask, softcap, gates = CASES[case]
    q, k, v, tg = _inputs(b, h, kvh, nq, nk, d, seed=len(case))
    mask = _sliding(nq, nk, 9, b) if use_mask else None
    gt = {None: None, "head": torch.rand(h), "batch head": torch.rand(b, h)}[gates]
    gt = None if gt is None else gt.to(DEV)
    ref_out, ref = attention_with_stats(q, k, v, mask, None, softcap, tg, gt, q_chunk=8, k_chunk=5, force="torch")
    out, got = attention_with_stats(q, k, v, mask, None, softcap, tg, gt, q_chunk=16, k_chunk=16, force="triton")
    _close(got, ref)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    _, only = attention_with_stats(q, k, None, mask, None, softcap, tg, force="triton")   # statistics alone, default tiles
    _close(only, ref)

@triton_ok
def test_triton_gradients_match_reference():
    "The output's gradients w.r.t. q, k, v and the gates (GQA, padding mask) equal the reference's autograd"
    q, k, v, tg = _inputs(2, 4, 2, 13, 13, 16, seed=3)
    mask = _sliding(13, 13, 6, 2)
    gt = torch.rand(2, 4, device=DEV)
    w = torch.randn(2, 4, 13, 16, device=DEV)
    grads = {}
    for backend in ("torch", "triton"):
        xs = [t.clone().requires_grad_() for t in (q, k, v, gt)]
        out, st = attention_with_stats(xs[0], xs[1], xs[2], mask, gates=xs[3], force=backend)
        assert not any(s.requires_grad for s in st.values())
        (out * w).sum().backward()
        grads[backend] = [x.grad for x in xs]
    for a, b in zip(grads["torch"], grads["triton"]): torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)

@triton_ok
def test_low_precision_inputs():
    "bf16 q/k/v: the kernel computes in fp32 in the interpreter, with bf16 tensor-core dots on a GPU"
    q, k, v, tg = _inputs(1, 2, 1, 21, 21, 32, seed=5)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    ref_out, ref = attention_with_stats(qb, kb, vb, targets=tg, force="torch")
    out, got = attention_with_stats(qb, kb, vb, targets=tg, force="triton")
    assert out.dtype == torch.bfloat16
    tol = 1e-5 if DEV == "cpu" else 2e-2
    for n in ("sink", "prev", "target", "entropy", "max_weight"):
        torch.testing.assert_close(got[n], ref[n], atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)

def test_dispatch_and_errors():
    q, k, v, tg = _inputs(1, 2, 1, 5, 5, 8)
    assert K.backend_for(q, k, v) == ("triton" if DEV == "cuda" and K.HAS_TRITON else "torch")
    with force_backend("torch"):
        assert K.pick("attention_with_stats", q, k) is attention_with_stats_reference
    with pytest.raises(ValueError, match="cannot share 2 key/value heads"):
        attention_with_stats(q[:, :1], torch.cat([k, k], 1))
    with pytest.raises(ValueError, match=r"targets must be \[batch q_pos\] = \[1 5\]"):
        attention_with_stats(q, k, targets=tg[:, :3])
    with pytest.raises(ValueError, match=r"gates must be \[head\] = \[2\]"):
        attention_with_stats(q, k, v, gates=torch.ones(3, device=DEV))
    with pytest.raises(ValueError, match="fewer than q's"):
        attention_with_stats(q, k[:, :, :3])
    with pytest.raises(ValueError, match=r"mask must be \[batch\|1 1 q_pos k_pos\]"):
        attention_with_stats(q, k, mask=torch.ones(1, 5, 5, dtype=torch.bool, device=DEV))

@triton_ok
def test_census_backends_agree():
    "The head census's pattern scores on a tiny GQA Llama are the same through the kernel and through torch"
    from headscope.models import tiny_model
    from headscope.heads.patterns import pattern_scores
    from headscope.data.needles import repeated_tokens, text_tokens
    model = tiny_model("llama", n_layers=2, seed=0).to(DEV)
    tok = model.tokenizer
    text = text_tokens(tok, n_seq=2, seq_len=24)
    rep = repeated_tokens(tok, n_seq=2, half=11)
    res = {}
    for backend in ("torch", "triton"):
        with force_backend(backend):
            res[backend] = pattern_scores(model, text, rep, progress=False)
    assert set(res["torch"]) == set(res["triton"])
    for n in res["torch"]:
        torch.testing.assert_close(res["triton"][n], res["torch"][n], atol=1e-5, rtol=1e-4, equal_nan=True)

@triton_ok
@pytest.mark.slow
def test_smollm2_layer_statistics(smollm2):
    "Real SmolLM2 queries and keys (layers 0, 14, 29; 9 query heads over 3 KV heads): kernel == reference"
    from headscope.hooking import hooks
    grabbed = {}
    def obs(l):
        def f(module, q, k, v, mask, kw): grabbed[l] = (q, k, v, mask, kw.get("scaling"))
        return f
    ids = smollm2.tokenizer("The Eiffel Tower is in Paris. The Eiffel Tower is in", return_tensors="pt").input_ids
    with torch.no_grad(), hooks(smollm2, observe={l: obs(l) for l in (0, 14, 29)}): smollm2(ids)
    for l, (q, k, v, mask, sc) in grabbed.items():
        q, k, v = q.to(DEV), k.to(DEV), v.to(DEV)
        mask = None if mask is None else mask.to(DEV)
        tg = torch.arange(q.shape[2], device=DEV)[None] - 7          # a fixed look-back: any key index per query works
        ref_out, ref = attention_with_stats(q, k, v, mask, sc, targets=tg, force="torch")
        out, got = attention_with_stats(q, k, v, mask, sc, targets=tg, force="triton")
        _close(got, ref)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)

@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_ok)])
def test_several_targets_in_one_call(backend):
    "targets [batch q_pos n_targets]: target/target_nobos gain a last axis equal to one call per target column; the rest unchanged"
    q, k, v, tg = _inputs(2, 4, 2, 21, 21, 16, seed=3)
    tg2 = torch.stack([tg, torch.randint(-1, 21, tg.shape, generator=torch.Generator().manual_seed(4)).to(DEV).minimum(torch.arange(21, device=DEV))], -1)
    with force_backend(backend):
        out2, two = attention_with_stats(q, k, v, targets=tg2, q_chunk=8, k_chunk=8)
        for j in range(2):
            out1, one = attention_with_stats(q, k, v, targets=tg2[..., j], q_chunk=8, k_chunk=8)
            for n in STAT_NAMES:
                x = two[n][..., j] if n in ("target", "target_nobos") else two[n]
                assert torch.equal(torch.isnan(x), torch.isnan(one[n])), n
                ok = ~torch.isnan(one[n])
                torch.testing.assert_close(x[ok].float(), one[n][ok].float(), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(out2, out1)
    with pytest.raises(ValueError, match="n_targets"): attention_with_stats_reference(q, k, targets=tg2[:, :5])
