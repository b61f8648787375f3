"""The cache's TransformerLens methods (accumulated_resid, decompose_resid, stack_head_results, apply_ln_to_stack,
logit_attrs, remove_batch_dim, negative layers) on every tiny architecture, in float64, against independent references:
transformers' own hidden states, the model's own modules (norms, output projections caught with plain PyTorch hooks),
and the real logits."""
import pytest, torch
from headscope.models import tiny_model, TINY_ARCHS
from headscope.arch import arch_spec, model_dims, blocks, get_module, HookNameError
from headscope.hooking import forward
from headscope.cache import run_with_cache, ActivationCache

ATOL = 1e-5
O_PROJ = ("o_proj", "c_proj", "dense")

def maxdiff(a, b): return (a.double() - b.double()).abs().max().item()

def randomised(arch, n_layers=3):
    "A float64 tiny model whose gains and biases (every 1-d parameter) are moved off their initial values: a gain of 1 hides a missing weight"
    m = tiny_model(arch, n_layers=n_layers, dtype=torch.float64, attn_implementation="eager").requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    for p in m.parameters():
        if p.ndim == 1: p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m

@pytest.fixture(scope="module", params=TINY_ARCHS)
def run(request):
    "(model, cache, {layer: real o_proj output}) of one forward of two unpadded rows of random tokens"
    m = randomised(request.param)
    sp, outs, hs = arch_spec(m), {}, []
    for l, b in enumerate(blocks(m)):
        attn = get_module(b, sp.attn)
        proj = next(getattr(attn, n) for n in O_PROJ if hasattr(attn, n))
        hs.append(proj.register_forward_hook(lambda mod, a, o, l=l: outs.__setitem__(l, o)))
    try: c = run_with_cache(m, torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(1)))
    finally:
        for h in hs: h.remove()
    return m, c, outs

def real_logits(m, c, ids):
    "`[batch pos]` the model's logits of `ids`, minus what no component writes: the unembedding bias, a LayerNorm's bias (and Gemma 2's soft-cap undone)"
    lg = c.logits.gather(-1, ids[..., None])[..., 0]
    if cap := getattr(m.config, "final_logit_softcapping", None): lg = cap * torch.atanh(lg / cap)
    U, nb = m.get_output_embeddings(), getattr(get_module(m, arch_spec(m).ln_final), "bias", None)
    if nb is not None: lg = lg - U.weight[ids] @ nb
    if getattr(U, "bias", None) is not None: lg = lg - U.bias[ids]
    return lg

def test_negative_layers(run):
    m, c, _ = run
    L = model_dims(m).n_layers
    for l in range(1, L + 1): assert c["resid_pre", -l] is c["resid_pre", L - l]
    assert c["pattern", -1] is c[f"blocks.{L-1}.attn.hook_pattern"]
    with pytest.raises(HookNameError, match=f"0..{L-1}"): c["resid_pre", L]
    with pytest.raises(HookNameError, match=f"-{L}..-1"): c["z", -L - 1]
    assert ("resid_pre", -1) in c and ("resid_pre", L) not in c and ("resid_pre", -L - 1) not in c

def test_decompose_resid_sums_to_the_residual(run):
    m, c, _ = run
    d = model_dims(m)
    parts, labels = c.decompose_resid(return_labels=True)
    assert maxdiff(parts.sum(0), c["resid_post", -1]) <= ATOL
    assert labels[0] == "embed" and labels[-1] == f"{d.n_layers-1}_mlp_out" and ("pos_embed" in labels) == (m.config.model_type == "gpt2")
    hs = forward(m, c.inputs, output_hidden_states=True).hidden_states   # transformers' own residual stream
    for l in range(d.n_layers):
        assert maxdiff(c.decompose_resid(layer=l).sum(0), hs[l]) <= ATOL, l
        if not d.parallel: assert maxdiff(c.decompose_resid(layer=l, mlp_input=True).sum(0), c["resid_mid", l]) <= ATOL, l
    assert maxdiff(c.decompose_resid(mode="attn").sum(0) + c.decompose_resid(mode="mlp", incl_embeds=False).sum(0), parts.sum(0)) <= ATOL

def test_accumulated_resid_is_the_stream(run):
    m, c, _ = run
    d = model_dims(m)
    acc, labels = c.accumulated_resid(return_labels=True)
    hs = forward(m, c.inputs, output_hidden_states=True).hidden_states
    assert labels == [f"{l}_pre" for l in range(d.n_layers)] + ["final_post"]
    assert maxdiff(acc[:-1], torch.stack(hs[:d.n_layers])) <= ATOL and maxdiff(acc[-1], c["resid_post", -1]) <= ATOL
    # the logit lens: at the final norm each boundary is normalised by its own statistics, recomputed here by hand
    norm = get_module(m, arch_spec(m).ln_final)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    x = acc[:, :, -1]
    if isinstance(norm, torch.nn.LayerNorm): x = x - x.mean(-1, keepdim=True)
    assert maxdiff(c.accumulated_resid(apply_ln=True, pos_slice=-1), x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()) <= 1e-12
    if not d.parallel:
        mids = c.accumulated_resid(incl_mid=True, return_labels=True)[1]
        assert mids[:3] == ["0_pre", "0_mid", "1_pre"] and mids[-1] == "final_post"

