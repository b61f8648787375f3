"""Ports of Bloom, Falcon and GPT-Neo attention (and OPT's decoder layer): the ported model computes what the original
does, and with hand-written specs headscope's exactness battery (`_checks.py`) holds on each."""
import pytest, torch, transformers
import headscope.arch as arch_mod
import headscope.hooking as hooking
import _checks
from _checks import *
from headscope.arch import ArchSpec, _SPECS, model_hook_names, model_dims, blocks, get_module, arch_spec, _out_proj
from headscope.models import byte_tokenizer
from headscope.cache import run_with_cache
from headscope.attention_ports import PORTS, ported, port, unport, grouped_qk_hooks, port_refusal

ATOL = 1e-5
TOK = byte_tokenizer()

# ---- the hand-written specs (what /tmp/h/h7_hookup.md pastes into 01a_arch_specs) ----
BLOOM = ArchSpec(layers="transformer.h", embed="transformer.word_embeddings", ln_final="transformer.ln_f",
                 attn="self_attention", attn_out="self_attention.dense",       # BloomAttention returns dense(z) + residual
                 mlp="mlp", mlp_out="mlp.dense_4h_to_h", mlp_in="mlp.dense_h_to_4h", mlp_down="mlp.dense_4h_to_h",
                 ln1="input_layernorm", ln2="post_attention_layernorm", rotary=False)
GPT_NEO = ArchSpec(layers="transformer.h", embed="transformer.wte", pos_embed="transformer.wpe", ln_final="transformer.ln_f",
                   attn="attn.attention", attn_out="attn.attention", mlp="mlp", mlp_out="mlp", mlp_in="mlp.c_fc",
                   mlp_down="mlp.c_proj", ln1="ln_1", ln2="ln_2", rotary=False)
OPT = ArchSpec(layers="model.decoder.layers", embed="model.decoder.embed_tokens", pos_embed="model.decoder.embed_positions",
               ln_final="model.decoder.final_layer_norm", attn="self_attn", attn_out="self_attn",
               mlp="fc2", mlp_out="fc2", mlp_in="fc1", mlp_down="fc2",                # fc1 -> act -> fc2 sit on the layer
               ln1="self_attn_layer_norm", ln2="final_layer_norm", rotary=False)

def falcon_spec(c)->ArchSpec:
    "Falcon's layout follows its config: one shared norm or two (new architecture), parallel or not, rotary or ALiBi"
    new = c.new_decoder_architecture
    two = new and c.num_ln_in_parallel_attn == 2
    par = new or c.parallel_attn
    ln1, ln2 = ("ln_attn", "ln_mlp") if two else ("input_layernorm", None if par else "post_attention_layernorm")
    qkv = "self_attention.query_key_value"
    fused = "groups" if new else "concat" if c.multi_query else "heads"
    rot = {} if c.alibi else dict(q_proj=qkv, k_proj=qkv, qkv_fused=fused)
    return ArchSpec(layers="transformer.h", embed="transformer.word_embeddings", ln_final="transformer.ln_f",
                    attn="self_attention", attn_out="self_attention", mlp="mlp", mlp_out="mlp",
                    mlp_in="mlp.dense_h_to_4h", mlp_down="mlp.dense_4h_to_h", ln1=ln1, ln2=ln2, parallel=par,
                    rotary=not c.alibi, **rot)

SPECS = {"bloom": lambda c: BLOOM, "gpt_neo": lambda c: GPT_NEO, "opt": lambda c: OPT, "falcon": falcon_spec}

# ---- the two lines of 01_arch and 03_attention the hookup changes, patched here for the test's duration ----
_config_dims, _qk_hooks = arch_mod.config_dims, hooking._qk_proj_hooks

def config_dims(c)->dict:
    d = _config_dims(c)
    if getattr(c, "new_decoder_architecture", False): d["n_kv_heads"] = c.num_kv_heads   # Falcon-40B: groups, even with multi_query
    d["d_mlp"] = getattr(c, "ffn_dim", None) or getattr(c, "ffn_hidden_size", None) or d["d_mlp"]   # OPT, Falcon
    return d

def qk_proj_hooks(spec, d, q_taps, k_taps):
    return grouped_qk_hooks(spec, d, q_taps, k_taps) if spec.qkv_fused == "groups" else _qk_hooks(spec, d, q_taps, k_taps)

