"""Activation patching on every tiny architecture, against independent references.

- the batched and the prefix-KV paths equal the naive loop (one plain hooked forward per patch);
- patching clean into clean changes nothing; restoring the whole last residual stream gives the clean run;
- the clean baseline equals a plain HF forward of the clean prompt (no hooks of ours attached);
- bad input says what was wrong, and no hook is left behind;
- grids over some layers name the real layers and heads (top, to_pandas, heatmap rows), for activation,
  attribution and path patching alike."""
import re, warnings
import pytest, torch
from headscope.models import tiny_model, TINY_ARCHS
from headscope.causal.metrics import logit_diff, agreement
from headscope.causal.attribution import edge_attribution_patching
from headscope.causal.lens import top_predictions, logit_lens
from headscope.causal.circuits import rank_heads
from headscope.causal.patching import activation_patching
from headscope.causal.reference import naive_patching
from headscope.causal.attribution import attribution_patching
from headscope.causal.paths import path_patching
from headscope.data.pairs import ioi_pairs, fact_pairs, FACTS
from headscope.results import Top
from _checks import assert_no_hooks

def _pair(seed=0, n_pos=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 200, (2, n_pos), generator=g), torch.randint(3, 200, (2, n_pos), generator=g)

metric = lambda lg: logit_diff(lg, 5, 6)

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_fast_paths_equal_naive_loop(arch):
    m = tiny_model(arch, n_layers=2, seed=1)
    clean, corrupt = _pair()
    for kind, pos in [("z", -1), ("v", -1), ("resid_pre", "each")]:
        ref = naive_patching(m, clean, corrupt, metric, kind, pos)
        for bs, reuse in [(3, False), (64, True)]:
            got = activation_patching(m, clean, corrupt, metric, kind, pos, batch_size=bs, reuse_prefix=reuse, progress=False)
            torch.testing.assert_close(got.raw, ref, atol=1e-4, rtol=0)

@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2", "gpt_neox"])
def test_sanity_and_baselines(arch):
    m = tiny_model(arch, n_layers=2, seed=2)
    clean, corrupt = _pair(1)
    with pytest.warns(RuntimeWarning, match="nearly coincide"):
        same = activation_patching(m, clean, clean, metric, "z", -1, progress=False)
    torch.testing.assert_close(same.raw, torch.full_like(same.raw, same.clean), atol=1e-4, rtol=0)
    full = activation_patching(m, clean, corrupt, metric, "resid_post", None, layers=[1], progress=False)
    torch.testing.assert_close(full.scores, torch.ones(1), atol=1e-4, rtol=0)
    with torch.no_grad():                                     # baselines from plain HF forwards
        ref_c = metric(m(input_ids=clean).logits[:, -1]).mean()
        ref_k = metric(m(input_ids=corrupt).logits[:, -1]).mean()
    assert abs(full.clean - float(ref_c)) < 1e-4 and abs(full.corrupt - float(ref_k)) < 1e-4

def test_errors_and_no_leftover_hooks():
    m = tiny_model("llama", n_layers=2)
    clean, corrupt = _pair()
    with pytest.raises(ValueError, match=r"clean is \[2, 6\], corrupted is \[2, 4\]"):
        activation_patching(m, clean, corrupt[:, :4], metric, progress=False)
    with pytest.raises(ValueError, match="choose one of"):
        activation_patching(m, clean, corrupt, metric, kind="mlp", progress=False)
    def bad(lg): raise RuntimeError("metric failed")
    with pytest.raises(RuntimeError, match="metric failed"):
        activation_patching(m, clean, corrupt, bad, progress=False)
    assert_no_hooks(m)
    with torch.no_grad(): a = m(input_ids=clean).logits
    activation_patching(m, clean, corrupt, metric, progress=False)
    with torch.no_grad(): assert torch.equal(m(input_ids=clean).logits, a)

def test_baselines_that_coincide_give_nan_and_a_warning():
    "Identical prompts: the scores would be noise / ~1e-8; every analysis that normalises says so and returns NaN"
    m = tiny_model("llama", n_layers=2, n_heads=4, seed=3, initializer_range=0.2)
    clean, corrupt = _pair(2)
    runs = {"Patching": lambda c, k: activation_patching(m, c, k, metric, "z", -1, progress=False),
            "Attribution patching": lambda c, k: attribution_patching(m, c, k, metric, "z", -1, progress=False),
            "Path patching": lambda c, k: path_patching(m, c, k, metric, "each", "logits", progress=False),
            "Edge attribution patching": lambda c, k: edge_attribution_patching(m, c, k, metric, progress=False)}
    for what, run in runs.items():
        with pytest.warns(RuntimeWarning, match=f"^{what}: the clean and corrupted baselines nearly coincide"):
            res = run(clean, clean)
        assert res.scores.isnan().all(), what
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            assert run(clean, corrupt).scores.isfinite().any(), what          # a real difference: no warning, numbers
    # one pair of two is identical: the mean gap is real, the warning names the row
    mixed = torch.stack([corrupt[0], clean[1]])
    with pytest.warns(RuntimeWarning, match=r"1 of 2 prompt pairs .*rows \[1\]"):
        res = activation_patching(m, clean, mixed, metric, "z", -1, progress=False)
    assert res.scores.isfinite().all()

