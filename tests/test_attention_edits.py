"""Attention edits (`headscope.probes.attention_edits`) against independent references, on tiny eager models.

- a key bias equals a float64 softmax of q k^T / sqrt(d) plus the bias, per head, under GQA and left padding;
- VAR's head outputs equal the closed form "in two parts" computed in float64 from q, k, v;
- SoftPAG toward the identity: the cheap z path equals the pattern path; toward uniform: the float64 pattern;
- greedy `generate()` (KV cache) with every edit gives the logits of a loop of full forwards with the same edit;
- a left-padded batch gives each row's unpadded result;
- edits of different heads (plus `scale_heads` and a steering vector) commute; hooks are gone after use, even
  after an exception; bad input is refused before any forward."""
import math, pytest, torch
from headscope.models import tiny_model
from headscope.tokens import to_inputs
from headscope.hooking import forward, hooks
from headscope.cache import run_with_cache
from headscope.probes.steering import head_scaling_hooks, steering_hooks, steering_vector
from headscope.probes.attention_edits import (attn_bias_hooks, bias_attention_to, redistribution_hooks, redistribute_attention,
                                              interpolation_hooks, interpolate_attention)
from _checks import assert_no_hooks

@pytest.fixture(scope="module")
def m():
    return tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2, seed=3, attn_implementation="eager")

PROMPTS = ["attention edits, tested", "short"]

def _qkv(m, x, l, edits):
    "float64 q `[batch head pos d]`, k and v `[batch head pos d]` (GQA repeated), z `[batch pos head d]` of the edited forward"
    ns = [f"blocks.{l}.attn.hook_{s}" for s in ("rot_q", "rot_k", "v", "z", "pattern")]
    c = run_with_cache(m, x, names=ns, fwd_hooks=edits)
    q, k, v = (c[n].double().transpose(1, 2) for n in ns[:3])
    rep = q.shape[1] // k.shape[1]
    return q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), c[ns[3]].double(), c[ns[4]].double()

def _mask(x):
    "`[batch 1 q k]` True where a real query may see a real key; `[batch pos]` real-token positions (-1 pad)"
    am = x["attention_mask"].bool()
    n = am.shape[1]
    pos = (am.long().cumsum(-1) - 1).masked_fill(~am, -1)
    return (torch.ones(n, n, dtype=torch.bool).tril()[None] & am[:, None, :])[:, None], pos

def _softmax(q, k, see):
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -.5
    return s.masked_fill(~see, -math.inf).softmax(-1)

def _left(m, prompts=PROMPTS): return to_inputs(m, prompts, padding_side="left")

def test_bias_float64(m):
    x = _left(m)
    see, pos = _mask(x)
    q, k, v, z, A = _qkv(m, x, 1, attn_bias_hooks(m, {(1, 3): 2.5, (1, 0): -1.5}, keys=[1, -1]))
    n = pos.max(-1).values + 1                                            # prompt lengths
    chosen = (pos == 1) | (pos == (n - 1)[:, None])                       # [batch k_pos]
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -.5
    s[:, 3] += 2.5 * chosen[:, None].double(); s[:, 0] -= 1.5 * chosen[:, None].double()
    ref = s.masked_fill(~see, -math.inf).softmax(-1)
    real = x["attention_mask"].bool()
    for b in range(2):
        torch.testing.assert_close(A[b][:, real[b]][:, :, real[b]], ref[b][:, real[b]][:, :, real[b]], atol=1e-6, rtol=0)
        torch.testing.assert_close(z[b, real[b]], (ref[b] @ v[b]).transpose(0, 1)[real[b]], atol=1e-5, rtol=0)