def q_k_projected(model, l, x):   # _checks' reference for the grouped layout
    sp, d = arch_spec(model), model_dims(model)
    if sp.qkv_fused != "groups": return _q_k_projected0(model, l, x)
    g = get_module(blocks(model)[l], sp.q_proj)(x).unflatten(-1, (d.n_kv_heads, d.n_heads // d.n_kv_heads + 2, d.d_head))
    return g[..., :-2, :].flatten(-3, -2), g[..., -2, :]
_q_k_projected0 = _checks._q_k_projected
_embed_is_resid = arch_mod.embed_is_resid

def embed_is_resid(model)->bool:   # Bloom normalises the embedding before block 0 (word_embeddings_layernorm)
    return _embed_is_resid(model) and not hasattr(model.base_model, "word_embeddings_layernorm")

@pytest.fixture(scope="module", autouse=True)
def hookup():
    mp = pytest.MonkeyPatch()
    mp.setattr(arch_mod, "config_dims", config_dims); mp.setattr(hooking, "_qk_proj_hooks", qk_proj_hooks)
    mp.setattr(_checks, "_q_k_projected", q_k_projected)
    import headscope.cache, headscope.decompose
    for mod in (arch_mod, headscope.cache, headscope.decompose): mp.setattr(mod, "embed_is_resid", embed_is_resid)
    yield
    mp.undo()

# ---- tiny models ----
def tiny(kind, dtype=torch.float32, attn="eager", seed=0, **kw):
    base = dict(vocab_size=len(TOK), bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)
    D = dict(hidden_size=64, max_position_embeddings=128)
    cfg = {"bloom": lambda: transformers.BloomConfig(n_layer=2, n_head=4, hidden_size=64, hidden_dropout=0., attention_dropout=0.),
           "falcon": lambda: transformers.FalconConfig(num_hidden_layers=2, num_attention_heads=4, **D),
           "gpt_neo": lambda: transformers.GPTNeoConfig(num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                                                        window_size=4, embed_dropout=0., attention_dropout=0., resid_dropout=0., **D),
           "opt": lambda: transformers.OPTConfig(num_hidden_layers=2, num_attention_heads=4, ffn_dim=256, word_embed_proj_dim=64,
                                                 dropout=0., attention_dropout=0., **D)}[kind]()
    for k, v in {**base, **kw}.items(): setattr(cfg, k, v)
    if kind == "falcon" and cfg.new_decoder_architecture and cfg.num_ln_in_parallel_attn is None: cfg.num_ln_in_parallel_attn = 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to(dtype).eval()
    m.tokenizer = TOK
    return m

VARIANTS = {   # name -> (model_type, config overrides)
    "bloom": ("bloom", {}),
    "falcon": ("falcon", {}),                                                            # Falcon-7B: multi-query, parallel
    "falcon_seq": ("falcon", dict(multi_query=False, parallel_attn=False)),              # Falcon-RW: sequential, one KV head per head
    "falcon_new": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2)),       # Falcon-40B: KV groups, two norms
    "falcon_alibi": ("falcon", dict(alibi=True)),
    "falcon_new_alibi": ("falcon", dict(alibi=True, new_decoder_architecture=True, num_kv_heads=2)),
    "gpt_neo": ("gpt_neo", {}),                                                          # layer 0 global, layer 1 local (window 4)
    "opt": ("opt", {}),
}
ALIBI = ("bloom", "falcon_alibi", "falcon_new_alibi")

def ids_for(m, b=2, s=12, seed=1):
    return torch.randint(3, m.config.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))

def left_padded(ids):
    m = torch.ones_like(ids); m[1, :3] = 0
    return m

