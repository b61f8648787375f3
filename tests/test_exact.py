"""Every hook point of every tiny architecture equals an independent recomputation (see `_checks.py`)."""
import pytest, torch
from headscope.models import tiny_model, TINY_ARCHS, MORE_ARCHS
from headscope.tiny_encoders import ENCODER_ARCHS, VISION_ARCHS
from headscope.arch import model_dims, model_hook_names
from headscope.cache import run_with_cache
from _checks import *

ATOL = 1e-5

def ids_for(m, b=2, s=12, seed=1):
    "token ids `[b s]`; for a vision transformer, images `[b 3 16 16]` (16 patches and the prefix tokens)"
    g = torch.Generator().manual_seed(seed)
    if m.config.model_type in VISION_ARCHS: return torch.randn(b, 3, 16, 16, generator=g).to(m.dtype)
    return torch.randint(3, m.config.get_text_config().vocab_size, (b, s), generator=g)

ARCHS = TINY_ARCHS + MORE_ARCHS + ENCODER_ARCHS + VISION_ARCHS   # the core matrix and every further family headscope claims (the README's parity table)

@pytest.fixture(scope="module", params=ARCHS)
def arch(request): return request.param

@pytest.fixture(scope="module")
def model(arch): return tiny_model(arch, n_layers=2)

@pytest.fixture(scope="module")
def eager_model(arch): return tiny_model(arch, n_layers=2, attn_implementation="eager")

@pytest.fixture(scope="module")
def cache(model): return run_with_cache(model, ids_for(model), names=model_hook_names(model))   # every point, opt-in ones too

def test_noop_hooks_keep_logits(model): check_noop_hooks_keep_logits(model, ids_for(model), ATOL)
def test_eager_model_bitwise(eager_model): check_eager_bitwise(eager_model, ids_for(eager_model))
def test_resid_matches_hidden_states(model, cache): check_resid_matches_hidden_states(model, cache, ATOL)
def test_patterns_match_eager_output_attentions(eager_model): check_patterns_match_eager(eager_model, ids_for(eager_model))
def test_block_algebra(model, cache): check_block_algebra(model, cache, ATOL)
def test_attention_float64(model, cache): check_attention_float64(model, cache)
def test_replace_every_point_with_its_cached_value(model, cache): check_replace_with_cached(model, cache, ATOL)
def test_replacement_changes_downstream(model, cache): check_replacement_changes_downstream(model, cache)
def test_shapes_follow_dimension_words(model, cache): check_shapes(model, cache)

# the points TransformerLens users expect beyond the core set
def test_result_is_each_heads_write(model, cache): check_result(model, cache, ATOL)
def test_result_edit_equals_z_edit(model): check_result_edits(model, ids_for(model), ATOL)
def test_scale_is_the_norms_divisor(model, cache): check_scales(model, cache, ATOL)
def test_scale_edit_divides(model): check_scale_edits(model, ids_for(model), ATOL)
def test_attn_in_mlp_in_are_the_sublayer_inputs(model, cache): check_sublayer_inputs(model, cache, ATOL)
def test_attn_in_mlp_in_edits_reach_one_sublayer(model): check_sublayer_input_edits(model, ids_for(model), ATOL)
def test_q_k_before_rotary_rot_q_k_after(model, cache): check_qk(model, cache, ATOL)
def test_router_edits_reroute(model): check_router_edits(model, ids_for(model), ATOL)
def test_q_k_edits_flow_through_rotary(model): check_qk_edits_flow_through_rotary(model, ids_for(model), ids_for(model, seed=2), ATOL)

def test_opt_in_points_only_when_named(model):
    "hook_result, hook_attn_in, hook_mlp_in exist, but `names=None` (everything) leaves them out, as TransformerLens' flags do"
    c = run_with_cache(model, ids_for(model))
    opt = [n for n in model_hook_names(model) if n.endswith(("attn.hook_result", "hook_attn_in", "hook_mlp_in"))]
    assert len(opt) == (1 if shared_norm(model) else 3) * model_dims(model).n_layers and not set(opt) & set(c)
    assert set(c) | set(opt) == set(model_hook_names(model))

@pytest.mark.parametrize("arch", ARCHS)
def test_result_float64(arch):
    "in float64 the writes of the heads add up to the output projection to rounding"
    m = tiny_model(arch, n_layers=2, dtype=torch.float64)
    ids = ids_for(m)
    c = run_with_cache(m, ids, names=lambda n: n.endswith(("attn.hook_z", "attn.hook_result", "hook_attn_out")))
    check_result(m, c, 1e-12)
    check_result_edits(m, ids, 1e-12)

def test_gpt2_qkv_from_c_attn():
    m = tiny_model("gpt2"); ids = ids_for(m)
    c = run_with_cache(m, ids, names=["blocks.0.ln1.hook_normalized", "blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v"])
    assert "blocks.0.attn.hook_rot_q" not in model_hook_names(m)    # learned positions: q and k are what attention scores with
    with torch.no_grad(): qkv = m.transformer.h[0].attn.c_attn(c["blocks.0.ln1.hook_normalized"])
    d = model_dims(m)
    for part, key in zip(qkv.split(d.d_model, -1), ("q", "k", "v")):
        assert maxdiff(part.view(*part.shape[:2], d.n_heads, d.d_head), c[key, 0]) <= ATOL
        assert c[key, 0].untyped_storage().nbytes() == c[key, 0].numel() * 4   # slice of fused qkv copied, not kept whole

def test_estimate_matches_cache_bytes(model):
    from headscope.cache import estimate_cache
    c = run_with_cache(model, ids_for(model))
    assert estimate_cache(model, c.inputs).nbytes == c.nbytes