@pytest.mark.parametrize("sinks", [0, [0, 2]])
def test_var_two_parts_float64(m, sinks):
    x = _left(m)
    see, pos = _mask(x)
    rho = .7
    q, k, v, z, _ = _qkv(m, x, 1, redistribution_hooks(m, [(1, 1), (1, 2)], rho=rho, sinks=sinks))
    A = _softmax(q, k, see)
    S = torch.isin(pos, torch.tensor(sinks if isinstance(sinks, list) else [sinks]))[:, None, None, :]   # [batch 1 1 k]
    As, An = A * S, A * ~S
    m_, r = As.sum(-1, keepdim=True), An.sum(-1, keepdim=True)
    ref = (1 - rho) * (As @ v) + (1 - (1 - rho) * m_) * (An @ v) / r.clamp_min(1e-300)   # the closed form, never forming A'
    ref = torch.where(r > 0, ref, A @ v).transpose(1, 2)                  # [batch pos head d_head]
    real = x["attention_mask"].bool()
    for b in range(2):
        torch.testing.assert_close(z[b, real[b]][:, [1, 2]], ref[b, real[b]][:, [1, 2]], atol=1e-5, rtol=0)
        torch.testing.assert_close(z[b, real[b]][:, [0, 3]], (A[b] @ v[b]).transpose(0, 1)[real[b]][:, [0, 3]], atol=1e-5, rtol=0)

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_identity_z_equals_pattern(arch):
    m = tiny_model(arch, n_layers=2, n_heads=4, seed=5)
    x = _left(m)
    heads = {(0, 1): .35, (1, 3): 1., (1, 0): .6}
    zs = [run_with_cache(m, x, names="blocks.*.attn.hook_z", fwd_hooks=interpolation_hooks(m, heads, via=via)) for via in ("z", "pattern")]
    real = x["attention_mask"].bool()
    for l in (0, 1):
        a, b = zs[0][f"blocks.{l}.attn.hook_z"], zs[1][f"blocks.{l}.attn.hook_z"]
        torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=0)
    with torch.no_grad(), interpolate_attention(m, heads, via="z"): lz = forward(m, x).logits
    with torch.no_grad(), interpolate_attention(m, heads, via="pattern"): lp = forward(m, x).logits
    with torch.no_grad(): plain = forward(m, x).logits
    torch.testing.assert_close(lz[real], lp[real], atol=1e-5, rtol=0)
    assert (lz[real] - plain[real]).abs().max() > 1e-3

def test_uniform_float64(m):
    x = _left(m)
    see, _ = _mask(x)
    alpha = .4
    q, k, v, z, A = _qkv(m, x, 0, interpolation_hooks(m, [(0, 2)], alpha=alpha, target="uniform"))
    A0 = _softmax(q, k, see)
    T = see.double() / see.sum(-1, keepdim=True).clamp_min(1)
    ref = (1 - alpha) * A0[:, 2] + alpha * T[:, 0]
    real = x["attention_mask"].bool()
    for b in range(2):
        torch.testing.assert_close(A[b, 2][real[b]][:, real[b]], ref[b][real[b]][:, real[b]], atol=1e-6, rtol=0)
        assert torch.allclose(A[b, 2][real[b]].sum(-1), torch.ones(int(real[b].sum()), dtype=torch.float64), atol=1e-6)

def _edits(m, x):
    tok = int(x["input_ids"][0, 2])
    return {"bias pos": attn_bias_hooks(m, [(0, 0), (1, 2)], keys=[0, 2, 3], bias=3.),
            "bias pred": attn_bias_hooks(m, {(1, 1): 4., (0, 3): -2.}, keys=lambda ids: ids % 7 == tok % 7),
            "var": redistribution_hooks(m, [(0, 1), (1, 3)], rho=.9),
            "identity z": interpolation_hooks(m, [(1, 0), (0, 2)], alpha=.7),
            "uniform": interpolation_hooks(m, [(1, 2)], alpha=.8, target="uniform")}

@pytest.mark.parametrize("kind", ["bias pos", "bias pred", "var", "identity z", "uniform", "all"])
def test_generate_equals_full_forward_loop(m, kind):
    x = to_inputs(m, "gen test")
    x["attention_mask"] = torch.ones_like(x["input_ids"])
    es = _edits(m, x)
    hs = sum(es.values(), []) if kind == "all" else es[kind]
    with torch.no_grad(), hooks(m, hs):
        out = m.generate(**x, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=m.tokenizer.pad_token_id)
    ids = x["input_ids"]
    new = out.sequences[0, ids.shape[1]:]
    with torch.no_grad(), hooks(m, hs):
        for t in range(6):
            last = forward(m, {"input_ids": ids}).logits[0, -1]
            torch.testing.assert_close(out.scores[t][0], last, atol=1e-4, rtol=0)
            ids = torch.cat([ids, new[t:t + 1][None]], 1)
    with torch.no_grad(): plain = m.generate(**x, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
                                             pad_token_id=m.tokenizer.pad_token_id)
    assert max((a - b).abs().max().item() for a, b in zip(out.scores, plain.scores)) > 1e-3   # the edit did something

