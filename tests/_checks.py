"""Exactness checks shared by the tiny-architecture matrix and the SmolLM2 integration test.

Each check compares a headscope hook point with an independent reference: a plain Hugging Face
forward (`output_hidden_states`, eager `output_attentions`), the model's own submodules applied to
cached inputs, or a float64 recomputation of attention."""
import torch
from headscope.arch import model_hook_names, blocks, get_module, arch_spec, model_dims
from headscope.hooking import run_with_hooks
from headscope.cache import run_with_cache

O_PROJ = {"gpt2": "c_proj", "gpt_neox": "dense"}   # output projection inside the attention module; others: o_proj

def maxdiff(a, b): return (a.double() - b.double()).abs().max().item()

def check_noop_hooks_keep_logits(model, ids, atol):
    with torch.no_grad(): plain = model(ids).logits
    noop = [(n, lambda a, h: None) for n in model_hook_names(model)]
    # hooks that only read never change the computation, patterns included: bit-for-bit equal
    assert torch.equal(run_with_hooks(model, ids, noop), plain)
    # a pattern recomputed explicitly (as a replacing hook forces) stays within `atol` of the model's kernel
    same = run_with_hooks(model, ids, [("blocks.*.attn.hook_pattern", lambda p, h: p.clone())])
    assert maxdiff(same, plain) <= atol

def check_eager_bitwise(eager_model, ids):
    with torch.no_grad(): plain = eager_model(ids).logits
    out = run_with_hooks(eager_model, ids, [(n, lambda a, h: None) for n in model_hook_names(eager_model)])
    assert torch.equal(out, plain)

def check_resid_matches_hidden_states(model, c, atol):
    with torch.no_grad(): hs = model(**c.inputs, output_hidden_states=True).hidden_states
    L = model_dims(model).n_layers
    for l in range(L): assert maxdiff(c["resid_pre", l], hs[l]) <= atol, l
    assert maxdiff(c["ln_final.hook_normalized"], hs[L]) <= atol   # transformers' last hidden state is normalised
    assert maxdiff(c.resid_stack()[:L], torch.stack(hs[:L])) <= atol

def check_patterns_match_eager(eager_model, ids, atol=1e-6):
    c = run_with_cache(eager_model, ids, names="blocks.*.attn.hook_pattern")
    with torch.no_grad(): att = eager_model(ids, output_attentions=True).attentions
    for l, a in enumerate(att): assert maxdiff(c["pattern", l], a) <= atol, l

def check_block_algebra(model, c, atol):
    sp, d, arch = arch_spec(model), model_dims(model), model.config.model_type
    with torch.no_grad():
        for l, blk in enumerate(blocks(model)):
            attn = get_module(blk, sp.attn)
            o = getattr(attn, O_PROJ.get(arch, "o_proj"))(c["z", l].flatten(-2))
            if sp.attn_out != sp.attn: o = get_module(blk, sp.attn_out)(o)   # sandwich norm after attention
            assert maxdiff(o, c["attn_out", l]) <= atol, ("z through the output projection is attn_out", l)
            if d.parallel:
                assert maxdiff(c["resid_pre", l] + c["attn_out", l] + c["mlp_out", l], c["resid_post", l]) <= atol
            else:
                assert maxdiff(c["resid_pre", l] + c["attn_out", l], c["resid_mid", l]) <= atol
                assert maxdiff(c["resid_mid", l] + c["mlp_out", l], c["resid_post", l]) <= atol
            out = get_module(blk, sp.mlp_down)(c[f"blocks.{l}.mlp.hook_post"])
            if sp.mlp_out != sp.mlp: out = get_module(blk, sp.mlp_out)(out)
            assert maxdiff(out, c["mlp_out", l]) <= atol, ("mlp_post through the down projection is mlp_out", l)
            mlp = get_module(blk, sp.mlp)
            act = getattr(mlp, "act_fn", None) or getattr(mlp, "act", None) or getattr(mlp, "activation_fn")
            pre = c[f"blocks.{l}.mlp.hook_pre"]
            post = act(pre) * c[f"blocks.{l}.mlp.hook_pre_linear"] if d.gated else act(pre)
            assert maxdiff(post, c[f"blocks.{l}.mlp.hook_post"]) <= atol, l
            if sp.ln1 is not None:
                assert maxdiff(get_module(blk, sp.ln1)(c["resid_pre", l]), c[f"blocks.{l}.ln1.hook_normalized"]) <= atol
            if sp.ln2 is not None:
                src = c["resid_pre", l] if d.parallel else c["resid_mid", l]
                assert maxdiff(get_module(blk, sp.ln2)(src), c[f"blocks.{l}.ln2.hook_normalized"]) <= atol
        last = c["resid_post", d.n_layers - 1]
        assert maxdiff(get_module(model, sp.ln_final)(last), c["ln_final.hook_normalized"]) <= atol
        logits = model.get_output_embeddings()(c["ln_final.hook_normalized"])
        assert maxdiff(logits, c["hook_logits"]) <= atol
        cap = getattr(model.config, "final_logit_softcapping", None)   # Gemma 2 caps logits after the unembedding
        if cap: logits = torch.tanh(logits / cap) * cap
        assert maxdiff(logits, c.logits) <= atol

