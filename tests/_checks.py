"""Exactness checks shared by the tiny-architecture matrix and the SmolLM2 integration test.

Each check compares a headscope hook point with an independent reference: a plain Hugging Face
forward (`output_hidden_states`, eager `output_attentions`), the model's own submodules applied to
cached inputs, or a float64 recomputation of attention."""
import math, torch
from torch import nn
from headscope.arch import model_hook_names, blocks, get_module, arch_spec, model_dims, post_rotary_kind, hook_shape, _layer_out_proj
from headscope.hooking import run_with_hooks, ablate, hooks
from headscope.cache import run_with_cache
from headscope.tokens import input_shape

O_PROJ = {"gpt2": "c_proj", "gpt_neox": "dense"}   # output projection inside the attention module; others: o_proj

def maxdiff(a, b): return (a.double() - b.double()).abs().max().item()

def inp(c):
    "the input tensor of a cache's forward: token ids, or a vision transformer's `pixel_values`"
    return c.inputs["input_ids"] if "input_ids" in c.inputs else c.inputs["pixel_values"]

def _has(model, n): return n in model_hook_names(model)

def _mlp_act(mlp):
    return next(getattr(mlp, a) for a in ("act_fn", "act", "activation_fn", "intermediate_act_fn", "activation", "gelu_impl") if hasattr(mlp, a))   # Bloom: gelu_impl

def _ln_final_input(model, x:dict):
    "what the final norm reads in a plain forward, caught by a plain PyTorch hook (encoders: the MLM head's dense + GELU of the last block's output)"
    got = {}
    h = get_module(model, arch_spec(model).ln_final).register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0]))
    try:
        with torch.no_grad(): model(**x)
    finally: h.remove()
    return got["x"]

def _head_logits(model, x):
    "logits from the final norm's output: the unembedding, or a vision transformer's classifier on [CLS] (DINOv2: [CLS] and the patches' mean)"
    sp = arch_spec(model)
    if not sp.unembed: return model.get_output_embeddings()(x)
    skip = 1 + getattr(model.config, "num_register_tokens", 0)   # DINOv2: [CLS] and the mean of the patches (registers left out)
    feat = torch.cat([x[:, 0], x[:, skip:].mean(1)], -1) if "dinov2" in model.config.model_type else x[:, 0]
    return get_module(model, sp.unembed)(feat)

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
    sp = arch_spec(model)
    if sp.post_ln: last = c[f"blocks.{L-1}.ln2.hook_normalized"]        # BERT: the last block's output norm
    elif sp.head: last = get_module(model, sp.head[0])(c["resid_post", L - 1])   # ModernBERT: its final norm, the MLM head's first module
    elif sp.unembed: last = c["resid_post", L - 1]                     # ViT: before the final norm
    else: last = c["ln_final.hook_normalized"]                         # decoders: transformers' last hidden state is normalised
    assert maxdiff(last, hs[L]) <= atol
    assert maxdiff(c.resid_stack()[:L], torch.stack(hs[:L])) <= atol

def check_patterns_match_eager(eager_model, ids, atol=1e-6):
    c = run_with_cache(eager_model, ids, names="blocks.*.attn.hook_pattern")
    with torch.no_grad(): att = eager_model(ids, output_attentions=True).attentions
    for l, a in enumerate(att): assert maxdiff(c["pattern", l], a) <= atol, l