def test_left_padding_equals_single_rows(m):
    x = _left(m)
    hs = sum(_edits(m, to_inputs(m, PROMPTS[0])).values(), [])
    with torch.no_grad(), hooks(m, hs): batch = forward(m, x).logits
    real = x["attention_mask"].bool()
    for b, p in enumerate(PROMPTS):
        with torch.no_grad(), hooks(m, hs): one = forward(m, to_inputs(m, p)).logits[0]
        torch.testing.assert_close(batch[b, real[b]], one, atol=1e-5, rtol=0)

def test_compose_order_independent(m):
    x = _left(m)
    sv = steering_vector(torch.randn(64, generator=torch.Generator().manual_seed(1)), layers=[0, 1])
    parts = [attn_bias_hooks(m, {(1, 1): 2.}, keys=[0, 1]), redistribution_hooks(m, [(1, 3), (0, 0)], rho=.5),
             interpolation_hooks(m, [(0, 2)], alpha=.4), interpolation_hooks(m, [(1, 0)], alpha=.7, target="uniform"),
             head_scaling_hooks(m, {(0, 1): .5, (1, 2): -1.}), steering_hooks(m, sv, coeff=2.)]
    runs = []
    for order in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 5, 0, 4, 1, 3]):
        with torch.no_grad(), hooks(m, sum((parts[i] for i in order), [])): runs.append(forward(m, x).logits)
    for r in runs[1:]: torch.testing.assert_close(r, runs[0], atol=1e-6, rtol=0)
    # a bias sits before the softmax: it acts first whatever its place in the list, also on a pattern-edited head
    a = attn_bias_hooks(m, [(1, 3)], keys=[2], bias=2.) + redistribution_hooks(m, [(1, 3)], rho=.5)
    with torch.no_grad(), hooks(m, a): la = forward(m, x).logits
    with torch.no_grad(), hooks(m, a[::-1]): lb = forward(m, x).logits
    torch.testing.assert_close(la, lb, atol=1e-6, rtol=0)
    # two pattern edits of the same head do not commute
    v, s = redistribution_hooks(m, [(1, 3)], rho=.5), interpolation_hooks(m, [(1, 3)], alpha=.5, via="pattern")
    with torch.no_grad(), hooks(m, v + s): vs = forward(m, x).logits
    with torch.no_grad(), hooks(m, s + v): sv_ = forward(m, x).logits
    assert (vs - sv_).abs().max() > 1e-4

def test_zero_edits_are_exact(m):
    x = _left(m)
    with torch.no_grad(): plain = forward(m, x).logits
    for cm in (bias_attention_to(m, [(0, 1), (1, 2)], keys=[1], bias=0.), redistribute_attention(m, [(0, 1)], rho=0.),
               interpolate_attention(m, [(1, 1)], alpha=0., target="uniform"), interpolate_attention(m, [(1, 1)], alpha=0.)):
        with torch.no_grad(), cm: torch.testing.assert_close(forward(m, x).logits, plain, atol=1e-6, rtol=0)

def test_var_full_rho_empties_the_sink(m):
    x = _left(m)
    c = run_with_cache(m, x, names=["blocks.1.attn.hook_pattern"], fwd_hooks=redistribution_hooks(m, [(1, 0)], rho=1.))
    A, real = c["blocks.1.attn.hook_pattern"], x["attention_mask"].bool()
    for b in range(2):
        Ab = A[b, 0][real[b]][:, real[b]]                                 # [q k] over real tokens
        assert Ab[0, 0] == 1                                              # the first token has only the sink: unchanged
        assert Ab[1:, 0].abs().max() == 0                                 # every later query: nothing on the sink
        torch.testing.assert_close(Ab.sum(-1), torch.ones(len(Ab)), atol=1e-6, rtol=0)

