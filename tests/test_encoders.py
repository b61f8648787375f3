"""Encoders (BERT, RoBERTa, DistilBERT, ModernBERT) and vision transformers (ViT, DeiT, DINOv2): what the shared
battery (test_exact.py) does not cover: padding, segments, full patterns, image inputs, prefix tokens."""
import pytest, torch
from headscope.models import tiny_model
from headscope.tiny_encoders import ENCODER_ARCHS, VISION_ARCHS
from headscope.arch import model_hook_names, arch_spec, get_module
from headscope.cache import run_with_cache
from headscope.hooking import run_with_hooks, hooks
from headscope.tokens import to_inputs, input_shape
from _checks import maxdiff, assert_no_hooks

TEXTS = ["a cat sat on the mat", "dogs run"]   # the second row is padded on the right

@pytest.fixture(scope="module", params=ENCODER_ARCHS)
def enc(request): return tiny_model(request.param, attn_implementation="eager")

def test_padded_batch_read_only_is_bitwise(enc):
    x = to_inputs(enc, TEXTS)
    assert not bool(x["attention_mask"].all()) and bool(x["attention_mask"][:, 0].all())   # right padding
    with torch.no_grad(): plain = enc(**x).logits
    assert torch.equal(run_with_hooks(enc, TEXTS, [(n, lambda a, h: None) for n in model_hook_names(enc)]), plain)
    assert_no_hooks(enc)

def test_patterns_are_full_and_padding_masked(enc):
    "every query sees every real key, before and after it; padded keys get no weight; the model's own eager weights agree"
    x = to_inputs(enc, TEXTS)
    c = run_with_cache(enc, TEXTS, names="blocks.*.attn.hook_pattern")
    with torch.no_grad(): att = enc(**x, output_attentions=True).attentions
    m = x["attention_mask"].bool()
    n = int(m[1].sum())
    for l, a in enumerate(att):
        p = c["pattern", l]
        assert maxdiff(p, a) <= 1e-6, l
        assert (p[1][:, m[1]][..., ~m[1]] == 0).all(), ("real queries give padded keys no weight", l)   # (a padded query beyond a local window sees no key)
        win = getattr(get_module(get_module(enc, arch_spec(enc).layers)[l], arch_spec(enc).attn), "sliding_window", None)
        if win is None:   # a global layer: query 0 attends to the last real key (no causal mask)
            assert (p[0, :, 0, -1] > 0).all() and (p[1, :, 0, n - 1] > 0).all(), l

def test_mlm_head_of_any_residual_is_a_lens(enc):
    "the MLM head (`ArchSpec.head`) applied to the last block's output gives the logits at a masked position too"
    tok = enc.tokenizer
    ids = tok(f"a c{tok.mask_token}t", return_tensors="pt").input_ids
    pos = int((ids[0] == tok.mask_token_id).nonzero())
    sp = arch_spec(enc)
    last = f"blocks.1.{'ln2.hook_normalized' if sp.post_ln else 'hook_resid_post'}"
    c = run_with_cache(enc, ids, names=[last])
    x = c[last][:, pos]
    with torch.no_grad():
        for p in sp.head: x = get_module(enc, p)(x)
    assert maxdiff(x, c.logits[:, pos]) <= 1e-5

def test_segments_reach_the_token_type_embedding():
    m = tiny_model("bert")
    enc = m.tokenizer("ab", "cd", return_tensors="pt", return_token_type_ids=True)
    assert enc["token_type_ids"].any()
    x = to_inputs(m, enc)
    assert torch.equal(x["token_type_ids"], enc["token_type_ids"])
    c = run_with_cache(m, enc, names=["hook_token_type_embed"])
    assert maxdiff(c["hook_token_type_embed"][0], m.bert.embeddings.token_type_embeddings.weight[enc["token_type_ids"][0]]) == 0
    with torch.no_grad(): assert maxdiff(c.logits, m(**enc).logits) == 0

def test_modernbert_layer0_has_no_attention_norm():
    names = model_hook_names(tiny_model("modernbert"))
    assert "blocks.0.ln1.hook_normalized" not in names and "blocks.1.ln1.hook_normalized" in names and "blocks.0.attn.hook_rot_q" in names

@pytest.fixture(scope="module", params=VISION_ARCHS)
def vit(request): return tiny_model(request.param)

def test_vision_inputs_and_prefix_tokens(vit):
    "pixel_values in; pos = prefix tokens + 16 patches; hook_embed's prefix rows are the learned tokens plus their positions"
    px = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prefix = {"vit": 1, "deit": 2, "dinov2": 1, "dinov2_with_registers": 3}[vit.config.model_type]
    test_x = to_inputs(vit, px)
    assert input_shape(vit, test_x) == (2, 16 + prefix) and torch.equal(to_inputs(vit, px[0])["pixel_values"], px[:1])
    seen = {}
    c = run_with_cache(vit, {"pixel_values": px}, names=["hook_embed", "hook_logits"],
                       fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, h: seen.update(pos=h.positions))])
    assert torch.equal(seen["pos"], torch.arange(16 + prefix).expand(2, -1))
    e, emb = c["hook_embed"], get_module(vit, arch_spec(vit).embed)
    with torch.no_grad():
        assert maxdiff(e[:, 0], (emb.cls_token + emb.position_embeddings[:, :1])[0]) <= 1e-6
        if prefix == 2: assert maxdiff(e[:, 1], (emb.distillation_token + emb.position_embeddings[:, 1:2])[0]) <= 1e-6
        if prefix == 3: assert maxdiff(e[:, 1:3], emb.register_tokens.expand(2, -1, -1)) == 0   # registers: after [CLS], no position
        assert c["hook_logits"].shape == (2, vit.config.num_labels) and maxdiff(c["hook_logits"], vit(px).logits) == 0

