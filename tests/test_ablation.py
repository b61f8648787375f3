"""Ablations and circuit evaluation against independent references.

References: plain Hugging Face forwards with PyTorch hooks on the real modules (the output projection's
input is the heads' `z`; the MLP's output is `hook_mlp_out`; the block's input is `hook_resid_pre`), with
the reference statistics read the same plain way; and a naive loop of one forward per circuit built from
the public `ablate_heads`/`ablate_mlps` hooks against the batched circuits."""
import pytest, torch
from headscope.models import tiny_model, TINY_ARCHS
from headscope.arch import model_dims
from headscope.cache import run_with_cache
from headscope.hooking import hooks, run_with_hooks, add
from headscope.data.pairs import PromptPairs
from headscope.causal.ablation import ablate_heads, ablate_mlps, ablate_attn, ablate_direction, component
from headscope.causal.circuits import circuit_eval, faithfulness_curve, rank_heads, FaithfulnessCurve, CircuitEval
from _checks import assert_no_hooks

O_PROJ = {"gpt2": ("transformer.h", "attn.c_proj"), "gpt_neox": ("gpt_neox.layers", "attention.dense")}

def _get(mod, path):
    for p in path.split("."): mod = getattr(mod, p)
    return mod

def _o_proj(model, l):
    arch = model.config.model_type
    layers, p = O_PROJ.get(arch, ("model.layers", "self_attn.o_proj"))
    return _get(_get(model, layers)[l], p)

def _blocks(model): return _get(model, O_PROJ.get(model.config.model_type, ("model.layers",))[0])

def _plain(model, ids, pre=(), post=()):
    "Logits of a plain HF forward with torch hooks [(module, fn)] attached"
    hs = [m.register_forward_pre_hook(f) for m, f in pre] + [m.register_forward_hook(f) for m, f in post]
    try:
        with torch.no_grad(): return model(ids).logits
    finally:
        for h in hs: h.remove()

def _z_inputs(model, ids, layers):
    "Heads' z `[batch pos head d_head]` per layer, read as the output projection's input in a plain forward"
    d, got = model_dims(model), {}
    def rec(l): return lambda mod, a: got.__setitem__(l, a[0].detach().view(*a[0].shape[:2], d.n_heads, d.d_head).clone())
    _plain(model, ids, pre=[(_o_proj(model, l), rec(l)) for l in layers])
    return got

def _set_heads(l, heads, value):
    "Pre-hook on the output projection setting heads' z to `value[..., h, :]` (`[head d_head]`, `[pos head d_head]` or `[batch pos head d_head]`)"
    def f(mod, a):
        x = a[0]; z = x.view(*x.shape[:2], -1, value.shape[-1]).clone()
        for h in heads: z[:, :, h] = value[..., h, :]
        return (z.view(x.shape),) + a[1:]
    return f

@pytest.fixture(scope="module", params=TINY_ARCHS)
def model(request):
    try: return tiny_model(request.param, n_layers=2, n_heads=4, n_kv_heads=2, seed=1)
    except ValueError: return tiny_model(request.param, n_layers=2, n_heads=4, seed=1)   # no grouped-query attention

@pytest.fixture(scope="module")
def llama(): return tiny_model("llama", n_layers=3, n_heads=4, n_kv_heads=2, seed=2)

def _toks(seed, shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, shape, generator=g)

@pytest.mark.parametrize("mode", ["zero", "mean", "mean_all", "resample"])
def test_heads_vs_plain_hf(model, mode):
    "Every architecture and mode against z replaced by hand at the output projection of a plain HF forward"
    d = model_dims(model)
    toks, ref = _toks(0, (3, 9)), _toks(1, (5, 9 if mode != "mean_all" else 6))
    heads = [(0, 1), (0, 3), (1, 0)]
    got = run_with_hooks(model, toks, ablate_heads(model, heads, mode.split("_")[0], None if mode == "zero" else ref, seed=4))
    rz = _z_inputs(model, ref, [0, 1])
    pre = []
    for l in (0, 1):
        hs = [h for ll, h in heads if ll == l]
        if mode == "zero": v = torch.zeros(d.n_heads, d.d_head)
        elif mode == "mean": v = rz[l].double().mean(0).float()                       # per position
        elif mode == "mean_all": v = rz[l].double().mean((0, 1)).float()              # other length: over all tokens
        else: v = rz[l][torch.randint(5, (3,), generator=torch.Generator().manual_seed(4))]
        pre.append((_o_proj(model, l), _set_heads(l, hs, v)))
    want = _plain(model, toks, pre=pre)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()