def test_heads_sum_to_the_output_projection(run):
    "Heads + bias of a block: the real o_proj output; through the post-attention norm (sandwich archs) its attn_out"
    m, c, outs = run
    d, sp = model_dims(m), arch_spec(m)
    L, H = d.n_layers, d.n_heads
    heads, labels = c.stack_head_results(incl_bias=True, return_labels=True)
    normed = c.stack_head_results(incl_bias=True, post_norm=True)
    assert labels[:H + 1] == [f"L0H{h}" for h in range(H)] + ["L1H0"] and labels[L * H:] == [f"L{l}_bias" for l in range(L)]
    sandwich = sp.attn_out != sp.attn
    for l in range(L):
        layer = lambda s: s[l * H:(l + 1) * H].sum(0) + s[L * H + l]
        assert maxdiff(layer(heads), outs[l]) <= ATOL, l
        assert maxdiff(layer(normed), c["attn_out", l]) <= ATOL, l
        if sandwich: assert maxdiff(layer(heads), c["attn_out", l]) > 1e-3   # before the post-norm, it is not attn_out
        else: assert torch.equal(heads, normed)
    assert maxdiff(c.stack_head_results(incl_remainder=True).sum(0), c["resid_post", -1]) <= ATOL
    assert maxdiff(c.stack_head_results(layer=1, incl_bias=True, incl_remainder=True).sum(0), c["resid_pre", 1]) <= ATOL

def test_apply_ln_to_stack_is_the_real_norm(run):
    m, c, _ = run
    d, sp = model_dims(m), arch_spec(m)
    bias = lambda norm: norm.bias if isinstance(getattr(norm, "bias", None), torch.Tensor) else 0
    fin = get_module(m, sp.ln_final)
    assert maxdiff(c.apply_ln_to_stack(c.decompose_resid(), weight=True).sum(0) + bias(fin), fin(c["resid_post", -1])) <= ATOL
    for l in range(d.n_layers):
        blk = blocks(m)[l]
        if sp.ln1 is None:   # OLMo 2: the block reads the residual as it is
            st = c.decompose_resid(layer=l); assert c.apply_ln_to_stack(st, layer=l) is st
            continue
        n1, n2 = get_module(blk, sp.ln1), get_module(blk, sp.ln2)
        assert maxdiff(c.apply_ln_to_stack(c.decompose_resid(layer=l), l, weight=True).sum(0) + bias(n1), c["ln1", l]) <= ATOL, l
        assert maxdiff(c.apply_ln_to_stack(c.decompose_resid(layer=l, mlp_input=True), l, mlp_input=True, weight=True).sum(0) + bias(n2),
                       c["ln2", l]) <= ATOL, l
    # at one position, in float64: the same numbers as the whole stack's
    full = c.apply_ln_to_stack(c.decompose_resid())
    assert maxdiff(c.apply_ln_to_stack(c.decompose_resid(pos_slice=3), pos_slice=3), full[:, :, 3]) <= 1e-12
    assert maxdiff(c.apply_ln_to_stack(c.decompose_resid(pos_slice=[1, 4]), pos_slice=[1, 4]), full[:, :, [1, 4]]) <= 1e-12

def test_logit_attrs_sum_to_the_logits(run):
    m, c, _ = run
    d = model_dims(m)
    ids = torch.randint(0, d.d_vocab, (2, 11), generator=torch.Generator().manual_seed(2))
    want = real_logits(m, c, ids)
    assert maxdiff(c.logit_attrs(c.decompose_resid(), ids).sum(0), want) <= ATOL
    assert maxdiff(c.logit_attrs(c.stack_head_results(incl_bias=True, incl_remainder=True, post_norm=True), ids).sum(0), want) <= ATOL
    # a logit difference at the last position, one answer per prompt
    a, b = ids[:, -1], ids[:, 0]
    last = c.decompose_resid(pos_slice=-1)
    diff = c.logit_attrs(last, a, b, pos_slice=-1)
    assert diff.shape == (last.shape[0], 2)
    want_a = real_logits(m, c, a[:, None].expand(2, 11))[:, -1]
    want_b = real_logits(m, c, b[:, None].expand(2, 11))[:, -1]
    assert maxdiff(diff.sum(0), want_a - want_b) <= ATOL
    # one token for every prompt and position
    assert maxdiff(c.logit_attrs(last, 7, pos_slice=-1).sum(0), real_logits(m, c, torch.full((2, 11), 7))[:, -1]) <= ATOL

