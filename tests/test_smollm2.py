"""The exactness checks of `test_exact.py`, on the embedded SmolLM2-135M-Instruct (30 layers, GQA 9/3)."""
import pytest, torch
from headscope.arch import model_hook_names
from headscope.cache import run_with_cache
from headscope.hooking import hooks, add, to_inputs
from _checks import *

pytestmark = pytest.mark.slow
IOI = "When Mary and John went to the store, John gave a drink to"
ATOL = 1e-4   # 30 layers of float32 with logits around 20: what the model itself varies by between kernels is ~4e-5

@pytest.fixture(scope="module")
def ids(smollm2): return to_inputs(smollm2, IOI)["input_ids"]

@pytest.fixture(scope="module")
def cache(smollm2, ids): return run_with_cache(smollm2, ids)

@pytest.fixture
def eager(smollm2):
    smollm2.set_attn_implementation("eager")
    try: yield smollm2
    finally: smollm2.set_attn_implementation("sdpa")

def test_ioi_answer(cache, smollm2):
    assert smollm2.tokenizer.decode(cache.logits[0, -1].argmax()) == " Mary"

def test_noop_hooks_bitwise(smollm2, ids): check_noop_hooks_keep_logits(smollm2, ids, ATOL)
def test_eager_bitwise(eager, ids): check_eager_bitwise(eager, ids)
def test_patterns_match_eager(eager, ids): check_patterns_match_eager(eager, ids)
def test_resid_matches_hidden_states(smollm2, cache): check_resid_matches_hidden_states(smollm2, cache, 1e-5)
def test_block_algebra(smollm2, cache): check_block_algebra(smollm2, cache, ATOL)
def test_attention_float64(smollm2, cache): check_attention_float64(smollm2, cache, atol=1e-5)
def test_replacement_changes_downstream(smollm2, cache): check_replacement_changes_downstream(smollm2, cache, layer=3)

def test_replace_with_cached(smollm2, cache):
    names = [n for n in cache if not n.startswith("blocks.") or n.split(".")[1] in ("0", "14", "29")]
    check_replace_with_cached(smollm2, cache, ATOL, names)

@pytest.fixture(scope="module")
def full(smollm2, ids): return run_with_cache(smollm2, ids, names=model_hook_names(smollm2))   # the opt-in points too

def test_points_tl_adds(smollm2, ids, full):
    "hook_result, hook_scale, hook_attn_in/mlp_in, pre- and post-rotary q/k on all 30 layers, and their edits on three"
    check_shapes(smollm2, full)
    check_result(smollm2, full, ATOL)
    check_scales(smollm2, full, 1e-5)
    check_sublayer_inputs(smollm2, full, 1e-5)
    check_qk(smollm2, full, 1e-5)
    check_result_edits(smollm2, ids, ATOL, layers=[0, 29])
    check_scale_edits(smollm2, ids, ATOL)
    check_sublayer_input_edits(smollm2, ids, ATOL, l=14)
    other = to_inputs(smollm2, "The Eiffel Tower is located in the city of Paris, which is")["input_ids"][:, :ids.shape[1]]
    check_qk_edits_flow_through_rotary(smollm2, ids, other, 1e-5, l=14)
    new = [n for n in full if n.split(".")[1:2] in (["0"], ["29"]) and n.endswith(("hook_result", "hook_scale", "hook_attn_in", "hook_mlp_in", "hook_q", "hook_k", "rot_q", "rot_k"))]
    check_replace_with_cached(smollm2, full, ATOL, new + ["ln_final.hook_scale"])

def test_cache_bytes_and_sharing(smollm2, cache):
    from headscope.cache import estimate_cache
    assert estimate_cache(smollm2, cache.inputs).nbytes == cache.nbytes
    assert cache["blocks.3.hook_resid_post"].data_ptr() == cache["blocks.4.hook_resid_pre"].data_ptr()

def test_padded_batch_matches_single_prompts(smollm2):
    prompts = [IOI, "The Eiffel Tower is located in the city of"]
    vec = torch.randn(576, generator=torch.Generator().manual_seed(0))
    hk = [("blocks.10.hook_resid_post", add(vec, pos=-1, coeff=2.0))]
    for side in ("left", "right"):
        x = to_inputs(smollm2, prompts, padding_side=side)
        c = run_with_cache(smollm2, x, names=["blocks.20.hook_resid_post"], fwd_hooks=hk)
        for i, p in enumerate(prompts):
            single = run_with_cache(smollm2, p, names=["blocks.20.hook_resid_post"], fwd_hooks=hk)
            real = x["attention_mask"][i].bool()
            assert maxdiff(c.logits[i][real], single.logits[0]) <= 2e-4, (side, i)