def test_hooks_gone(m):
    x = _left(m)
    for cm in (lambda: bias_attention_to(m, [(0, 1)], keys=lambda ids: ids > 50, bias=1.),
               lambda: redistribute_attention(m, [(0, 1)], rho=.5), lambda: interpolate_attention(m, [(1, 1)], alpha=.5)):
        with torch.no_grad(), cm(): forward(m, x)
        assert_no_hooks(m)
        with pytest.raises(RuntimeError, match="boom"):
            with cm(): raise RuntimeError("boom")
        assert_no_hooks(m)

@pytest.mark.parametrize("call,err,msg", [
    (lambda m: attn_bias_hooks(m, {(2, 0): 1.}, keys=[0]), IndexError, "layers 0..1"),
    (lambda m: attn_bias_hooks(m, {(0, 4): 1.}, keys=[0]), IndexError, "heads 0..3"),
    (lambda m: attn_bias_hooks(m, {0: 1.}, keys=[0]), ValueError, r"\(layer, head\) pairs"),
    (lambda m: attn_bias_hooks(m, {(0, 0): 1.}, keys=[0], bias=2.), ValueError, "not both"),
    (lambda m: attn_bias_hooks(m, [(0, 0)], keys=[0]), ValueError, "shared `bias=`"),
    (lambda m: attn_bias_hooks(m, [(0, 0)], keys=[0], bias=math.inf), ValueError, "finite"),
    (lambda m: attn_bias_hooks(m, [(0, 0)], keys=[0], bias="2"), TypeError, "real number"),
    (lambda m: attn_bias_hooks(m, [], keys=[0], bias=1.), ValueError, "at least one"),
    (lambda m: attn_bias_hooks(m, [(0, 0)], keys=[], bias=1.), TypeError, "non-empty list"),
    (lambda m: attn_bias_hooks(m, [(0, 0)], keys=[1.5], bias=1.), TypeError, "non-empty list"),
    (lambda m: attn_bias_hooks(m, [(0, 0)], keys=lambda ids: ids > 10**6, bias=1.), ValueError, "selects none"),
    (lambda m: attn_bias_hooks(m, [(0, 0)], keys=lambda ids: ids.float(), bias=1.), TypeError, "bool tensor"),
    (lambda m: redistribution_hooks(m, [(0, 0)], rho=1.5), ValueError, r"\[0, 1\]"),
    (lambda m: redistribution_hooks(m, [(0, 0)], rho=-.1), ValueError, r"\[0, 1\]"),
    (lambda m: interpolation_hooks(m, [(0, 0)], alpha=2.), ValueError, r"\[0, 1\]"),
    (lambda m: interpolation_hooks(m, [(0, 0)], alpha=.5, target="eye"), ValueError, "identity"),
    (lambda m: interpolation_hooks(m, [(0, 0)], alpha=.5, via="kernel"), ValueError, "via must be"),
    (lambda m: interpolation_hooks(m, [(0, 0)], alpha=.5, target="uniform", via="z"), ValueError, "via='pattern'"),
])
def test_bad_inputs_before_any_forward(m, call, err, msg):
    calls = []
    h = m.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(err, match=msg): call(m)
    finally: h.remove()
    assert not calls

def test_position_outside_every_prompt(m):
    with bias_attention_to(m, [(0, 0)], keys=[40], bias=1.), pytest.raises(IndexError, match="outside every prompt"):
        forward(m, _left(m))
    assert_no_hooks(m)

def test_cached_step_without_its_prompt(m):
    "A KV cache filled outside the edit: the prompt the positions refer to was never seen, so the edit refuses"
    from headscope.hooking import kv_cache_name, kv_cache_of
    x = to_inputs(m, "abc")
    with torch.no_grad():
        cache = kv_cache_of(m(**x, use_cache=True))
        with bias_attention_to(m, [(0, 0)], keys=[0], bias=1.), pytest.raises(RuntimeError, match="prompt was not seen"):
            m(input_ids=torch.tensor([[5]]), use_cache=True, **{kv_cache_name(m): cache})
    assert_no_hooks(m)