def test_no_deprecation_warnings_from_transformers():
    "The prefix-KV paths (activation and path patching) and their pages use the current cache API: no FutureWarning"
    m = tiny_model("llama", n_layers=2)
    clean, corrupt = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        r = activation_patching(m, clean, corrupt, metric, "z", -1, progress=False)        # pos=-1: the corrupted prefix's KV cache
        p = path_patching(m, clean, corrupt, metric, "each", "logits", progress=False)       # the clean prefix's KV cache
        q = path_patching(m, clean, corrupt, metric, "each", [(1, 0)], "q", pos=-1, progress=False)
        r._repr_html_(); p._repr_html_(); q._repr_html_()
    assert_no_hooks(m)

_V = tiny_model("llama", n_layers=1).config.vocab_size
BAD_INPUTS = [   # (what is called, the error it must raise, the words that say what was wrong and what is valid)
    (lambda m, c, k: activation_patching(m, c, k, lambda lg: metric(lg).mean(), progress=False), ValueError,
     r"Patching: the metric must return a tensor of shape \[batch\] = \[2\].*returned shape \[\]: a scalar"),
    (lambda m, c, k: activation_patching(m, c, k, lambda lg: lg[:, :2], progress=False), ValueError,
     r"Patching: the metric must return a tensor of shape \[batch\] = \[2\].*returned shape \[2, 2\]"),
    (lambda m, c, k: activation_patching(m, c, k, lambda lg: float(metric(lg)[0]), progress=False), TypeError,
     r"Patching: the metric must return a tensor of shape \[batch\] = \[2\].*returned a float"),
    (lambda m, c, k: attribution_patching(m, c, k, lambda lg: metric(lg).sum(), progress=False), ValueError,
     r"Attribution patching: the metric must return a tensor of shape \[batch\]"),
    (lambda m, c, k: path_patching(m, c, k, lambda lg: metric(lg).mean(), progress=False), ValueError,
     r"Path patching: the metric must return a tensor of shape \[batch\]"),
    (lambda m, c, k: edge_attribution_patching(m, c, k, lambda lg: metric(lg).mean(), progress=False), ValueError,
     r"Edge attribution patching: the metric must return a tensor of shape \[batch\]"),
    (lambda m, c, k: top_predictions(m, c, k=0), ValueError, rf"k=0 is not a number of top tokens: give an integer from 1 to the vocabulary size, {_V}"),
    (lambda m, c, k: top_predictions(m, c, k=_V + 1), ValueError, rf"k={_V + 1} is not a number of top tokens.*vocabulary size, {_V}"),
    (lambda m, c, k: logit_lens(m, c[:1], k=0), ValueError, rf"k=0 is not a number of top tokens.*vocabulary size, {_V}"),
    (lambda m, c, k: logit_lens(m, c[:1], k=_V + 1), ValueError, rf"k={_V + 1} is not a number of top tokens"),
    (lambda m, c, k: agreement(torch.ones(4), torch.ones(4), k=0), ValueError, r"k=0: the top-k sets need a positive integer k"),
    (lambda m, c, k: rank_heads(torch.ones(2, 4), 0), ValueError, r"k=0: keep a positive number of heads, or None for all"),
]

@pytest.mark.parametrize("call, err, msg", BAD_INPUTS, ids=[f"row{i}" for i in range(len(BAD_INPUTS))])
def test_bad_inputs_causal(call, err, msg):
    "Each bad input gets an error that says what was wrong and what is valid, and leaves no hook behind"
    m, (clean, corrupt) = tiny_model("llama", n_layers=2), _pair()
    with pytest.raises(err, match=msg): call(m, clean, corrupt)
    assert_no_hooks(m)