def check_block_algebra(model, c, atol):
    sp, d, arch = arch_spec(model), model_dims(model), model.config.model_type
    with torch.no_grad():
        for l, blk in enumerate(blocks(model)):
            proj = _layer_out_proj(model, l)
            o = proj(c["z", l].flatten(-2))
            if sp.attn_out not in (sp.attn, sp.out_proj) and get_module(blk, sp.attn_out) is not proj:   # Bloom: attn_out is the projection
                o = get_module(blk, sp.attn_out)(o)   # sandwich norm (DINOv2: LayerScale) after attention
            assert maxdiff(o, c["attn_out", l]) <= atol, ("z through the output projection is attn_out", l)
            r = getattr(model.config.get_text_config(), "residual_multiplier", 1.0)   # Granite scales each sublayer's output as it adds it
            if sp.post_ln:   # BERT: resid_mid = resid_pre + attn_out -> ln1; resid_post = ln1 + mlp_out -> ln2, the block's output
                n1, n2 = c[f"blocks.{l}.ln1.hook_normalized"], c[f"blocks.{l}.ln2.hook_normalized"]
                assert maxdiff(c["resid_pre", l] + c["attn_out", l], c["resid_mid", l]) <= atol
                assert maxdiff(n1 + c["mlp_out", l], c["resid_post", l]) <= atol
                nxt = c["resid_pre", l + 1] if l + 1 < d.n_layers else None
                if nxt is not None: assert torch.equal(n2, nxt), ("ln2's output is the next block's input", l)
            elif d.parallel:
                assert maxdiff(c["resid_pre", l] + r * (c["attn_out", l] + c["mlp_out", l]), c["resid_post", l]) <= atol
            else:
                assert maxdiff(c["resid_pre", l] + r * c["attn_out", l], c["resid_mid", l]) <= atol
                assert maxdiff(c["resid_mid", l] + r * c["mlp_out", l], c["resid_post", l]) <= atol
            if l in d.moe_layers:   # a sparse MoE block: it maps ln2's output to mlp_out; the router's logits are a linear map of it
                x = c[f"blocks.{l}.ln2.hook_normalized"] if sp.ln2 else c["resid_mid", l]
                assert maxdiff(get_module(blk, sp.mlp)(x), c["mlp_out", l]) <= atol, ("MoE block of ln2 is mlp_out", l)
                w = get_module(blk, sp.router).weight
                assert maxdiff(x.double() @ w.double().T, c[f"blocks.{l}.mlp.hook_router"]) <= atol, ("router logits", l)
            else:
                out = get_module(blk, sp.mlp_down)(c[f"blocks.{l}.mlp.hook_post"])
                if sp.mlp_out not in (sp.mlp, sp.mlp_down): out = get_module(blk, sp.mlp_out)(out)
                assert maxdiff(out, c["mlp_out", l]) <= atol, ("mlp_post through the down projection is mlp_out", l)
                act = _mlp_act(get_module(blk, sp.mlp) if sp.mlp not in (sp.mlp_down, sp.mlp_in) else blk)   # OPT: fc1 -> act -> fc2 on the layer
                pre = c[f"blocks.{l}.mlp.hook_pre"]
                post = act(pre) * c[f"blocks.{l}.mlp.hook_pre_linear"] if d.gated else act(pre)
                assert maxdiff(post, c[f"blocks.{l}.mlp.hook_post"]) <= atol, l
            if sp.ln1 is not None and f"blocks.{l}.ln1.hook_normalized" in c:   # ModernBERT's layer 0 has no attention norm
                src = c["resid_mid", l] if sp.post_ln else c["resid_pre", l]
                assert maxdiff(get_module(blk, sp.ln1)(src), c[f"blocks.{l}.ln1.hook_normalized"]) <= atol
            if sp.ln2 is not None:
                src = c["resid_post", l] if sp.post_ln else c["resid_pre", l] if d.parallel else c["resid_mid", l]
                assert maxdiff(get_module(blk, sp.ln2)(src), c[f"blocks.{l}.ln2.hook_normalized"]) <= atol
        if sp.embed_ln:   # encoders: the embeddings' LayerNorm over word + position (+ segment) embeddings enters block 0
            e = sum(c[n] for n in ("hook_embed", "hook_pos_embed", "hook_token_type_embed") if n in c)
            assert maxdiff(get_module(model, sp.embed_ln)(e), c["embed.ln.hook_normalized"]) <= atol
            assert torch.equal(c["embed.ln.hook_normalized"], c["resid_pre", 0])
        L = d.n_layers
        last = c[f"blocks.{L-1}.ln2.hook_normalized"] if sp.post_ln else c["resid_post", L - 1]   # the last block's output
        if sp.head:   # encoders: the MLM head maps the last block's output to the logits
            x = last
            for p in sp.head: x = get_module(model, p)(x)
            assert maxdiff(x, c.logits) <= atol, "the MLM head of the last block's output is the logits"
            assert maxdiff(get_module(model, sp.ln_final)(_ln_final_input(model, c.inputs)), c["ln_final.hook_normalized"]) <= atol
        else: assert maxdiff(get_module(model, sp.ln_final)(last), c["ln_final.hook_normalized"]) <= atol
        logits = _head_logits(model, c["ln_final.hook_normalized"])
        assert maxdiff(logits, c["hook_logits"]) <= atol
        cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)   # Gemma 2 caps logits after the unembedding
        if cap: logits = torch.tanh(logits / cap) * cap
        logits = logits / getattr(model.config.get_text_config(), "logits_scaling", 1.0)   # Granite divides them
        logits = logits * getattr(model.config.get_text_config(), "logit_scale", 1.0)      # Cohere multiplies them
        assert maxdiff(logits, c.logits) <= atol