# ---- the ports alone: no hooks ----
# float32: bitwise, except Falcon with ALiBi before transformers 5.25, whose eager path sums (q.k + alibi) * s + mask in that
# order while the attention interface forms q.k * s + (alibi * s + mask): the same three terms, associated differently
# (<= 2 ulp). From 5.25 Falcon's attention calls the interface itself and is not ported (only its layer is): bitwise.
# float64: Bloom and GPT-Neo's own code computes in float32 inside (Bloom's softmax, GPT-Neo's scores); the port keeps float64,
# so it differs from the original by float32 rounding (<= 1e-8 here), and is the more precise of the two.
FALCON_INLINE = _checks.falcon_inline()
EXACT32 = {"falcon_alibi": 1e-6, "falcon_new_alibi": 1e-6} if FALCON_INLINE else {}
EXACT64 = {"bloom": 1e-8, "gpt_neo": 1e-8, **({"falcon_alibi": 1e-12, "falcon_new_alibi": 1e-12} if FALCON_INLINE else {})}

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(VARIANTS) + ["opt_post_ln"])   # post-LN OPT: ported exactly, though refused for hooks
def test_port_keeps_logits(name, dtype):
    kind, kw = VARIANTS.get(name) or ("opt", dict(do_layer_norm_before=False))
    m = tiny(kind, dtype, **kw)
    ids = ids_for(m)
    masks = [None, left_padded(ids)]
    # float64 with left padding: the originals' eager masks give a fully masked row NaN, and 0 * NaN reaches every position
    if dtype == torch.float64: masks[1] = torch.ones_like(ids).index_put_((torch.tensor([1]), torch.arange(9, 12)), torch.tensor(0))
    tol = (EXACT32 if dtype == torch.float32 else EXACT64).get(name, 0.0)
    attn = next(mod for mod in m.modules() if type(mod).__name__ in PORTS)
    for mask in masks:
        with torch.no_grad():
            plain = m(ids, attention_mask=mask).logits
            with ported(m):
                assert "forward" in vars(attn)
                out = m(ids, attention_mask=mask).logits
        assert "forward" not in vars(attn) and not hasattr(attn, "_headscope_taps")
        assert (torch.equal(out, plain) if tol == 0 else maxdiff(out, plain) <= tol), (name, maxdiff(out, plain))
        assert tol == 0 or maxdiff(out, plain) > 0   # a tolerance is given only where the bits do differ

@pytest.mark.parametrize("name", ["bloom", "falcon_alibi", "gpt_neo"])
def test_port_bfloat16_within_one_rounding(name):
    "bfloat16: Bloom's and GPT-Neo's own code round at other places (GPT-Neo's port scores in float32 as the original does); within a bf16 ulp"
    kind, kw = VARIANTS[name]
    m = tiny(kind, torch.bfloat16, **kw)
    ids = ids_for(m)
    with torch.no_grad():
        a = m(ids, attention_mask=left_padded(ids)).logits
        with ported(m): b = m(ids, attention_mask=left_padded(ids)).logits
    assert maxdiff(a, b) <= 2 ** -7 * a.abs().max().item()

@pytest.mark.parametrize("name", ["bloom", "falcon_alibi", "gpt_neo"])
def test_port_drops_attention_only_in_training(name):
    kind, kw = VARIANTS[name]
    m = tiny(kind, **kw, attention_dropout=0.5)
    ids = ids_for(m)
    with torch.no_grad(), ported(m):
        ev = m(ids).logits
        m.train()
        a, b = m(ids).logits, m(ids).logits
        m.eval()
        assert torch.equal(m(ids).logits, ev) and maxdiff(a, b) > 1e-3 and maxdiff(a, ev) > 1e-3