@pytest.mark.slow
def test_smollm2_datasets_and_prefix(smollm2):
    pairs = ioi_pairs(smollm2.tokenizer, n=4)
    tok = smollm2.tokenizer
    lens = {len(tok.encode(p, add_special_tokens=False)) for p in pairs.clean + pairs.corrupt}
    assert len(lens) == 1                                        # one token length: patchable
    assert all(len(tok.encode(tok.decode(int(i)), add_special_tokens=False)) == 1 for i in torch.cat([pairs.correct, pairs.wrong]))
    ev = pairs.evaluate(smollm2)
    assert ev["clean"]["top1"] >= 0.75 and ev["clean"]["logit_diff"] > ev["corrupt"]["logit_diff"] + 2
    fp = fact_pairs(tok, model=smollm2)
    assert fp.evaluate(smollm2)["clean"]["top1"] == 1.0          # only facts the model gets right are kept
    metric = pairs.logit_diff()
    layers = [22, 23]
    ref = naive_patching(smollm2, pairs.clean, pairs.corrupt, metric, "z", -1, layers=layers)
    got = activation_patching(smollm2, pairs.clean, pairs.corrupt, metric, "z", -1, layers=layers, progress=False)
    torch.testing.assert_close(got.raw, ref, atol=1e-4, rtol=0)

def _rows(page): return re.findall(r"<text class='hs-row'[^>]*>([^<]*)</text>", page)

@pytest.fixture(scope="module")
def deep():
    "6 layers, 4 heads: grids over layers 2-5 must name layer 5 'L5', not 'L3'"
    m = tiny_model("llama", n_layers=6, n_heads=4, seed=3, initializer_range=0.2)
    clean, corrupt = _pair(4, n_pos=7)
    return m, clean, corrupt

def _check_names(res, a, b):
    "`top()`, `to_pandas()` and the heatmap rows all use the real layers a..b-1"
    H = res.scores.shape[1]
    top = res.top(res.scores[..., :].numel())
    assert all(isinstance(t, Top) for t in top)
    for t in top:
        l, h = t.index[:2]
        assert a <= l < b and t.name.startswith(f"L{l}H{h}")
        row = res.scores[l - a, h] if res.scores.ndim == 2 else res.scores[l - a, h, t.index[2]]
        assert t.score == pytest.approx(float(row))
    df = res.to_pandas()
    assert sorted(df["layer"].unique().tolist()) == list(range(a, b))
    r = df[(df["layer"] == a + 3) & (df["head"] == H - 1)]
    assert r["name"].iloc[0].startswith(f"L{a + 3}H{H - 1}")
    assert r["score"].iloc[0] == pytest.approx(float(res.scores[3, H - 1].flatten()[0]))
    assert _rows(res._repr_html_()) == [f"L{l}" for l in range(a, b)]

def test_grids_name_real_layers(deep):
    "The acceptance test of the re-cut: layers=range(2, 6) names layer 5's head h 'L5H{h}' everywhere"
    m, clean, corrupt = deep
    a, b = 2, 6
    _check_names(activation_patching(m, clean, corrupt, metric, "z", -1, layers=range(a, b), progress=False), a, b)
    _check_names(attribution_patching(m, clean, corrupt, metric, "z", -1, layers=range(a, b), progress=False), a, b)
    pp = path_patching(m, clean, corrupt, metric, "each", "logits", layers=range(a, b), progress=False)
    _check_names(pp, a, b)
    full = path_patching(m, clean, corrupt, metric, "each", "logits", progress=False)
    torch.testing.assert_close(pp.raw, full.raw[a:b], atol=1e-5, rtol=0)      # the same paths, on the rows asked for
    kv = activation_patching(m, clean, corrupt, metric, "k", -1, layers=[5], progress=False)
    assert kv.axes == ["layer", "kv_head"] and kv.top(1)[0].name.startswith("L5KV")

def test_pos_each_names_real_positions(deep):
    m, clean, corrupt = deep
    res = activation_patching(m, clean, corrupt, metric, "resid_pre", "each", layers=[4, 5], progress=False)
    best = res.top(1)[0]
    l, p = best.index
    assert l in (4, 5) and best.name.startswith(f"L{l} pos {p}") and best.score == pytest.approx(float(res.scores[l - 4, p]))
    assert res.index["pos"] == list(range(7)) and _rows(res._repr_html_()) == ["L4", "L5"]
    z = activation_patching(m, clean, corrupt, metric, "z", "each", layers=[5], progress=False)
    t = z.top(1)[0]
    assert t.name.startswith(f"L5H{t.index[1]} pos {t.index[2]}") and t.score == pytest.approx(float(z.scores[0, t.index[1], t.index[2]]))

def test_sender_groups_use_cell_labels(deep):
    m, clean, corrupt = deep
    grp = path_patching(m, clean, corrupt, metric, [[(0, 1), (1, 2)], "MLP3", (4, 0)], "logits", progress=False)
    assert sorted(t.name for t in grp.top(3)) == ["L0H1+L1H2", "L4H0", "MLP3"]
    assert grp.to_pandas()["name"].tolist() == ["L0H1+L1H2", "MLP3", "L4H0"]
    assert [t.name for t in grp.top(3, "neg")] == [t.name for t in grp.top(3, largest=False, absolute=False)]