def alibi_bias(model, n_keys, scaling=1.0):
    "ALiBi's bias `[head k_pos]` (0 without ALiBi) from transformers' own slopes: slope * key position (Press et al. 2022, eq. 1); unpadded rows"
    c, d = model.config, model_dims(model)
    if c.model_type == "bloom":   # once, unscaled
        from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
        return _get_alibi_slopes(d.n_heads, "cpu").double()[:, None] * torch.arange(n_keys)
    if not getattr(c, "alibi", False): return 0.
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor
    a = build_alibi_tensor(torch.ones(1, n_keys, dtype=torch.long), d.n_heads, torch.float32)[:, 0].double()
    # before transformers 5.25 Falcon's eager path summed (q.k + a) * s + a * s (the mask it folded alibi into): the slope
    # counted twice; from 5.25 its attention calls the interface with alibi in the mask only, once
    return (2 if falcon_inline() else 1) * a * scaling

def falcon_inline()->bool:
    "Whether this transformers' FalconAttention computes attention inline and takes `alibi` (before 5.25), read from its signature"
    import inspect
    from transformers.models.falcon.modeling_falcon import FalconAttention
    return "alibi" in inspect.signature(FalconAttention.forward).parameters

def check_attention_float64(model, c, atol=1e-5):
    "scores = q.k * scale (+ ALiBi) (+ softcap), pattern = softmax(scores), z = pattern @ v, recomputed in float64"
    d = model_dims(model)
    rep = d.n_heads // d.n_kv_heads
    qk, kk = post_rotary_kind(model, "q"), post_rotary_kind(model, "k")   # what attention scores with: after rotary
    scalings = {}   # the scale each layer's attention function is called with
    obs = {l: (lambda m, q, k, v, mask, kw, l=l: scalings.setdefault(l, kw.get("scaling"))) for l in range(d.n_layers)}
    with hooks(model, observe=obs): model(**c.inputs)
    scalings = {l: s for l, s in scalings.items() if s is not None}
    for l, blk in enumerate(blocks(model)):
        attn = get_module(blk, arch_spec(model).attn)
        q = c[qk, l].double().transpose(1, 2)
        k = c[kk, l].double().transpose(1, 2).repeat_interleave(rep, 1)
        v = c["v", l].double().transpose(1, 2).repeat_interleave(rep, 1)
        sc_ = scalings.get(l, getattr(attn, "scaling", d.d_head ** -0.5))   # OPT scales q itself and passes 1.0
        b = alibi_bias(model, k.shape[-2], sc_)
        s = q @ k.transpose(-1, -2) * sc_ + (b[:, None, :] if torch.is_tensor(b) else b)   # Bloom, Falcon with alibi: a bias per head and key
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
    ids = inp(c)
    for n in names or list(c):
        v = c[n].clone()
        out = run_with_hooks(model, ids, [(n, lambda a, h, v=v: v)])
        assert maxdiff(out, c.logits) <= atol, n