def test_gqa_keys_values_and_other_heads_untouched():
    "Ablating one query head changes only its z; the shared K/V and the group's other query heads are as before"
    m = tiny_model("qwen2", n_layers=2, n_heads=4, n_kv_heads=2, seed=0)
    toks = _toks(2, (2, 7))
    names = ["blocks.1.attn.hook_rot_k", "blocks.1.attn.hook_v", "blocks.1.attn.hook_z"]
    clean = run_with_cache(m, toks, names=names)
    abl = run_with_cache(m, toks, names=names, fwd_hooks=ablate_heads(m, ["L1H2"]))
    for n in names[:2]: assert torch.equal(clean[n], abl[n])
    assert torch.equal(clean[names[2]][:, :, [0, 1, 3]], abl[names[2]][:, :, [0, 1, 3]])
    assert (abl[names[2]][:, :, 2] == 0).all() and not (clean[names[2]][:, :, 2] == 0).all()

def test_mlps_attn_and_positions_vs_plain_hf(llama):
    "MLP and attention outputs, all or some positions, against forward hooks on the HF modules"
    toks, ref = _toks(3, (2, 8)), _toks(4, (4, 8))
    caps = {}
    def cap(k): return lambda mod, a, o: caps.__setitem__(k, (o[0] if isinstance(o, tuple) else o).detach().clone())
    blk = _blocks(llama)
    _plain(llama, ref, post=[(blk[1].mlp, cap("mlp")), (blk[2].self_attn, cap("attn"))])
    mm, am = caps["mlp"].mean(0), caps["attn"].mean(0)
    def set_mlp(mod, a, o): o = o.clone(); o[:, [1, 7]] = mm[[1, 7]]; return o
    def set_attn(mod, a, o): return (torch.zeros_like(o[0]),) + tuple(o[1:])
    got = run_with_hooks(llama, toks, ablate_mlps(llama, [1], "mean", ref, pos=[1, -1]) + ablate_attn(llama, 2))
    want = _plain(llama, toks, post=[(blk[1].mlp, set_mlp), (blk[2].self_attn, set_attn)])
    assert torch.allclose(got, want, atol=1e-5)