@pytest.mark.parametrize("name", ["bloom", "falcon_new", "falcon_alibi", "gpt_neo", "opt"])
def test_port_generates_with_the_kv_cache(name):
    kind, kw = VARIANTS[name]
    m = tiny(kind, **kw)
    ids = ids_for(m, s=6)
    gen = lambda: m.generate(ids, attention_mask=left_padded(ids), max_new_tokens=8, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    with torch.no_grad():
        a = gen()
        with ported(m): b = gen()
    assert torch.equal(a.sequences, b.sequences)
    assert maxdiff(torch.stack(a.scores), torch.stack(b.scores)) <= EXACT32.get(name, 0.0)

@pytest.mark.parametrize("name", ["falcon", "falcon_new", "falcon_alibi"])
def test_port_falcon_sdpa(name):
    "with SDPA the ported Falcon calls transformers' SDPA function; the original calls torch's directly: same kernel, same mask"
    kind, kw = VARIANTS[name]
    m = tiny(kind, attn="sdpa", **kw)
    ids = ids_for(m)
    with torch.no_grad():
        plain = m(ids, attention_mask=left_padded(ids)).logits
        with ported(m): out = m(ids, attention_mask=left_padded(ids)).logits
    assert maxdiff(out, plain) <= 1e-6
    _SPECS[m] = falcon_spec(m.config)
    with ported(m): check_noop_hooks_keep_logits(m, ids, ATOL)   # the pattern headscope recomputes is the one SDPA used

def test_ported_restores_on_error_and_nests():
    m = tiny("bloom")
    attn = m.transformer.h[0].self_attention
    with pytest.raises(RuntimeError):
        with ported(m):
            with ported(m): pass
            assert "forward" in vars(attn) and attn.config is m.config
            raise RuntimeError("boom")
    assert "forward" not in vars(attn) and "config" not in vars(attn)
    assert not port(tiny("opt").model.decoder.layers[0].self_attn)   # a module with nothing to port

def test_port_refuses_biased_flash():
    m = tiny("bloom")
    m.config._attn_implementation = "flash_attention_2"
    try:
        with ported(m), pytest.raises(ValueError, match="ALiBi"): m(ids_for(m))
    finally: m.config._attn_implementation = "eager"

def test_port_refusal_names_post_ln_opt():
    assert port_refusal(tiny("opt")) is None and port_refusal(tiny("bloom")) is None
    assert "post-LN" in port_refusal(tiny("opt", do_layer_norm_before=False))

# (test_hookup_ports_inside_hooks simulated the hookup on unported models; the hookup is now real, in hooking.Hooks)

@pytest.fixture(scope="module", params=list(VARIANTS))
def name(request): return request.param

@pytest.fixture(scope="module")
def model(name):
    kind, kw = VARIANTS[name]
    m = tiny(kind, **kw)
    _SPECS[m] = SPECS[kind](m.config)
    with ported(m): yield m

@pytest.fixture(scope="module")
def cache(model): return run_with_cache(model, ids_for(model), names=model_hook_names(model))

def test_noop_hooks_keep_logits(model): check_noop_hooks_keep_logits(model, ids_for(model), ATOL)
def test_eager_bitwise(model): check_eager_bitwise(model, ids_for(model))
def test_resid_matches_hidden_states(model, cache): check_resid_matches_hidden_states(model, cache, ATOL)
def test_replace_every_point_with_its_cached_value(model, cache): check_replace_with_cached(model, cache, ATOL)
def test_replacement_changes_downstream(model, cache): check_replacement_changes_downstream(model, cache)
def test_shapes_follow_dimension_words(model, cache): check_shapes(model, cache)
def test_result_is_each_heads_write(model, cache): check_result(model, cache, ATOL)
def test_result_edit_equals_z_edit(model): check_result_edits(model, ids_for(model), ATOL)
def test_scale_is_the_norms_divisor(model, cache): check_scales(model, cache, ATOL)
def test_scale_edit_divides(model): check_scale_edits(model, ids_for(model), ATOL)
def test_attn_in_mlp_in_are_the_sublayer_inputs(model, cache): check_sublayer_inputs(model, cache, ATOL)
def test_attn_in_mlp_in_edits_reach_one_sublayer(model): check_sublayer_input_edits(model, ids_for(model), ATOL)
def test_q_k_before_rotary_rot_q_k_after(model, cache): check_qk(model, cache, ATOL)
def test_q_k_edits_flow_through_rotary(model): check_qk_edits_flow_through_rotary(model, ids_for(model), ids_for(model, seed=2), ATOL)

def test_patterns_match_the_originals_output_attentions(name, model):
    "the pattern at hook_pattern (ported) is the one the original, unported model returns with output_attentions"
    ids = ids_for(model)
    c = run_with_cache(model, ids, names="blocks.*.attn.hook_pattern")
    unport(model)
    try:
        with torch.no_grad(): att = model(ids, output_attentions=True).attentions
    finally: port(model)
    for l, a in enumerate(att): assert maxdiff(c["pattern", l], a) <= 1e-6, l

def test_block_algebra(name, model, cache):
    if name in ("bloom", "opt"): return block_algebra_out_proj(model, cache, ATOL)
    check_block_algebra(model, cache, ATOL)

def block_algebra_out_proj(model, c, atol):
    "`_checks.check_block_algebra` for specs whose sublayer outputs are their last Linear (Bloom adds the residual inside its modules; OPT's MLP is on the layer)"
    sp, d = arch_spec(model), model_dims(model)
    with torch.no_grad():
        for l, blk in enumerate(blocks(model)):
            assert maxdiff(_out_proj(get_module(blk, sp.attn))(c["z", l].flatten(-2)), c["attn_out", l]) <= atol, l
            assert maxdiff(c["resid_pre", l] + c["attn_out", l], c["resid_mid", l]) <= atol
            assert maxdiff(c["resid_mid", l] + c["mlp_out", l], c["resid_post", l]) <= atol
            assert maxdiff(get_module(blk, sp.mlp_down)(c["mlp_post", l]), c["mlp_out", l]) <= atol
            act = getattr(blk, "activation_fn", None) or get_module(blk, "mlp").gelu_impl
            assert maxdiff(act(c["mlp_pre", l]), c["mlp_post", l]) <= atol
            assert maxdiff(get_module(blk, sp.ln1)(c["resid_pre", l]), c["ln1", l]) <= atol
            assert maxdiff(get_module(blk, sp.ln2)(c["resid_mid", l]), c["ln2", l]) <= atol
        assert maxdiff(get_module(model, sp.ln_final)(c["resid_post", d.n_layers - 1]), c["ln_final.hook_normalized"]) <= atol
        assert maxdiff(model.get_output_embeddings()(c["ln_final.hook_normalized"]), c.logits) <= atol

def test_attention_float64(name, model, cache):
    "scores = q.k * scale (+ ALiBi's slope * key position), pattern = softmax, z = pattern @ v, in float64 (`_checks`, ALiBi included)"
    check_attention_float64(model, cache)
    if name in ALIBI:   # the bias really is there: without it the scores differ
        q, k = cache["q", 0].double().transpose(1, 2), cache["k", 0].double().transpose(1, 2)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        plain = q @ k.transpose(-1, -2) * model_dims(model).d_head ** -0.5
        keep = cache["attn_scores", 0] > torch.finfo(torch.float32).min / 2
        assert (plain - cache["attn_scores", 0].double()).abs()[keep].max() > 1e-2

def test_gpt_neo_local_layer_masks_outside_its_window(name, model, cache):
    if name != "gpt_neo": return
    w = model.config.window_size
    glob, loc = cache["pattern", 0], cache["pattern", 1]
    assert (glob[..., -1, :-w] > 0).all() and (loc[..., -1, :-w] == 0).all() and (loc[..., -1, -w:] > 0).all()

def test_hooks_leave_nothing(model):
    before = hook_state(model)
    run_with_cache(model, ids_for(model), names=model_hook_names(model))
    assert_no_hooks(model, before)

def test_estimate_matches_cache_bytes(name, model):
    from headscope.cache import estimate_cache
    c = run_with_cache(model, ids_for(model))
    assert estimate_cache(model, c.inputs).nbytes == c.nbytes

def test_bloom_from_tiny_model_writes_linearly():
    """Bloom's `attn_out`/`mlp_out` are its last Linears, not norms (`ArchSpec.sublayer_norm` is False): the heads and bias of a
    block sum to attn_out with or without `post_norm`, edge attribution accepts it, and no fold note speaks of sublayer norms"""
    from headscope.models import tiny_model
    from headscope.causal.attribution import _check_sequential
    from headscope.weights.core import model_weights
    m = tiny_model("bloom", dtype=torch.float64)   # the table in arch_specs, not this file's copy
    assert not arch_spec(m).sublayer_norm and arch_spec(m).attn_out == "self_attention.dense"
    c = run_with_cache(m, ids_for(m))
    d = model_dims(m); H, L = d.n_heads, d.n_layers
    heads, normed = c.stack_head_results(incl_bias=True), c.stack_head_results(incl_bias=True, post_norm=True)
    assert torch.equal(heads, normed)
    for l in range(L): assert maxdiff(normed[l * H:(l + 1) * H].sum(0) + normed[L * H + l], c["attn_out", l]) <= 1e-12, l
    assert maxdiff(c.stack_head_results(incl_remainder=True).sum(0), c["resid_post", -1]) <= 1e-12
    _check_sequential(m)
    assert not any("Sublayer outputs are normalised" in n for n in model_weights(m).fold_notes)