def check_replacement_changes_downstream(model, c, layer=0):
    "a replaced point really feeds forward: doubling it (or, for points a norm follows, mixing its features) changes the logits"
    ids, post = inp(c), arch_spec(model).post_ln   # post-LN (BERT): a norm follows resid_mid and resid_post, so they get a change of direction
    for kind in ["hook_resid_pre", "attn.hook_attn_scores", "attn.hook_v", "mlp.hook_pre", "mlp.hook_post"] + ([] if post else ["hook_resid_mid"]):
        n = f"blocks.{layer}.{kind}"
        if n not in c: continue
        out = run_with_hooks(model, ids, [(n, lambda a, h: a * 2)])
        assert maxdiff(out, c.logits) > 1e-4, n
    # a LayerNorm ignores a doubling and q/k norms undo it, so these get a change of direction (a scale [.. 1] doubles)
    for kind in ["hook_attn_in", "ln1.hook_scale", "attn.hook_q", "attn.hook_k", "attn.hook_rot_q", "attn.hook_rot_k",
                 "attn.hook_result", "hook_mlp_in", "ln2.hook_scale", "mlp.hook_router"] + (["hook_resid_mid", "hook_resid_post"] if post else []):   # router: other experts get chosen
        n = f"blocks.{layer}.{kind}"
        if n not in model_hook_names(model): continue
        out = run_with_hooks(model, ids, [(n, lambda a, h: a + a.roll(1, -1))])
        assert maxdiff(out, c.logits) > 1e-4, n
    assert maxdiff(run_with_hooks(model, ids, [("ln_final.hook_scale", lambda s, h: 2 * s)]), c.logits) > 1e-4

def check_shapes(model, c):
    "every cached point has the shape its dimension words say"
    b, p = input_shape(model, c.inputs)
    for n, v in c.items():
        want = hook_shape(model, n, b, p)
        if n == "hook_pos_embed" and v.shape[0] == 1: want = (1,) + want[1:]   # unpadded: one row, shared by the batch
        assert tuple(v.shape) == want, (n, tuple(v.shape))

def _norms(model, c):
    "[(name prefix, norm module, what it read)] for ln1, ln2 of every layer and ln_final, from the cache"
    sp, d = arch_spec(model), model_dims(model)
    out = []
    if sp.embed_ln: out.append(("embed.ln", get_module(model, sp.embed_ln), sum(c[n] for n in ("hook_embed", "hook_pos_embed", "hook_token_type_embed") if n in c)))
    for l, blk in enumerate(blocks(model)):
        if sp.ln1 and f"blocks.{l}.ln1.hook_scale" in c: out.append((f"blocks.{l}.ln1", get_module(blk, sp.ln1), c["resid_mid" if sp.post_ln else "resid_pre", l]))
        if sp.ln2: out.append((f"blocks.{l}.ln2", get_module(blk, sp.ln2), c["resid_post" if sp.post_ln else "resid_pre" if d.parallel else "resid_mid", l]))
    last = _ln_final_input(model, c.inputs) if sp.head else c["resid_post", d.n_layers - 1]   # encoders: what the MLM head's norm reads
    return out + [("ln_final", get_module(model, sp.ln_final), last)]

_CENTRING = ("CohereLayerNorm", "Cohere2LayerNorm", "OlmoLayerNorm")   # LayerNorms by their modelling code, whatever their class names say

def _eps(norm): return next((getattr(norm, a) for a in ("variance_epsilon", "eps") if hasattr(norm, a)), 1e-5)   # OLMo hard-codes 1e-5

def check_scales(model, c, atol):
    "hook_scale is TransformerLens' divisor, recomputed in float64, and the norm's output is its input divided by it"
    for pre, norm, x in _norms(model, c):
        s, out = c[f"{pre}.hook_scale"], c[f"{pre}.hook_normalized"]
        assert s.dtype in (torch.float32, torch.float64) and s.shape == (*x.shape[:-1], 1), pre
        x = x.double()
        ln = isinstance(norm, nn.LayerNorm) or type(norm).__name__ in _CENTRING   # GPT-2, GPT-NeoX, encoders, Cohere, OLMo; the others are RMSNorms
        xc = x - x.mean(-1, keepdim=True) if ln else x
        ref = (xc.pow(2).mean(-1, keepdim=True) + _eps(norm)).sqrt()
        assert (s.double() / ref - 1).abs().max() <= atol, pre                # relative: residual norms grow with depth
        with torch.no_grad():   # the gain: LayerNorm's weight; an RMSNorm's (w, or Gemma's 1 + w) read on ones, whose scale is sqrt(1 + eps)
            if ln:   # v = [1 -1 1 -1 ...] has mean 0 and variance 1: norm(v) - norm(-v) = 2 v w / sqrt(1 + eps), whatever w is made of
                v = torch.ones_like(x[0, 0]).to(next(norm.parameters(), x).dtype); v[1::2] = -1
                gain = (norm(v).double() - norm(-v).double()) / (2 * v.double()) * math.sqrt(1 + _eps(norm))
            else: gain = norm(torch.ones_like(x[0, 0]).to(norm.weight.dtype)).double() * math.sqrt(1 + _eps(norm))
        bias = getattr(norm, "bias", None)
        ref = xc / s.double() * gain + (bias.double() if bias is not None else 0)
        assert maxdiff(ref, out) <= 10 * atol * max(1., out.abs().max().item()), pre