@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_direction_vs_plain_hf(llama, mode):
    "Projecting out (or setting to its mean) one direction of the residual stream, against a pre-hook on the block"
    toks, ref = _toks(5, (3, 8)), _toks(6, (4, 8))
    u = torch.randn(64, generator=torch.Generator().manual_seed(0)); un = u / u.norm()
    blk = _blocks(llama)
    caps = {}
    def grab(mod, a, k): caps["x"] = (a[0] if a else k["hidden_states"]).detach().clone()
    h = blk[1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(): llama(ref)
    finally: h.remove()
    target = (caps["x"] @ un).mean(0)[:, None] if mode == "mean" else 0.
    def edit(mod, a, k):
        x = a[0] if a else k["hidden_states"]
        x = x - ((x @ un)[..., None] - target) * un
        return ((x,) + a[1:], k) if a else (a, {**k, "hidden_states": x})
    h = blk[1].register_forward_pre_hook(edit, with_kwargs=True)
    try:
        with torch.no_grad(): want = llama(toks).logits
    finally: h.remove()
    got = run_with_hooks(llama, toks, ablate_direction(llama, "blocks.1.hook_resid_pre", u, mode, ref if mode == "mean" else None))
    assert torch.allclose(got, want, atol=1e-5)

def test_composition_equals_both_by_hand(llama):
    "Heads + MLP + direction ablations + a steering vector, concatenated, equal all four applied by hand"
    toks, ref = _toks(7, (2, 8)), _toks(8, (3, 8))
    u, v = torch.randn(64, generator=torch.Generator().manual_seed(1)), torch.randn(64, generator=torch.Generator().manual_seed(2))
    un = u / u.norm()
    fh = (ablate_heads(llama, ["L0H1", "L2H3"], "mean", ref) + ablate_mlps(llama, [0], "zero")
          + ablate_direction(llama, "blocks.2.hook_resid_pre", u) + [("blocks.1.hook_resid_pre", add(v))])
    got = run_with_hooks(llama, toks, fh)
    rz = _z_inputs(llama, ref, [0, 2])
    blk = _blocks(llama)
    def resid(fn):
        def f(mod, a, k):
            x = fn(a[0] if a else k["hidden_states"])
            return ((x,) + a[1:], k) if a else (a, {**k, "hidden_states": x})
        return f
    hs = [_o_proj(llama, 0).register_forward_pre_hook(_set_heads(0, [1], rz[0].mean(0))),
          _o_proj(llama, 2).register_forward_pre_hook(_set_heads(2, [3], rz[2].mean(0))),
          blk[0].mlp.register_forward_hook(lambda mod, a, o: torch.zeros_like(o)),
          blk[2].register_forward_pre_hook(resid(lambda x: x - (x @ un)[..., None] * un), with_kwargs=True),
          blk[1].register_forward_pre_hook(resid(lambda x: x + v), with_kwargs=True)]
    try:
        with torch.no_grad(): want = llama(toks).logits
    finally:
        for h in hs: h.remove()
    assert torch.allclose(got, want, atol=1e-5)
    # order of concatenation does not matter for different hook points
    assert torch.allclose(run_with_hooks(llama, toks, fh[::-1]), got, atol=1e-6)

def test_hooks_gone_after_raising_forward(llama):
    toks, ref = _toks(9, (2, 8)), _toks(10, (3, 8))
    plain = _plain(llama, toks)
    def boom(act, hook): raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with hooks(llama, ablate_heads(llama, ["L0H0"], "mean", ref) + ablate_mlps(llama, [1], "resample", ref)
                   + [("blocks.2.hook_resid_post", boom)]):
            llama(toks)
    assert_no_hooks(llama)
    with pytest.raises(ValueError, match="same positions"):      # the ablation itself raises mid-forward
        run_with_hooks(llama, toks, ablate_heads(llama, ["L1H1"], "resample", _toks(1, (3, 5))))
    assert_no_hooks(llama)
    assert torch.equal(_plain(llama, toks), plain)

def test_errors(llama):
    with pytest.raises(IndexError, match=r"query heads 0\.\.3"): ablate_heads(llama, [(0, 4)])
    with pytest.raises(IndexError, match=r"Head L3H0: layer 3 does not exist; the model has layers 0\.\.2"): ablate_heads(llama, ["L3H0"])
    with pytest.raises(IndexError, match=r"MLP: layer 3 does not exist; the model has layers 0\.\.2"): ablate_mlps(llama, [3])
    assert [n for n, _ in ablate_mlps(llama, [-1])] == ["blocks.2.hook_mlp_out"]      # negative layers count from the end (arch.check_layers)
    assert component(llama, (-1, -1)) == "L2H3"
    with pytest.raises(ValueError, match="'zero', 'mean', 'resample'"): ablate_heads(llama, [(0, 0)], "mea")
    with pytest.raises(ValueError, match="'zero', 'mean'"): ablate_direction(llama, "blocks.0.hook_resid_pre", torch.ones(64), "resample")
    with pytest.raises(ValueError, match="needs `reference`"): ablate_mlps(llama, [0], "mean")
    with pytest.raises(ValueError, match="lacks"):
        ablate_heads(llama, ["L0H0"], "mean", run_with_cache(llama, _toks(1, (2, 5)), names=["blocks.1.attn.hook_z"]))
    with pytest.raises(ValueError, match="'L\\{l\\}H\\{h\\}'"): component(llama, "head 3")
    with pytest.raises(ValueError, match="not a head"): ablate_heads(llama, ["MLP1"])

def test_one_reference_forward_and_shared_cache(llama):
    "All hook points of one call are read from the reference in one forward; a cache can be passed instead"
    toks, ref = _toks(11, (2, 8)), _toks(12, (4, 8))
    calls = []
    h = llama.register_forward_pre_hook(lambda mod, a, k: calls.append(1), with_kwargs=True)
    try: fh = ablate_heads(llama, ["L0H0", "L1H2", "L2H1"], "mean", ref)
    finally: h.remove()
    assert len(calls) == 1
    c = run_with_cache(llama, ref, names=[f"blocks.{l}.attn.hook_z" for l in range(3)] + ["blocks.0.hook_mlp_out"])
    fc = ablate_heads(llama, ["L0H0", "L1H2", "L2H1"], "mean", c) + ablate_mlps(llama, [0], "mean", c)
    fp = fh + ablate_mlps(llama, [0], "mean", ref)
    assert torch.allclose(run_with_hooks(llama, toks, fc), run_with_hooks(llama, toks, fp), atol=1e-6)

def test_padded_reference_mean_over_real_tokens(llama):
    "Reference prompts of different lengths (padded): the mean is over real tokens only, and says so"
    llama.tokenizer.padding_side = "right"
    ref = ["hello there", "a much longer reference prompt", "mid size"]
    fh = ablate_mlps(llama, [1], "mean", ref)
    outs = []
    for s in ref:
        c = run_with_cache(llama, s, names=["blocks.1.hook_mlp_out"]); outs.append(c["blocks.1.hook_mlp_out"][0])
    mean = torch.cat(outs).double().mean(0).float()
    toks = _toks(13, (2, 6))
    got = run_with_hooks(llama, toks, fh)
    want = run_with_hooks(llama, toks, [("blocks.1.hook_mlp_out", lambda a, hook: mean.expand_as(a).clone())])
    assert torch.allclose(got, want, atol=1e-5)
    assert fh[0][1].mean_over == "all tokens"
    with pytest.raises(ValueError, match="Per-position mean"):
        run_with_hooks(llama, _toks(1, (2, 11)), ablate_mlps(llama, [1], "mean", ref, per_pos=True))

# ---- circuits ----

def _naive(model, toks, metric, circuit, ref, mode, over, seed=0):
    "One forward per circuit with the public hooks on every component outside it"
    d = model_dims(model)
    keep = {component(model, c) for c in circuit}
    hs = [(l, h) for l in range(d.n_layers) for h in range(d.n_heads) if f"L{l}H{h}" not in keep]
    ms = [l for l in range(d.n_layers) if f"MLP{l}" not in keep] if over == "heads+mlps" else []
    r = None if mode == "zero" else ref
    fh = (ablate_heads(model, hs, mode, r, seed=seed) if hs else []) + (ablate_mlps(model, ms, mode, r, seed=seed) if ms else [])
    return float(metric(run_with_hooks(model, toks, fh)[:, -1]).mean())

@pytest.mark.parametrize("mode,over", [("mean", "heads"), ("zero", "heads+mlps"), ("resample", "heads+mlps"), ("mean", "heads+mlps")])
def test_curve_equals_naive_loop(llama, mode, over):
    toks, ref = _toks(14, (3, 8)), _toks(15, (4, 8))
    pairs = PromptPairs(list(toks), list(ref), torch.tensor([5, 9, 40]), torch.tensor([6, 7, 41]))   # pair-major metric
    metric = pairs.logit_diff()
    d = model_dims(llama)
    order = rank_heads(torch.randn(d.n_layers, d.n_heads, generator=torch.Generator().manual_seed(3)))
    if over == "heads+mlps": order = order[:5] + ["MLP2", "MLP0"] + order[5:] + ["MLP1"]
    fc = faithfulness_curve(llama, toks, metric, order, ref, mode, over=over, batch_size=4, seed=2, progress=False)
    naive = torch.tensor([_naive(llama, toks, metric, order[:k], ref, mode, over, seed=2) for k in range(len(order) + 1)])
    assert torch.allclose(fc.metric, naive, atol=1e-4), (fc.metric - naive).abs().max()
    assert fc.faithfulness[0] == 0 and fc.faithfulness[-1] == 1
    assert torch.allclose(fc.ratio, fc.metric / fc.m_full)
    sub = faithfulness_curve(llama, toks, metric, order, ref, mode, steps=[3, 0, 7], over=over, batch_size=2, seed=2, progress=False)
    assert torch.allclose(sub.metric, fc.metric[[3, 0, 7]], atol=1e-4)

def test_circuit_eval_full_empty_and_partial(llama):
    toks, ref = _toks(16, (3, 8)), _toks(17, (4, 8))
    metric = lambda lg: lg[:, 5] - lg[:, 6]
    d = model_dims(llama)
    every = [f"L{l}H{h}" for l in range(d.n_layers) for h in range(d.n_heads)]
    full = circuit_eval(llama, toks, metric, every, ref)
    assert full.faithfulness == 1.0 and full.ratio == 1.0 and full.n_ablated == 0
    assert abs(full.m_full - float(metric(_plain(llama, toks)[:, -1]).mean())) < 1e-5
    empty = circuit_eval(llama, toks, metric, [], ref)
    assert empty.faithfulness == 0.0
    assert abs(empty.m_empty - _naive(llama, toks, metric, [], ref, "mean", "heads")) < 1e-5
    part = circuit_eval(llama, toks, metric, [(0, 1), "L2H3", "L2H3"], ref)   # duplicates count once
    assert part.circuit == ["L0H1", "L2H3"] and part.n_ablated == len(every) - 2 and part.mean_over == "position"
    assert abs(part.m_circuit - _naive(llama, toks, metric, ["L0H1", "L2H3"], ref, "mean", "heads")) < 1e-5
    assert abs(part.faithfulness - (part.m_circuit - part.m_empty) / (part.m_full - part.m_empty)) < 1e-6
    other_len = circuit_eval(llama, toks, metric, ["L0H1"], _toks(1, (4, 5)))
    assert other_len.mean_over == "all tokens"
    assert "faithfulness" in repr(part)

def test_curve_html_and_errors(llama):
    toks, ref = _toks(18, (2, 8)), _toks(19, (2, 8))
    metric = lambda lg: lg[:, 5] - lg[:, 6]
    fc = faithfulness_curve(llama, toks, metric, ["L0H0", "L1H1"], ref, progress=False)
    assert isinstance(fc, FaithfulnessCurve) and "FaithfulnessCurve(3 circuits" in repr(fc)
    page = fc._repr_html_()
    assert page.count("<svg") == 1 and "background-color:#ffffff" in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")
    with pytest.raises(ValueError, match="0..2"): faithfulness_curve(llama, toks, metric, ["L0H0", "L1H1"], ref, steps=[3])
    with pytest.raises(ValueError, match="over='heads\\+mlps'"): circuit_eval(llama, toks, metric, ["MLP1"], ref)
    with pytest.raises(ValueError, match="'heads', 'heads\\+mlps'"): circuit_eval(llama, toks, metric, [], ref, over="all")

@pytest.mark.slow
def test_smollm2_circuit_matches_plain_hf(smollm2):
    "SmolLM2 (GQA, 9 query heads on 3 KV heads): a circuit's metric equals z mean-ablated by hand at o_proj"
    from headscope.data.pairs import ioi_pairs
    pairs = ioi_pairs(smollm2.tokenizer, 4)
    metric = pairs.logit_diff()
    keep = {"L23H3", "L29H1", "L20H0"}
    ce = circuit_eval(smollm2, pairs.clean, metric, sorted(keep), pairs.corrupt)
    tok = smollm2.tokenizer
    x, r = tok(pairs.clean, return_tensors="pt")["input_ids"], tok(pairs.corrupt, return_tensors="pt")["input_ids"]
    rz = _z_inputs(smollm2, r, range(30))
    pre = [(_o_proj(smollm2, l), _set_heads(l, [h for h in range(9) if f"L{l}H{h}" not in keep], rz[l].mean(0))) for l in range(30)]
    want = float(metric(_plain(smollm2, x, pre=pre)[:, -1]).mean())
    assert abs(ce.m_circuit - want) < 1e-3 * max(1, abs(want))
    assert ce.m_full > 1 and ce.faithfulness > 0.3