def test_vision_bad_inputs_fail_before_the_forward(vit):
    with pytest.raises(TypeError, match="reads images"): to_inputs(vit, "a prompt")
    with pytest.raises(ValueError, match="3 channels"): to_inputs(vit, torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="float tensor"): to_inputs(vit, torch.ones(1, 3, 16, 16, dtype=torch.long))

def test_hooks_gone_after_a_raising_forward():
    for a in ("bert", "vit"):
        m = tiny_model(a)
        x = torch.randn(1, 3, 16, 16) if a == "vit" else torch.tensor([[256, 97, 257]])
        def boom(act, hook): raise RuntimeError("boom")
        with pytest.raises(RuntimeError, match="boom"): run_with_hooks(m, x, [("blocks.1.attn.hook_pattern", boom)])
        assert_no_hooks(m)

def test_attention_views_draw_full_patterns():
    "the explorer's page data keeps an encoder's whole (non-causal) pattern, and the static view draws cells above the diagonal"
    from headscope.views.pattern_data import encode_patterns, decode_patterns
    from headscope.views.attention import pattern_svg
    m = tiny_model("bert")
    c = run_with_cache(m, "a cat sat", names="blocks.*.attn.hook_pattern")
    P = torch.stack([c["pattern", l][0] for l in range(2)])                # [layer head q k]
    assert P[..., 0, 1:].sum() > 0.1                                        # the first token attends ahead of itself
    d = encode_patterns(P)
    assert not d.causal and maxdiff(decode_patterns(d), P) <= 2e-3         # one byte per weight
    toks = [str(i) for i in range(P.shape[-1])]
    svg = pattern_svg(toks, P[0, 0])
    assert f"{toks[0]} → {toks[-1]}" in svg                                 # a key after its query is drawn

def _observed_pattern(q, k, mask, scaling, causal_if_none=True):
    "softmax(q.k * scale + mask) in float64, in plain torch: what an observer reads from what `observe=` hands it (None: causal)"
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = q.double() @ k.double().transpose(-1, -2) * scaling
    if mask is None:
        if causal_if_none: s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    elif mask.dtype == torch.bool: s = s.masked_fill(~mask[..., :k.shape[-2]], float("-inf"))
    else: s = s + mask[..., :k.shape[-2]].double()
    return torch.softmax(s, -1)

@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ENCODER_ARCHS)
def test_observers_and_patterns_get_the_full_mask(arch, impl):
    """A non-causal module's observers get its full (padding-only) mask, never a causal one: the pattern they rebuild, and
    `hook_pattern`, equal HF's eager attention probabilities (output_attentions), unpadded and padded, eager and SDPA models"""
    m, ref = tiny_model(arch, attn_implementation=impl), tiny_model(arch, attn_implementation="eager")   # the same seed: the same weights
    L = len(get_module(m, arch_spec(m).layers))
    long = "the quick brown fox jumps"   # longer than ModernBERT's local window (8): its local layers mask far keys
    for x in (to_inputs(m, [long, long[::-1]]), to_inputs(m, [long, "dogs run"])):
        with torch.no_grad(): att = ref(**x, output_attentions=True).attentions
        seen = {}
        obs = {l: (lambda mod, q, k, v, mask, kw, l=l: seen.__setitem__(l, _observed_pattern(q, k, mask, kw.get("scaling", q.shape[-1] ** -0.5))))
               for l in range(L)}
        with torch.no_grad(), hooks(m, observe=obs): m(**x)
        c = run_with_cache(m, x, names="blocks.*.attn.hook_pattern")
        real = x["attention_mask"].bool()[:, :, None]                       # [batch pos 1]: rows of real queries
        for l, a in enumerate(att):
            a = a.double().masked_fill(~real[:, None], 0)                    # padded queries: whatever each kernel gives them
            assert maxdiff(seen[l].masked_fill(~real[:, None], 0), a) <= 1e-5, (l, "observer")   # float64 against eager's float32
            tol = 1e-6 if impl == "eager" else 1e-5                                # SDPA's layer 0 rounds otherwise, so layer 1's q and k do
            assert maxdiff(c["pattern", l].masked_fill(~real[:, None], 0), a) <= tol, (l, "hook_pattern")
            assert (a[0, :, 0, 1] > 0).all(), l                                  # query 0 sees the key after it: not causal
        assert_no_hooks(m)