def check_scale_edits(model, ids, atol):
    "an edited scale is what the norm divides by: doubling it equals replacing the norm's output by bias + (out - bias) / 2"
    with torch.no_grad(): plain = model(ids).logits
    sp, blk = arch_spec(model), blocks(model)[0]
    for pre, path, root in (("embed.ln", sp.embed_ln, model), ("blocks.0.ln1", sp.ln1, blk), ("blocks.0.ln2", sp.ln2, blk), ("ln_final", sp.ln_final, model)):
        if path is None or not _has(model, f"{pre}.hook_scale"): continue
        b = getattr(get_module(root, path), "bias", None)
        halve = lambda o, h: (o - b) / 2 + b if b is not None else o / 2
        got = run_with_hooks(model, ids, [(f"{pre}.hook_scale", lambda s, h: 2 * s)])
        ref = run_with_hooks(model, ids, [(f"{pre}.hook_normalized", halve)])
        assert maxdiff(got, ref) <= atol and maxdiff(got, plain) > 1e-4, pre

def check_result(model, c, atol):
    "each head's write: the output projection of z with every other head zeroed, minus the bias; the writes plus the bias are the projection of z"
    sp, d, arch = arch_spec(model), model_dims(model), model.config.model_type
    with torch.no_grad():
        for l, blk in enumerate(blocks(model)):
            proj = _layer_out_proj(model, l)
            z, r = c["z", l], c["result", l]
            b = proj.bias if getattr(proj, "bias", None) is not None else 0
            for h in range(d.n_heads):
                zh = torch.zeros_like(z); zh[:, :, h] = z[:, :, h]
                assert maxdiff(r[:, :, h], proj(zh.flatten(-2)) - b) <= atol, (l, h)
            o = proj(z.flatten(-2))
            assert maxdiff(r.sum(-2) + b, o) <= atol, l
            if sp.attn_out in (sp.attn, sp.out_proj) or get_module(blk, sp.attn_out) is proj:   # no norm (or LayerScale) after attention; Bloom: attn_out is the projection
                assert maxdiff(r.sum(-2) + b, c["attn_out", l]) <= atol, l

def check_result_edits(model, ids, atol, layers=None):
    "zeroing head h's write equals zeroing its z, and changes the logits"
    with torch.no_grad(): plain = model(ids).logits
    d = model_dims(model)
    for l in layers or range(d.n_layers):
        for h in (0, d.n_heads - 1):
            a = run_with_hooks(model, ids, [(f"blocks.{l}.attn.hook_result", ablate(head=h))])
            z = run_with_hooks(model, ids, [(f"blocks.{l}.attn.hook_z", ablate(head=h))])
            assert maxdiff(a, z) <= atol and maxdiff(z, plain) > 1e-4, (l, h)

def shared_norm(model):
    "Phi, GPT-J, Cohere: one norm feeds attention and the MLP, so the MLP has no input (`hook_mlp_in`) or norm (`ln2`) of its own"
    sp = arch_spec(model)
    return model_dims(model).parallel and sp.ln1 is not None and sp.ln2 is None

def check_no_sublayer_inputs(model):
    "with one norm in front of both sublayers, an edit of one sublayer's input would reach the other: hook_attn_in and hook_mlp_in do not exist"
    names = model_hook_names(model)
    assert not [n for n in names if n.endswith(("hook_attn_in", "hook_mlp_in"))] and "blocks.0.ln1.hook_normalized" in names

def check_sublayer_inputs(model, c, atol):
    "hook_attn_in is resid_pre; hook_mlp_in is resid_mid (resid_pre in parallel blocks)"
    d = model_dims(model)
    for l in range(d.n_layers):
        if shared_norm(model): return check_no_sublayer_inputs(model)
        assert torch.equal(c["attn_in", l], c["resid_pre", l]), l
        src = c[f"blocks.{l}.ln1.hook_normalized"] if arch_spec(model).post_ln else c["resid_pre" if d.parallel else "resid_mid", l]
        assert maxdiff(c["mlp_in", l], src) <= atol, l   # post-LN (BERT): the MLP reads ln1's output