def check_attention_float64(model, c, atol=1e-5):
    "scores = q.k * scale (+ softcap), pattern = softmax(scores), z = pattern @ v, recomputed in float64"
    d = model_dims(model)
    rep = d.n_heads // d.n_kv_heads
    for l, blk in enumerate(blocks(model)):
        attn = get_module(blk, arch_spec(model).attn)
        q = c["q", l].double().transpose(1, 2)
        k = c["k", l].double().transpose(1, 2).repeat_interleave(rep, 1)
        v = c["v", l].double().transpose(1, 2).repeat_interleave(rep, 1)
        s = q @ k.transpose(-1, -2) * attn.scaling
        cap = getattr(attn, "attn_logit_softcapping", None)
        if cap: s = torch.tanh(s / cap) * cap
        sc = c["attn_scores", l]
        keep = sc > torch.finfo(sc.dtype).min / 2                       # entries the mask lets through
        assert keep.any(-1).all()
        assert (s - sc.double()).abs()[keep].max().item() <= 10 * atol, l
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
        assert maxdiff(p, c["pattern", l]) <= atol, l
        assert maxdiff((p @ v).transpose(1, 2), c["z", l]) <= atol, l
        win = getattr(attn, "sliding_window", None)
        if win and sc.shape[-1] > win:   # a sliding-window layer really masks keys further back than the window
            assert not keep[..., -1, : sc.shape[-1] - win].any()

def check_replace_with_cached(model, c, atol, names=None):
    ids = c.inputs["input_ids"]
    for n in names or model_hook_names(model):
        v = c[n].clone()
        out = run_with_hooks(model, ids, [(n, lambda a, h, v=v: v)])
        assert maxdiff(out, c.logits) <= atol, n

def check_replacement_changes_downstream(model, c, layer=0):
    "a replaced point really feeds forward: doubling it changes the logits"
    ids = c.inputs["input_ids"]
    for kind in ["hook_resid_pre", "attn.hook_attn_scores", "attn.hook_v", "mlp.hook_pre", "mlp.hook_post", "hook_resid_mid"]:
        n = f"blocks.{layer}.{kind}"
        if n not in c: continue
        out = run_with_hooks(model, ids, [(n, lambda a, h: a * 2)])
        assert maxdiff(out, c.logits) > 1e-4, n

def hook_state(model):
    "Every PyTorch hook and headscope mark on `model`, and its attention implementation(s): a snapshot to compare"
    mods = {n: (len(mod._forward_hooks), len(mod._forward_pre_hooks), len(getattr(mod, "_forward_hooks_with_kwargs", {})),
                hasattr(mod, "_headscope_taps")) for n, mod in model.named_modules()}
    cfgs = [model.config] + [getattr(model.config, k) for k in ("text_config", "vision_config") if hasattr(model.config, k)]
    return {"modules": mods, "attn": [getattr(c, "_attn_implementation", None) for c in cfgs]}

def assert_no_hooks(model, before=None):
    """Nothing headscope attached is left on `model`: no PyTorch forward (pre-)hook, no attention tap, and the
    attention implementation is the model's own again, not a registered `headscope_*` one. With `before` (a
    `hook_state` taken earlier) the state must equal it (for models whose own code registers hooks); without it,
    no module may carry any hook at all."""
    now = hook_state(model)
    impls = [a for a in now["attn"] if a is not None]
    assert not any(str(a).startswith("headscope") for a in impls), f"attention implementation left switched: {impls}"
    from headscope.attention import _BASES
    assert not any(a in _BASES for a in impls), f"a headscope attention registration is still in use: {impls}"
    if before is not None:
        assert now["attn"] == before["attn"], f"attention implementation changed: {before['attn']} -> {now['attn']}"
        diff = {n: (before["modules"].get(n), v) for n, v in now["modules"].items() if before["modules"].get(n) != v}
        assert not diff, f"hooks left on {sorted(diff)[:5]}: {list(diff.values())[:5]}"
    else:
        left = [n or "<model>" for n, v in now["modules"].items() if any(v)]
        assert not left, f"hooks or taps left on {left[:5]}"