def test_pattern_scores_on_an_encoder_read_full_rows():
    "`pattern_scores` (observers and the stats kernel) on BERT equals the same scores from HF's eager attention probabilities"
    from headscope.heads.patterns import pattern_scores, PATTERN_SCORES
    from headscope.heads.stats import stats_from_pattern
    m, ref = tiny_model("bert"), tiny_model("bert", attn_implementation="eager")
    text = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    rep = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(1)).repeat(1, 2)
    got = pattern_scores(m, text, rep, progress=False)
    with torch.no_grad(): att = ref(text, output_attentions=True).attentions
    i = torch.arange(12)
    for l, a in enumerate(att):
        st = stats_from_pattern(a.double())
        assert torch.equal(st.n_keys, torch.full_like(st.n_keys, 12.))     # every query reads all 12 keys
        assert maxdiff(got["sink"][l], st.sink[:, :, i >= 1].mean((0, 2))) <= 1e-5, l
        assert maxdiff(got["entropy"][l], (st.entropy / st.n_keys.log())[:, :, i >= 1].mean((0, 2))) <= 1e-5, l
        assert maxdiff(got["distance"][l], st.distance[:, :, i >= 1].mean((0, 2))) <= 1e-4, l
    assert set(got) == set(PATTERN_SCORES)

# the output projections and down projections by their Hugging Face names (block-relative), written out independently of the specs
OUT_PROJ = {"bert": ("attention.output.dense", "output.dense"), "roberta": ("attention.output.dense", "output.dense"),
            "distilbert": ("attention.out_lin", "ffn.lin2"), "modernbert": ("attn.Wo", "mlp.Wo")}

@pytest.mark.parametrize("arch", ENCODER_ARCHS)
def test_rank1_edits_on_an_encoder(arch):
    "probes.edit on encoders: a head's and an MLP's rank-1 edit, in the weights and as hooks, equal a copy edited by hand"
    import copy
    from headscope.probes.edit import rank1_edit, WeightEdit
    m = tiny_model(arch, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    r = lambda n: torch.randn(n, generator=g, dtype=torch.float64)
    e = WeightEdit(m, ["L1H2", "MLP0"], [r(64), r(64)], [r(16), r(256)], [0.5, -0.7])
    x = to_inputs(m, TEXTS)
    m2 = copy.deepcopy(m)
    (attn_p, mlp_p), bl = OUT_PROJ[arch], get_module(m2, arch_spec(m2).layers)
    with torch.no_grad():
        get_module(bl[1], attn_p).weight[:, 32:48] += 0.5 * torch.outer(e.u[0], e.k[0])   # nn.Linear [out in]: head 2's 16 input columns
        get_module(bl[0], mlp_p).weight.add_(-0.7 * torch.outer(e.u[1], e.k[1]))
        ref, plain = m2(**x).logits, m(**x).logits
        with e.applied(m): lw = m(**x).logits
        with hooks(m, e.hooks(m)): lh = m(**x).logits
    assert maxdiff(lw, ref) <= 1e-10 and maxdiff(lh, ref) <= 1e-10 and maxdiff(ref, plain) > 1e-3
    assert torch.equal(m(**x).logits, plain)                                  # undone exactly
    assert_no_hooks(m)

def test_component_attribution_on_bert():
    "a head's score `<z_mean W_O^h, v_hat>` on BERT, from `attention.output.dense`'s weight and cached z (it used to find no output projection)"
    from headscope.probes.edit import component_attribution, steer_to_edit
    from headscope.probes.steering import diff_in_means
    m = tiny_model("bert", dtype=torch.float64)
    pos, neg = ["the cat sat down", "a good dog ran"], ["the bad rat sat", "a sad hog ran off"]
    v = diff_in_means(m, pos, neg, layers=[0, 1], progress=False)
    at = component_attribution(m, v, pos, neg, progress=False)
    vh = (v1 := v.vectors[1].double()) / v1.norm()
    W = m.bert.encoder.layer[1].attention.output.dense.weight.double()[:, 16:32]   # head 1: [d_model d_head]
    zs = [run_with_cache(m, to_inputs(m, p), names=["blocks.1.attn.hook_z"])["blocks.1.attn.hook_z"][0, 1:, 1] for p in pos + neg]
    zp, zn = torch.cat(zs[:2]).mean(0), torch.cat(zs[2:]).mean(0)
    assert abs(at.score("L1H1") - float(W.detach() @ ((zp + zn) / 2) @ vh)) <= 1e-9
    assert len(steer_to_edit(m, at, m=2)) == 2

def test_post_ln_refusals_name_it():
    "BERT's `attn_out` (its output dense) is no norm, but its post-LN blocks still keep it from edge attribution and attribution graphs"
    from headscope.causal.attribution import _check_sequential
    from headscope.sae.graph import _check_model
    m = tiny_model("bert")
    assert not arch_spec(m).sublayer_norm
    with pytest.raises(ValueError, match="post-LN blocks"): _check_sequential(m)
    with pytest.raises(NotImplementedError, match="post-LN blocks"): _check_model(m)
