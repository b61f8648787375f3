"""Interventions: positions under padding and generation, helpers, errors, and leaving the model clean."""
import gc, os, resource, pytest, torch
from headscope.models import tiny_model, TINY_ARCHS
from headscope.arch import model_hook_names, HookNameError, UnsupportedArchitectureError, model_dims
from headscope.hooking import hooks, run_with_hooks, patch, ablate, scale, add, to_inputs, HookFunctionError
from _checks import assert_no_hooks, hook_state
from headscope.cache import run_with_cache

def maxdiff(a, b): return (a.double() - b.double()).abs().max().item()


PROMPTS = ["The cat sat on the mat", "hi", "A longer prompt with more tokens in it"]

@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "gpt_neox"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_positions_under_padding(arch, side):
    "steering the last real token (pos=-1) and the 2nd real token of a padded batch equals steering each prompt alone"
    m = tiny_model(arch)
    vec = torch.randn(model_dims(m).d_model, generator=torch.Generator().manual_seed(0))
    hk = [("blocks.0.hook_resid_post", add(vec, pos=[1, -1], coeff=3.0))]
    x = to_inputs(m, PROMPTS, padding_side=side)
    batch = run_with_hooks(m, x, hk)
    seen = []
    for i, p in enumerate(PROMPTS):
        single = run_with_hooks(m, p, hk)[0]
        real = x["attention_mask"][i].bool()
        assert maxdiff(batch[i][real], single) <= 1e-4, (arch, side, i)
        seen.append(single)
    # and the steering did something
    assert maxdiff(seen[0], run_with_hooks(m, PROMPTS[0])[0]) > 1e-3

@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "phi3"])
def test_generate_with_kv_cache_matches_no_cache(arch):
    "hooks at absolute positions, and on every position, act the same with and without the KV cache"
    m = tiny_model(arch)
    x = to_inputs(m, PROMPTS[:2], padding_side="left")
    vec = torch.randn(model_dims(m).d_model, generator=torch.Generator().manual_seed(1))
    for hk in ([("blocks.1.hook_resid_pre", add(vec, pos=[2, 9], coeff=4.0))],
               [("blocks.0.attn.hook_z", scale(0.0, head=1))],
               [("blocks.1.hook_mlp_out", add(vec, coeff=2.0))]):
        outs = []
        for use_cache in (True, False):
            with hooks(m, hk), torch.no_grad():
                outs.append(m.generate(**x, max_new_tokens=8, do_sample=False, use_cache=use_cache, pad_token_id=m.tokenizer.pad_token_id))
        assert torch.equal(outs[0], outs[1]), arch
        with torch.no_grad():
            plain = m.generate(**x, max_new_tokens=8, do_sample=False, pad_token_id=m.tokenizer.pad_token_id)
    assert_no_hooks(m)

def test_generate_last_position_is_each_new_token():
    "with the KV cache, pos=-1 acts on the newest token of every step: the positions seen are prompt_len-1, prompt_len, ..."
    m = tiny_model("llama")
    x = to_inputs(m, PROMPTS[:2], padding_side="left")
    seen = []
    def rec(act, hook):
        seen.append((act.shape[1], hook.lengths.tolist(), hook.positions[:, -1].tolist()))
    with hooks(m, [("blocks.0.hook_resid_post", rec)]), torch.no_grad():
        m.generate(**x, max_new_tokens=4, do_sample=False, pad_token_id=m.tokenizer.pad_token_id)
    n = x["attention_mask"].sum(-1).tolist()
    assert seen[0][0] == x["input_ids"].shape[1] and seen[0][2] == [k - 1 for k in n]
    for step, (s, lengths, last) in enumerate(seen[1:], 1):
        assert s == 1 and last == [k - 1 + step for k in n] and lengths == [k + step for k in n]

