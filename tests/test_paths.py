"""Path patching against a hand-built reference and against itself.

The reference (`reference_path_patching`) uses only plain PyTorch hooks on the Hugging Face modules,
no headscope hooks: a head is frozen by overwriting its slice of the input of `o_proj` (that input is
`z`, flattened over heads); the receivers' queries/keys/values are kept and patched at the outputs of
`q_proj`/`k_proj`/`v_proj` (before rotary; rotary, and Qwen 3's per-head q/k norms, act per head and
per position, so patching before or after them is the same); the logits' receiver is the last
block's output. Then: many paths per forward equal one path per forward, the final-position shortcut
(prefix KV cache) equals full runs, identities with activation patching, clear errors, no hooks left."""
import math, re, pytest, torch
from headscope.models import tiny_model
from headscope.arch import model_dims
from headscope.hooking import run_with_hooks, patch
from headscope.cache import run_with_cache
from headscope.causal.metrics import logit_diff
from headscope.causal.patching import activation_patching
from headscope.causal.paths import path_patching, PathPatchingResult, VIAS, node_name, _node, _rec_heads
from _checks import assert_no_hooks

def metric(lg): return logit_diff(lg, 5, 6)

def _tiny(arch, **kw):
    # larger weights than the default init: peaked attention, so paths move the metric by ~0.1, not ~1e-5
    return tiny_model(arch, n_layers=3, n_heads=4, seed=0, initializer_range=0.2, **kw)

@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 250, (3, 8), generator=g), torch.randint(3, 250, (3, 8), generator=g)