def check_sublayer_input_edits(model, ids, atol, l=0):
    "editing attn_in (mlp_in) by v moves that sublayer's output as editing its residual input by v does, and leaves the residual alone"
    d = model_dims(model)
    if shared_norm(model): return check_no_sublayer_inputs(model)
    v = torch.randn(d.d_model, generator=torch.Generator().manual_seed(3)).to(next(model.parameters()))
    add = lambda a, h: a + v
    nm = lambda k: f"blocks.{l}.{k}"
    post = arch_spec(model).post_ln   # BERT: the MLP reads (and its residual carries) ln1's output
    names = [nm(k) for k in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")] + ([] if d.parallel else [nm("hook_resid_mid")]) \
            + ([nm("ln1.hook_normalized")] if post else [])
    cache = lambda fwd: run_with_cache(model, ids, names=names, fwd_hooks=fwd)
    plain, a_in, pre_v = cache([]), cache([(nm("hook_attn_in"), add)]), cache([(nm("hook_resid_pre"), add)])
    assert torch.equal(a_in[nm("hook_resid_pre")], plain[nm("hook_resid_pre")])
    assert maxdiff(a_in[nm("hook_attn_out")], pre_v[nm("hook_attn_out")]) <= atol and maxdiff(a_in[nm("hook_attn_out")], plain[nm("hook_attn_out")]) > 1e-4
    r, ao, mo = (a_in[nm(k)] for k in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out"))
    m = getattr(model.config.get_text_config(), "residual_multiplier", 1.0)   # Granite
    if d.parallel:
        assert maxdiff(mo, plain[nm("hook_mlp_out")]) <= atol                 # the MLP reads the unedited residual
        assert maxdiff(a_in[nm("hook_resid_post")], r + m * (ao + mo)) <= atol
    else: assert maxdiff(a_in[nm("hook_resid_mid")], r + m * ao) <= atol
    src = "ln1.hook_normalized" if post else "hook_resid_pre" if d.parallel else "hook_resid_mid"
    m_in, src_v = cache([(nm("hook_mlp_in"), add)]), cache([(nm(src), add)])
    assert maxdiff(m_in[nm("hook_mlp_out")], src_v[nm("hook_mlp_out")]) <= atol and maxdiff(m_in[nm("hook_mlp_out")], plain[nm("hook_mlp_out")]) > 1e-4
    assert maxdiff(m_in[nm("hook_attn_out")], plain[nm("hook_attn_out")]) <= atol
    base = m_in[nm("hook_resid_pre")] + m * m_in[nm("hook_attn_out")] if d.parallel else m_in[nm(src)]
    assert maxdiff(m_in[nm("hook_resid_post")], base + m * m_in[nm("hook_mlp_out")]) <= atol

def _q_k_projected(model, l, x):
    "queries and keys `[batch pos head d_head]` of layer l's projections applied to its input x, split as each model stores them"
    sp, d = arch_spec(model), model_dims(model)
    H, KV, D = d.n_heads, d.n_kv_heads, d.d_head
    blk = blocks(model)[l]
    if sp.qkv_fused == "heads":      # GPT-NeoX: per head, [q k v]
        qkv = get_module(blk, sp.q_proj)(x).unflatten(-1, (H, 3 * D))
        return qkv[..., :D], qkv[..., D:2 * D]
    if sp.qkv_fused == "concat":     # Phi-3: [q | k | v]
        qkv = get_module(blk, sp.q_proj)(x)
        return qkv[..., :H * D].unflatten(-1, (H, D)), qkv[..., H * D:(H + KV) * D].unflatten(-1, (KV, D))
    q = get_module(blk, sp.q_proj)
    if sp.k_proj is None:   # MLA: q_b_proj of the normed latent q_a_proj(x)
        attn = get_module(blk, sp.attn)
        return (q(attn.q_a_layernorm(attn.q_a_proj(x))) if hasattr(attn, "q_a_proj") else q(x)).unflatten(-1, (H, D)),
    return q(x).unflatten(-1, (H, D)), get_module(blk, sp.k_proj)(x).unflatten(-1, (KV, D))

def _qk_normed(model, l, t, which):
    "`t` `[batch pos head d_head]` through the attention's q (k) norm, where the model has one (Qwen 3, Gemma 3: per head; OLMo 2: whole width)"
    norm = getattr(get_module(blocks(model)[l], arch_spec(model).attn), f"{which}_norm", None)
    if norm is None: return t
    return norm(t.flatten(-2)).view_as(t) if norm.weight.numel() != t.shape[-1] else norm(t)

def check_qk(model, c, atol):
    "hook_q/hook_k are the projections of the attention's input; rot_q/rot_k are them normed (if the model norms them) and rotated"
    sp = arch_spec(model)
    if not sp.rotary: return
    with torch.no_grad():
        for l in range(model_dims(model).n_layers):
            x = c[f"blocks.{l}.ln1.hook_normalized"] if f"blocks.{l}.ln1.hook_normalized" in c else c["resid_pre", l]
            for which, ref in zip("qk" if sp.k_proj else "q", _q_k_projected(model, l, x)):   # MLA (DeepSeek) has no pre-rotary keys
                pre, rot = c[which, l], c[f"rot_{which}", l]
                assert maxdiff(pre, ref) <= atol, (l, which)
                n = _qk_normed(model, l, pre, which)
                srt = lambda t: t.sort(-1).values if getattr(model.config, "rope_interleave", False) else t   # DeepSeek-V3 de-interleaves rope features
                assert maxdiff(srt(rot[:, 0]), srt(n[:, 0])) <= atol, (l, which)             # position 0 is not rotated
                assert maxdiff(rot.norm(dim=-1), n.norm(dim=-1)) <= 10 * atol, (l, which)    # a rotation keeps lengths
                assert maxdiff(rot[:, 1:], n[:, 1:]) > 1e-3, (l, which)                        # later positions are rotated

def check_qk_edits_flow_through_rotary(model, ids, other, atol, l=0):
    "giving run A the pre-rotary q (k) of run B gives it B's post-rotary q (k): an edit at hook_q goes through the norm and rotary"
    if not arch_spec(model).rotary: return
    names = [f"blocks.{l}.attn.hook_{k}" for k in ("q", "k", "rot_q", "rot_k") if f"blocks.{l}.attn.hook_{k}" in model_hook_names(model)]
    a, b = run_with_cache(model, ids, names=names), run_with_cache(model, other, names=names)
    for which in "qk" if arch_spec(model).k_proj else "q":
        n = f"blocks.{l}.attn.hook_{which}"
        swapped = run_with_cache(model, ids, names=names, fwd_hooks=[(n, lambda act, h: b[n])])
        assert maxdiff(swapped[f"blocks.{l}.attn.hook_rot_{which}"], b[f"blocks.{l}.attn.hook_rot_{which}"]) <= atol, which
        assert maxdiff(swapped.logits, a.logits) > 1e-4, which

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

def check_router_edits(model, ids, atol):
    "scaling a layer's router logits by 8 routes as scaling its router's weight does (an independent, bias-free reference); a raised logit re-routes"
    d, sp = model_dims(model), arch_spec(model)
    for l in d.moe_layers:
        names = [f"blocks.{l}.hook_mlp_out"]
        got = run_with_cache(model, ids, names=names, fwd_hooks=[(f"blocks.{l}.mlp.hook_router", lambda a, h: 8 * a)])
        w = get_module(blocks(model)[l], sp.router).weight
        with torch.no_grad(): w.mul_(8)   # a power of two: exact
        try: ref = run_with_cache(model, ids, names=names)
        finally:
            with torch.no_grad(): w.div_(8)
        plain = run_with_cache(model, ids, names=names)
        assert maxdiff(got[names[0]], ref[names[0]]) <= atol and maxdiff(got.logits, ref.logits) <= atol, l
        # and a replacement re-routes: raising expert 0's logit far above the rest sends every token there
        to0 = run_with_cache(model, ids, names=names, fwd_hooks=[(f"blocks.{l}.mlp.hook_router", lambda a, h: a + 30 * (torch.arange(a.shape[-1]) == 0))])
        assert maxdiff(to0[names[0]], plain[names[0]]) > 1e-6, l