def test_patch_heads_and_positions_from_cache():
    "patching one head at one position from another run changes exactly that and what depends on it"
    m = tiny_model("llama", n_layers=2)
    a, b = torch.randint(3, 200, (1, 8)), torch.randint(3, 200, (1, 8))
    ca = run_with_cache(m, a, names=["blocks.1.attn.hook_z"])
    cb = run_with_cache(m, b, names=["blocks.1.attn.hook_z"],
                        fwd_hooks=[("blocks.1.attn.hook_z", patch(ca["z", 1], pos=3, head=2))])
    z_plain = run_with_cache(m, b, names=["blocks.1.attn.hook_z"])["z", 1]
    changed = (cb["z", 1] != z_plain).any(-1)[0]          # [pos head]
    assert changed.nonzero().tolist() == [[3, 2]]
    assert torch.equal(cb["z", 1][0, 3, 2], ca["z", 1][0, 3, 2])

def test_ablate_head_equals_zeroing_o_proj_columns():
    "zero-ablating head h in hook_z equals zeroing its input columns of the output projection (independent reference)"
    m = tiny_model("llama", n_layers=2); ids = torch.randint(3, 200, (2, 9))
    d = model_dims(m); h = 1
    out = run_with_hooks(m, ids, [("blocks.0.attn.hook_z", ablate(head=h))])
    o = m.model.layers[0].self_attn.o_proj
    w = o.weight.data.clone()
    try:
        o.weight.data[:, h * d.d_head:(h + 1) * d.d_head] = 0
        with torch.no_grad(): ref = m(ids).logits
    finally: o.weight.data = w
    assert maxdiff(out, ref) <= 1e-6

def test_pattern_edit_reaches_output():
    "replacing a pattern by attention to the first token makes z equal to v of the first token"
    m = tiny_model("gpt2"); ids = torch.randint(3, 200, (1, 7))
    def to_bos(p, hook): q = torch.zeros_like(p); q[..., 0] = 1; return q
    c = run_with_cache(m, ids, names=["blocks.0.attn.hook_v", "blocks.0.attn.hook_z"], fwd_hooks=[("blocks.0.attn.hook_pattern", to_bos)])
    v0 = c["v", 0][:, :1]
    assert maxdiff(c["z", 0], v0.expand_as(c["z", 0])) <= 1e-6

# ---------------------------------------------------------------------------------------- errors

def test_unknown_name_lists_near_matches():
    m = tiny_model("llama")
    with pytest.raises(HookNameError, match="blocks.0.hook_resid_pre"):
        run_with_hooks(m, "hi", [("blocks.0.hook_resid_pr", lambda a, h: None)])
    with pytest.raises(HookNameError, match="2 layers"):
        run_with_cache(m, "hi", names=["blocks.5.attn.hook_pattern"])
    assert_no_hooks(m)

def test_wrong_shape_names_hook_and_shapes():
    m = tiny_model("qwen3")
    with pytest.raises(HookFunctionError, match=r"blocks.1.attn.hook_pattern returned shape \(1, 4, 3, 2\).*\(1, 4, 3, 3\)"):
        run_with_hooks(m, "ab", [("blocks.1.attn.hook_pattern", lambda p, h: p[..., :2])])
    assert_no_hooks(m); assert m.config._attn_implementation == "sdpa"

def test_head_out_of_range():
    m = tiny_model("llama", n_heads=4, n_kv_heads=2)
    with pytest.raises(IndexError, match="Head 4 is out of range at blocks.0.attn.hook_z: it has 4 heads"):
        run_with_hooks(m, "abc", [("blocks.0.attn.hook_z", ablate(head=4))])
    with pytest.raises(IndexError, match="2 kv heads"):
        run_with_hooks(m, "abc", [("blocks.0.attn.hook_k", ablate(head=3))])