def test_remove_batch_dim_keeps_the_methods_exact(run):
    m, _, _ = run
    c1 = run_with_cache(m, torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(3)))
    one = c1.remove_batch_dim()
    assert not one.has_batch_dim and one["resid_pre", 0].shape == c1["resid_pre", 0].shape[1:] and one.logits.ndim == 2
    assert one.remove_batch_dim() is one and "batch dim removed" in repr(one)
    for st, st1 in ((one.decompose_resid(), c1.decompose_resid()), (one.stack_head_results(), c1.stack_head_results())):
        assert st.shape == (st1.shape[0], *st1.shape[2:]) and maxdiff(st, st1[:, 0]) <= 1e-12
    ids = torch.randint(0, model_dims(m).d_vocab, (7,), generator=torch.Generator().manual_seed(4))
    assert maxdiff(one.logit_attrs(one.decompose_resid(), ids).sum(0), real_logits(m, c1, ids[None])[0]) <= ATOL
    # a stack without batch axis read against a batched cache of one prompt
    assert maxdiff(c1.logit_attrs(c1.decompose_resid()[:, 0], ids, has_batch_dim=False), one.logit_attrs(one.decompose_resid(), ids)) <= 1e-12

def test_clear_errors_before_any_compute():
    m = tiny_model("llama", n_layers=2)
    c = run_with_cache(m, ["a b c", "d e"], names=["blocks.*.hook_attn_out", "blocks.*.hook_mlp_out", "hook_embed"])
    st = c.decompose_resid()
    with pytest.raises(IndexError, match=r"0\.\.2"): c.decompose_resid(layer=3)
    with pytest.raises(TypeError, match="int or None"): c.stack_head_results(layer="1")
    with pytest.raises(ValueError, match="'all', 'attn' or 'mlp'"): c.decompose_resid(mode="head")
    with pytest.raises(ValueError, match="mlp_input=True needs a block"): c.apply_ln_to_stack(st, mlp_input=True)
    with pytest.raises(HookNameError, match=r"blocks\.1\.hook_resid_post"): c.apply_ln_to_stack(st)
    with pytest.raises(HookNameError, match=r"blocks\.1\.hook_resid_pre' or 'blocks\.0\.hook_resid_post"): c.apply_ln_to_stack(st, layer=1)
    with pytest.raises(HookNameError, match=r"blocks\.0\.attn\.hook_z"): c.stack_head_results()
    with pytest.raises(TypeError, match="pos_slice"): c.decompose_resid(pos_slice=1.5)
    with pytest.raises(IndexError, match="positions 0.."): c.decompose_resid(pos_slice=[0, 40])
    with pytest.raises(ValueError, match="batch of one prompt"): c.remove_batch_dim()
    with pytest.raises(ValueError, match="no model"): ActivationCache(c.acts, None, c.inputs).decompose_resid()
    full = run_with_cache(m, ["a b c", "d e"])
    st = full.decompose_resid()
    with pytest.raises(ValueError, match="same pos_slice"): full.apply_ln_to_stack(st, pos_slice=-1)
    with pytest.raises(ValueError, match="one prompt"): full.apply_ln_to_stack(st[:, 0], has_batch_dim=False)
    with pytest.raises(ValueError, match="same shape"): full.logit_attrs(st, "a", ["a", "b"])
    with pytest.raises(ValueError, match=r"prefix of \[2, 6\]"): full.logit_attrs(st, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="0..258"): full.logit_attrs(st, torch.tensor([1, 300]))
    with pytest.raises(ValueError, match="single-token"): full.logit_attrs(st, "ab")
    with pytest.raises(ValueError, match="parallel"): run_with_cache(tiny_model("gpt_neox"), "a b").accumulated_resid(incl_mid=True)

def test_to_keeps_what_the_methods_need():
    m = tiny_model("gpt2", n_layers=2)
    c = run_with_cache(m, "a b c d").to(dtype=torch.float64)
    assert c.model is m and c["resid_post", -1].dtype == torch.float64
    assert maxdiff(c.decompose_resid().sum(0), c["resid_post", -1]) <= 1e-5

@pytest.mark.slow
def test_smollm2_head_attributions_match_dla(smollm2):
    from headscope.causal.dla import direct_logit_attribution
    p = "When Mary and John went to the store, John gave a drink to"
    c = run_with_cache(smollm2, p, names=["blocks.*.attn.hook_z", "blocks.29.hook_resid_post"])
    attrs = c.logit_attrs(c.stack_head_results(pos_slice=-1), " Mary", " John", pos_slice=-1)[:, 0]
    dla = direct_logit_attribution(smollm2, p, " Mary", " John")
    assert maxdiff(attrs.reshape(30, 9), dla.heads[0]) <= 1e-4