def reference_path_patching(model, clean, corrupt, senders, receivers, via, freeze_mlps=False, pos=None, freeze_heads=True):
    "Mean metric with one sender group patched along its paths; plain torch hooks only"
    d, layers = model_dims(model), model.model.layers
    H, KV, dh = d.n_heads, d.n_kv_heads, d.d_head
    def run(ids, pre=(), post=()):
        hs = [m.register_forward_pre_hook(f) for m, f in pre] + [m.register_forward_hook(f) for m, f in post]
        try:
            with torch.no_grad(): return model(input_ids=ids, use_cache=False).logits[:, -1]
        finally:
            for h in hs: h.remove()
    def grab(ids):
        z, mlp = {}, {}
        run(ids, pre=[(b.self_attn.o_proj, lambda m, a, l=l: z.__setitem__(l, a[0].clone())) for l, b in enumerate(layers)],
            post=[(b.mlp, lambda m, a, o, l=l: mlp.__setitem__(l, o.clone())) for l, b in enumerate(layers)])
        return z, mlp
    (zc, mc), (zk, mk) = grab(clean), grab(corrupt)
    def set_z(l):                                       # step 2: every head clean, senders corrupted
        def f(m, a):
            z = zc[l].clone() if freeze_heads else a[0].clone()
            for kind, sl, h in senders:
                if kind == "head" and sl == l: z[..., h*dh:(h+1)*dh] = zk[l][..., h*dh:(h+1)*dh]
            return (z,)
        return f
    def set_mlp(l):
        def f(m, a, o):
            out = mc[l].clone() if freeze_mlps else o.clone()
            return mk[l].clone() if any(s[0] == "mlp" and s[1] == l for s in senders) else out
        return f
    step2 = ([(b.self_attn.o_proj, set_z(l)) for l, b in enumerate(layers)], [(b.mlp, set_mlp(l)) for l, b in enumerate(layers)])
    p = slice(None) if pos is None else pos
    if receivers == "logits":
        kept = {}
        def keep(m, a, o): kept["r"] = (o[0] if isinstance(o, tuple) else o).clone()
        run(clean, step2[0], step2[1] + [(layers[-1], keep)])
        def put(m, a, o):
            r = (o[0] if isinstance(o, tuple) else o).clone(); r[:, p] = kept["r"][:, p]
            return (r,) + tuple(o[1:]) if isinstance(o, tuple) else r
        return float(metric(run(clean, post=[(layers[-1], put)])).mean())
    js = {}                                             # module -> slices of heads (KV heads for k and v)
    for _, l, h in receivers:
        for kind in ("q", "k", "v") if via == "qkv" else (via,):
            js.setdefault(getattr(layers[l].self_attn, f"{kind}_proj"), set()).add(h if kind == "q" else h // (H // KV))
    kept = {}
    run(clean, step2[0], step2[1] + [(mod, lambda m, a, o: kept.__setitem__(m, o.clone())) for mod in js])
    def put(m, a, o):
        o = o.clone()
        for j in js[m]: o[:, p, j*dh:(j+1)*dh] = kept[m][:, p, j*dh:(j+1)*dh]
        return o
    return float(metric(run(clean, post=[(mod, put) for mod in js])).mean())

CASES = [([(0, 1)], [(2, 0)], "q", False, None), ([(0, 1), (1, 2)], [(2, 3)], "k", False, None),
         ([(1, 0)], [(2, 1), (2, 2)], "v", True, None), (["MLP0"], [(2, 0)], "qkv", False, None),
         ([(0, 3), "MLP1"], [(2, 2)], "q", True, -1), ([(1, 1)], [(2, 1)], "v", False, -1), ([(0, 1)], [(2, 3)], "qkv", False, 4),
         ([(0, 2)], "logits", None, False, None), ([(1, 3), (0, 0)], "logits", None, True, None)]

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma2"])
def test_matches_hand_built_reference(arch, prompts):
    m = _tiny(arch, n_kv_heads=2)
    clean, corrupt = prompts
    d = model_dims(m)
    moved = 0
    for snd, rcv, via, fm, pos in CASES:
        nodes = [_node(s, m) for s in snd]
        recs = rcv if rcv == "logits" else [_node(r, m) for r in rcv]
        ref = reference_path_patching(m, clean, corrupt, nodes, recs, via, fm, pos)
        for reuse in (True, False):                     # final position on a cached prefix, and full runs
            got = path_patching(m, clean, corrupt, metric, [snd], rcv, via, pos=pos, freeze_mlps=fm, reuse_prefix=reuse, progress=False)
            assert abs(float(got.raw[0]) - ref) < 1e-4, (snd, rcv, via, pos, reuse, float(got.raw[0]), ref)
        moved += abs(ref - got.clean) > 1e-2            # the paths really move the metric: the comparison is not vacuous
    assert moved >= len(CASES) // 2

def test_freezing_matters(prompts):
    "Without freezing the other heads the answer is different (it is activation patching of the sender)"
    m = _tiny("llama", n_kv_heads=2)
    clean, corrupt = prompts
    got = path_patching(m, clean, corrupt, metric, [(0, 1)], [(2, 0)], "q", progress=False)
    unfrozen = reference_path_patching(m, clean, corrupt, [("head", 0, 1)], [("head", 2, 0)], "q", freeze_heads=False)
    assert abs(float(got.raw[0]) - unfrozen) > 1e-3

def test_gqa_kv_receivers(prompts):
    "Keys and values belong to a KV head: receivers sharing one are the same receiver"
    m = _tiny("llama", n_kv_heads=2)
    clean, corrupt = prompts
    test = lambda r, via: path_patching(m, clean, corrupt, metric, "each", r, via, progress=False).raw
    assert torch.equal(test([(2, 2)], "k").isnan(), test([(2, 3)], "k").isnan())
    assert torch.allclose(test([(2, 2)], "k").nan_to_num(), test([(2, 3)], "k").nan_to_num(), atol=1e-6)
    assert not torch.allclose(test([(2, 2)], "q").nan_to_num(), test([(2, 3)], "q").nan_to_num(), atol=1e-4)
    assert _rec_heads(m, [("head", 2, 3)], "qkv") == {"blocks.2.attn.hook_rot_q": [3], "blocks.2.attn.hook_rot_k": [1], "blocks.2.attn.hook_v": [1]}

@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox", "gemma2", "phi3", "olmo2"])
def test_batched_equals_one_per_forward(arch, prompts):
    m = _tiny(arch)
    clean, corrupt = prompts
    for rcv, via, pos in [([(2, 1)], "q", None), ([(2, 1)], "q", -1), ([(2, 0), (1, 3)], "qkv", None), ([(2, 2)], "v", 5),
                          ("logits", None, None)]:
        one = path_patching(m, clean, corrupt, metric, "each", rcv, via, pos=pos, batch_size=1, reuse_prefix=False, progress=False)
        many = path_patching(m, clean, corrupt, metric, "each", rcv, via, pos=pos, batch_size=3, progress=False)
        assert torch.equal(one.raw.isnan(), many.raw.isnan())
        assert torch.allclose(one.raw.nan_to_num(), many.raw.nan_to_num(), atol=1e-4), (arch, rcv, via, pos)
        top = min(l for _, l, _ in [_node(r, m) for r in rcv]) if rcv != "logits" else 3
        assert one.raw[:top].isfinite().all() and one.raw[top:].isnan().all()
    # a list of senders gives the entries of the grid
    grid = path_patching(m, clean, corrupt, metric, "each", "logits", progress=False)
    some = path_patching(m, clean, corrupt, metric, [(0, 2), "L2H3", (1, 0)], "logits", batch_size=2, progress=False)
    assert torch.allclose(some.raw, torch.stack([grid.raw[0, 2], grid.raw[2, 3], grid.raw[1, 0]]), atol=1e-4)
    assert some.senders == ["L0H2", "L2H3", "L1H0"]

@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox", "gemma2"])
def test_identities(arch, prompts):
    m = _tiny(arch)
    clean, corrupt = prompts
    L, H = model_dims(m).n_layers, model_dims(m).n_heads
    # nothing corrupted: no path moves the metric
    for rcv in ("logits", [(2, 1)]):
        with pytest.warns(RuntimeWarning, match="nearly coincide"):                 # and no score to normalise by: NaN
            same = path_patching(m, clean, clean, metric, "each", rcv, progress=False)
        assert same.scores.isnan().all()
        eff = (same.raw - same.clean)
        assert torch.allclose(eff[eff.isfinite()], torch.zeros(int(eff.isfinite().sum())), atol=1e-5)
    # a last-layer head's path to the logits is activation patching of its z, corrupt into clean (nothing downstream is a head)
    last = path_patching(m, clean, corrupt, metric, [(L-1, h) for h in range(H)], "logits", progress=False)
    act = activation_patching(m, corrupt, clean, metric, "z", None, layers=[L-1], progress=False)
    assert torch.allclose(last.raw, act.raw[0], atol=1e-4)
    # all last-layer heads together with MLPs frozen: corrupt z and the clean MLP output at the last layer
    grp = path_patching(m, clean, corrupt, metric, [[(L-1, h) for h in range(H)]], "logits", freeze_mlps=True, progress=False)
    cz, cc = run_with_cache(m, corrupt, names=[f"blocks.{L-1}.attn.hook_z"]), run_with_cache(m, clean, names=[f"blocks.{L-1}.hook_mlp_out"])
    lg = run_with_hooks(m, clean, [(f"blocks.{L-1}.attn.hook_z", patch(cz[f"blocks.{L-1}.attn.hook_z"])),
                                   (f"blocks.{L-1}.hook_mlp_out", patch(cc[f"blocks.{L-1}.hook_mlp_out"]))])
    assert abs(float(grp.raw[0]) - float(metric(lg[:, -1]).mean())) < 1e-4
    # baselines and normalisation, signed as in activation patching: 1 = the path carries the whole difference
    assert abs(last.clean - float(metric(run_with_hooks(m, clean)[:, -1]).mean())) < 1e-5
    assert abs(last.corrupt - float(metric(run_with_hooks(m, corrupt)[:, -1]).mean())) < 1e-5
    assert torch.allclose(last.scores * (last.clean - last.corrupt), last.clean - last.raw, atol=1e-5)   # times the denominator: it may be tiny

def test_errors_and_hooks_removed(prompts):
    m = _tiny("llama", n_kv_heads=2)
    clean, corrupt = prompts
    pp = lambda *a, **k: path_patching(m, clean, corrupt, metric, *a, progress=False, **k)
    with pytest.raises(ValueError, match=r"Receiver L1H0 \(layer 1\) is not downstream of sender L2H0 \(layer 2\)"): pp([(2, 0)], [(1, 0)])
    with pytest.raises(ValueError, match=r"not downstream of sender L1H1"): pp([(0, 0), (1, 1)], [(1, 2)])
    with pytest.raises(ValueError, match=r"Unknown via 'z'; choose one of: 'q'.*'k'.*'v'.*'qkv'.*'resid'"): pp("each", [(2, 0)], "z")
    with pytest.raises(ValueError, match="via 'resid'"): pp("each", "logits", "q")
    with pytest.raises(ValueError, match="via='resid' is for receivers='logits'"): pp("each", [(2, 0)], "resid")
    with pytest.raises(ValueError, match=r"clean is \[3, 8\], corrupted is \[3, 6\]"):
        path_patching(m, clean, corrupt[:, :6], metric, progress=False)
    with pytest.raises(ValueError, match="No head sits upstream"): pp("each", [(0, 1)])
    with pytest.raises(ValueError, match="Receivers must be heads"): pp("each", ["MLP2"])
    with pytest.raises(ValueError, match="Cannot read node"): pp(["head3"], "logits")
    with pytest.raises(IndexError, match=r"L5H0: layer 5 does not exist; the model has layers 0\.\.2"): pp([(5, 0)], "logits")
    with pytest.raises(IndexError, match=r"heads 0\.\.3"): pp([(0, 7)], "logits")
    with pytest.raises(IndexError, match="outside the prompt's 8 tokens"): pp("each", [(2, 0)], pos=9)
    with pytest.raises(ValueError, match="unpadded"):
        path_patching(m, {"input_ids": clean, "attention_mask": torch.ones_like(clean).index_fill(1, torch.tensor([0]), 0)},
                      corrupt, metric, progress=False)
    assert_no_hooks(m)
    # a forward that raises half-way (inside the batched step-2 run) leaves nothing behind
    def boom(mod, a, o):
        if (o[0] if isinstance(o, tuple) else o).shape[0] > clean.shape[0]: raise RuntimeError("boom")
    h = m.model.layers[1].register_forward_hook(boom)
    try:
        for rcv in ("logits", [(2, 0)]):
            with pytest.raises(RuntimeError, match="boom"): pp("each", rcv, batch_size=4)
    finally: h.remove()
    assert_no_hooks(m)
    # and so does a normal run, including step 2's early stop after the last receiver's layer
    pp("each", [(1, 0)], "qkv"); pp("each", [(2, 0)], "q", pos=-1)
    assert_no_hooks(m)

def test_result_views(prompts):
    m = _tiny("llama", n_kv_heads=2)
    clean, corrupt = prompts
    res = path_patching(m, clean, corrupt, metric, "each", [(2, 1), (2, 3)], "q", progress=False)
    assert res.scores.shape == (3, 4) and len(res.senders) == 12 and res.receivers == ["L2H1", "L2H3"]
    es = res.edges()
    assert len(es) == 2 * 8 and all(re.fullmatch(r"L\d+H\d+", a) and b in ("L2H1", "L2H3") for a, b, _ in es)
    assert [abs(v) for *_, v in es] == sorted((abs(v) for *_, v in es), reverse=True)
    assert res.top(1, absolute=True)[0].name == es[0][0]        # by |score|, like the edges
    assert res.top(3) == res.top(3, largest=True, absolute=False)  # by default largest first, like every result
    assert res.top(1)[0].score == float(res.scores.nan_to_num(-math.inf).max())
    neg = res.top(3, "neg")
    assert [t.score for t in neg] == sorted(t.score for t in neg) and neg[0].score == float(res.scores.nan_to_num(math.inf).min())
    assert neg == res.top(3, largest=False, absolute=False) and res.top(3, "pos") == res.top(3, absolute=False)
    with pytest.raises(ValueError, match="choose one of"): res.top(3, "big")
    assert "PathPatchingResult([layer head] = [3, 4] -> L2H1+L2H3 via q" in repr(res)
    h = res._repr_html_()
    assert "L2H1+L2H3" in h and "<script src" not in h
    grp = path_patching(m, clean, corrupt, metric, [[(0, 1), (1, 2)], "MLP1"], "logits", progress=False)
    assert grp.senders == ["L0H1+L1H2", "MLP1"] and grp.via == "resid"
    assert {(a, b) for a, b, _ in grp.edges()} == {("L0H1", "logits"), ("L1H2", "logits"), ("MLP1", "logits")}
    assert "MLP1" in grp._repr_html_() and node_name(("mlp", 1, None)) == "MLP1"
    assert set(VIAS) == {"q", "k", "v", "qkv", "resid"}