def test_unsupported_architecture_lists_supported():
    from transformers import ElectraConfig, ElectraForMaskedLM   # BERT's layout, but no hook map (BERT itself has one now)
    m = ElectraForMaskedLM(ElectraConfig(vocab_size=50, embedding_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="Supported: .*gpt2.*llama"):
        run_with_cache(m, torch.tensor([[1, 2, 3]]))

def test_empty_prompt():
    m = tiny_model("llama")
    with pytest.raises(ValueError, match="empty"): run_with_cache(m, "")
    with pytest.raises(ValueError, match="no tokens"): run_with_cache(m, torch.zeros(1, 0, dtype=torch.long))

def test_interrupt_inside_hook_leaves_model_clean():
    m = tiny_model("gemma2")
    impl = m.config._attn_implementation
    def boom(a, h): raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_with_cache(m, "abc", names=["blocks.*.attn.hook_pattern"], fwd_hooks=[("blocks.1.attn.hook_q", boom)])
    assert_no_hooks(m); assert m.config._attn_implementation == impl

def test_nested_hooks_compose_and_unwind():
    m = tiny_model("llama"); ids = torch.randint(3, 200, (1, 6))
    with torch.no_grad(): plain = m(ids).logits
    with hooks(m, [("blocks.0.attn.hook_z", scale(0.5))]):
        with hooks(m, [("blocks.1.attn.hook_pattern", lambda p, h: None)]):
            inner = run_with_hooks(m, ids)
        assert m.config._attn_implementation.startswith("headscope")
        outer = run_with_hooks(m, ids)
    assert maxdiff(inner, outer) <= 1e-6 and maxdiff(outer, plain) > 1e-4
    assert_no_hooks(m); assert m.config._attn_implementation == "sdpa"

def _rss_mb():
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def test_thousand_forwards_no_leftovers_no_growth():
    "1,000 cached forwards, a third raising inside a hook: no hooks left, memory flat"
    m = tiny_model("llama", n_layers=2)
    ids = torch.randint(3, 200, (2, 16))
    names = ["blocks.*.hook_resid_post", "blocks.*.attn.hook_pattern", "blocks.*.attn.hook_z", "blocks.*.attn.hook_result",
             "blocks.*.ln1.hook_scale", "blocks.*.hook_attn_in", "blocks.*.attn.hook_rot_q", "ln_final.hook_scale"]
    def boom(a, h): raise RuntimeError("boom")
    def run(i):
        try:
            run_with_cache(m, ids, names=names, fwd_hooks=[(("blocks.1.attn.hook_q", "blocks.1.attn.hook_rot_k")[i % 2], boom)] if i % 3 == 0 else ())
        except RuntimeError: pass
    for i in range(100): run(i)
    gc.collect(); start = _rss_mb()
    for i in range(1000): run(i)
    gc.collect(); grow = _rss_mb() - start
    assert_no_hooks(m); assert m.config._attn_implementation == "sdpa"
    assert grow < 20, f"resident memory grew by {grow:.1f} MiB over 1,000 forwards"

def test_positions_in_cached_generate_unpadded():
    "One unpadded prompt: transformers may send no attention mask and name the KV cache `cache`; positions must still count on"
    from headscope.models import tiny_model
    from headscope.hooking import hooks
    m = tiny_model("llama", n_layers=2, seed=0)
    seen = []
    with hooks(m, [("blocks.0.hook_resid_pre", lambda act, hook: seen.append(hook.positions[0].tolist()))]):
        m.generate(input_ids=torch.tensor([[5, 9, 13, 17]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert seen == [[0, 1, 2, 3], [4], [5]]

def test_assert_no_hooks_catches_leftovers():
    "the one leak check fails on a stray PyTorch hook, a leftover tap and a switched attention implementation"
    m = tiny_model("llama")
    assert_no_hooks(m)
    h = m.model.layers[0].register_forward_hook(lambda *a: None)
    with pytest.raises(AssertionError, match="hooks or taps left"): assert_no_hooks(m)
    before = hook_state(m)
    assert_no_hooks(m, before=before)                       # compared with a snapshot: the model's own hooks are allowed
    h.remove()
    with pytest.raises(AssertionError, match="hooks left on"): assert_no_hooks(m, before=before)
    hk = hooks(m, [("blocks.0.attn.hook_z", lambda a, h: None)]); hk.__enter__()
    try:
        with pytest.raises(AssertionError, match="attention implementation left switched"): assert_no_hooks(m)
    finally: hk.__exit__(None, None, None)
    assert_no_hooks(m)

def test_run_until_stops_and_cleans_up():
    "run_until ends the forward after the hook point (later hooks never run) and leaves nothing behind, also when a hook raises"
    from headscope.hooking import run_until
    m = tiny_model("gpt2", n_layers=3)
    x = to_inputs(m, torch.randint(3, 200, (2, 7)))
    ran = []
    out = run_until(m, x, [("blocks.2.hook_resid_pre", lambda a, h: ran.append(2)), ("blocks.0.attn.hook_pattern", lambda a, h: ran.append(0))],
                    stop_after="blocks.1.hook_resid_post")
    assert out is None and ran == [0]
    assert_no_hooks(m)
    def boom(a, h): raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"): run_until(m, x, [("blocks.0.attn.hook_z", boom)], stop_at_layer=2)
    assert_no_hooks(m)

# ---------------------------------------------------------------------------------------- the points TransformerLens adds

NEW_POINTS = ("hook_attn_in", "ln1.hook_scale", "attn.hook_q", "attn.hook_k", "attn.hook_rot_q", "attn.hook_rot_k",
              "attn.hook_result", "hook_mlp_in", "ln2.hook_scale", "ln_final.hook_scale")

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_new_points_leave_nothing_behind(arch):
    "reading every new point, then a hook raising at each one mid-forward: no hook, tap or attention switch is left"
    m = tiny_model(arch, n_layers=2)
    impl, ids = m.config._attn_implementation, torch.randint(3, 200, (2, 6))
    names = [n for n in model_hook_names(m) if n.endswith(NEW_POINTS)]
    assert len(names) >= 2 * 5 + 1
    with torch.no_grad(): plain = m(ids).logits
    c = run_with_cache(m, ids, names=names)
    assert set(c) == set(names) and torch.equal(c.logits, plain)
    assert_no_hooks(m); assert m.config._attn_implementation == impl
    def boom(a, h): raise RuntimeError("boom")
    for n in names:
        with pytest.raises(RuntimeError, match="boom"): run_with_cache(m, ids, names=names, fwd_hooks=[(n, boom)])
        assert_no_hooks(m); assert m.config._attn_implementation == impl, n

def _hooked(m):
    return {n for n, mod in m.named_modules() if mod._forward_hooks or mod._forward_pre_hooks}

def test_new_points_cost_nothing_unless_asked():
    "a forward that does not ask for a point registers nothing for it; pre-rotary q, scales and results never leave SDPA"
    m = tiny_model("phi3", n_layers=2)
    with hooks(m, [("blocks.0.hook_resid_post", lambda a, h: None)]):
        assert _hooked(m) == {"", "model.layers.0"}                         # the positions pre-hook and the block
    asks = {"blocks.1.attn.hook_result": "model.layers.1.self_attn.o_proj", "blocks.1.attn.hook_q": "model.layers.1.self_attn.qkv_proj",
            "blocks.1.ln2.hook_scale": "model.layers.1.post_attention_layernorm", "blocks.1.hook_mlp_in": "model.layers.1.post_attention_layernorm",
            "ln_final.hook_scale": "model.norm", "blocks.0.hook_attn_in": "model.layers.0.input_layernorm"}
    for name, module in asks.items():
        with hooks(m, [(name, lambda a, h: None)]):
            assert _hooked(m) == {"", module}, name
            assert m.config._attn_implementation == "sdpa", name
    with hooks(m, [("blocks.1.attn.hook_rot_q", lambda a, h: None)]):   # post-rotary: inside the attention function
        assert m.config._attn_implementation.startswith("headscope") and _hooked(m) == {""}
    assert_no_hooks(m)

def test_act_name_tl_forms():
    "TransformerLens' get_act_name forms for the new points"
    from headscope.arch import act_name
    assert act_name("scale", 2, "ln2") == "blocks.2.ln2.hook_scale" and act_name("scale") == "ln_final.hook_scale"
    assert act_name("result", 1) == "blocks.1.attn.hook_result" and act_name("rot_q", 0) == "blocks.0.attn.hook_rot_q"
    assert act_name("attn_in", 3) == "blocks.3.hook_attn_in" and act_name("mlp_in", 3) == "blocks.3.hook_mlp_in"
