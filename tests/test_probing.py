"""Probing: probes against a Newton/IRLS reference and known Gaussian answers; activations against `run_with_cache`."""
import pytest, torch
from headscope.models import tiny_model
from headscope.cache import run_with_cache
from headscope.tokens import pos_index
from headscope.data.prompts import labelled_prompts, DATASETS
from headscope.probes.activations import collect_activations
from headscope.probes.probing import train_probes
from headscope.probes.solvers import strat_test
from _checks import assert_no_hooks

def gaussian_layers(n=1000, d=16, scales=(0, .5, 1, 1.5), seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g); u /= u.norm()
    y = torch.randint(0, 2, (n,), generator=g)
    X = torch.randn(len(scales), n, d, generator=g) + torch.tensor(scales)[:, None, None] * (2 * y - 1)[None, :, None] * u
    return X, y, u

def newton_logreg(x, y, mu, sd, l2, iters=60):
    "mean BCE + l2/2 |w|^2 on (x - mu)/sd by plain Newton steps, float64; raw-space (w, b)"
    z = torch.cat([(x - mu) / sd, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    th = torch.zeros(z.shape[1], dtype=x.dtype)
    reg = torch.full((z.shape[1],), l2, dtype=x.dtype); reg[-1] = 0
    for _ in range(iters):
        p = torch.sigmoid(z @ th)
        th = th - torch.linalg.solve((z.T * (p * (1 - p))) @ z / len(x) + torch.diag(reg), z.T @ (p - y) / len(x) + reg * th)
    w = th[:-1] / sd
    return w, th[-1] - mu @ w

@pytest.mark.parametrize("kind", ["logreg", "diff_means"])
def test_gaussian_bayes_rate_and_direction(kind):
    X, y, u = gaussian_layers()
    r = train_probes(X, y, kind=kind)
    bayes = float(torch.distributions.Normal(0, 1).cdf(torch.tensor(1.0)))
    assert abs(float(r.cv[2]) - bayes) < 0.04
    assert abs(float(r.cv[0]) - 0.5) < 0.06
    assert float(r.direction(2) @ u) > 0.9 and float(r.direction(3) @ u) > 0.9
    assert (r.control - 0.5).abs().max() < 0.08
    assert r.best_layer() == 3

def test_logreg_matches_newton_and_batched_equals_single():
    X, y, _ = gaussian_layers(n=400, d=24, seed=3)
    X = X * torch.linspace(0.1, 10, 24) + 3        # unequal feature scales
    r = train_probes(X, y, folds=0, control=False, l2=0.05, tol=1e-10)
    te = strat_test(y, 0.25, torch.Generator().manual_seed(0))
    for l in range(4):
        x = X[l].double()
        w, b = newton_logreg(x[~te], y[~te].double(), x.mean(0), x.std(0, unbiased=False), 0.05)
        torch.testing.assert_close(r.W[l, :, 0], w, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(r.b[l, 0], b, atol=1e-6, rtol=1e-4)
        one = train_probes(X[l:l + 1], y, folds=0, control=False, l2=0.05, tol=1e-10)
        torch.testing.assert_close(one.W[0], r.W[l], atol=1e-6, rtol=1e-4)

def test_multinomial_stationary_point():
    g = torch.Generator().manual_seed(1)
    y = torch.arange(240) % 4
    X = (2 * torch.randn(4, 10, generator=g)[y] + torch.randn(240, 10, generator=g))[None]
    r = train_probes(X, y, folds=3, control=True, tol=1e-10)
    te = strat_test(y, 0.25, torch.Generator().manual_seed(0))
    x = X[0].double(); mu, sd = x.mean(0), x.std(0, unbiased=False)
    R = torch.softmax(x[~te] @ r.W[0] + r.b[0], -1) - torch.nn.functional.one_hot(y[~te], 4).double()
    grad = ((x[~te] - mu) / sd).T @ R / len(R) + 1e-2 * r.W[0] * sd[:, None]
    assert grad.abs().max() < 1e-8 and R.sum(0).abs().max() < 1e-7
    assert float(r.test[0]) > 0.85 and abs(float(r.control[0]) - 0.25) < 0.1

@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_collect_matches_cache(arch, side):
    m = tiny_model(arch, n_layers=2)
    ps = ["I feel fine", "A much longer prompt, to make some padding", "hi there"]
    c = run_with_cache(m, ps, names=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.attn.hook_z"], padding_side=side)
    ar = torch.arange(3)
    for pos in (-1, -2, 1):
        a = collect_activations(m, ps, pos=pos, batch_size=2, padding_side=side, progress=False)
        i = pos_index(c.inputs, pos)
        torch.testing.assert_close(a.acts, torch.stack([c["resid_post", l][ar, i] for l in range(2)]), atol=1e-5, rtol=1e-5)
    z = collect_activations(m, ps, hooks="z", layers=[1], padding_side=side, progress=False)
    torch.testing.assert_close(z.acts[0], c["z", 1][ar, pos_index(c.inputs, -1)], atol=1e-5, rtol=1e-5)
    msk = c.inputs["attention_mask"][..., None].float()
    a = collect_activations(m, ps, pos="mean", padding_side=side, progress=False)
    torch.testing.assert_close(a.acts, torch.stack([(c["resid_post", l] * msk).sum(1) / msk.sum(1) for l in range(2)]), atol=1e-5, rtol=1e-5)
    a = collect_activations(m, ps, pos="e", padding_side=side, progress=False)   # first 'e' in each prompt
    rows = torch.tensor([p.index("e") + 1 for p in ps])                           # byte tokens after a BOS
    i = ((c.inputs["attention_mask"].cumsum(-1) - 1 == rows[:, None]) & (c.inputs["attention_mask"] == 1)).long().argmax(-1)
    torch.testing.assert_close(a.acts[1], c["resid_post", 1][ar, i], atol=1e-5, rtol=1e-5)
    assert_no_hooks(m)

def test_clear_errors():
    X, y, _ = gaussian_layers(n=100)
    with pytest.raises(ValueError, match="99 labels for 100"): train_probes(X, y[:-1])
    with pytest.raises(ValueError, match="Valid names: " + ", ".join(DATASETS)): labelled_prompts("sentimental")
    m = tiny_model("llama")
    with pytest.raises(ValueError, match="not in the prompt"): collect_activations(m, ["I feel", "nope"], pos=" feel", progress=False)

def test_datasets():
    s = labelled_prompts("sentiment")
    assert len(s) == 200 and s.labels.sum() == 100 and len(set(s.prompts)) == 200
    for pos, neg in s.pairs(): assert pos.split()[-1] == neg.split()[-1] and pos != neg
    e, t = labelled_prompts("emotions"), labelled_prompts("topics")
    assert e.labels.bincount().tolist() == [20] * 6 and t.labels.bincount().tolist() == [25] * 4
    assert len(set(e.prompts)) == 120 and len(set(t.prompts)) == 100

@pytest.mark.slow
def test_smollm2_sentiment(smollm2):
    ds = labelled_prompts("sentiment", n=120)
    r = train_probes(collect_activations(smollm2, ds, progress=False), ds)
    b = r.best_layer()
    assert float(r.test[b]) > 0.85 and float(r.cv[b]) > 0.85 and float(r.control[b]) < 0.65

def test_layer_subset_keeps_model_layer_numbers():
    "Probes on a subset of layers are named and addressed by the model's layer numbers, not by row"
    m = tiny_model("llama", n_layers=3, seed=0)
    data = labelled_prompts("sentiment", n=24)
    acts = collect_activations(m, data, "resid_post", layers=[1, 2], progress=False)
    res = train_probes(acts, data, folds=3)
    assert res.names == ["L1", "L2"] and res.layers == [1, 2] and res.best_layer() in (1, 2)
    full = train_probes(collect_activations(m, data, "resid_post", progress=False), data, folds=3)
    torch.testing.assert_close(res.direction(2), full.direction(2))          # the same probe, addressed by its layer
    torch.testing.assert_close(res.predict(acts.acts[1], 2), full.predict(acts.acts[1], 2))
    with pytest.raises(IndexError, match="probed layers: 1"): res.direction(0)
    # the one grid convention: real layer numbers in top() and to_pandas()
    best = res.best_layer()
    t = res.top(2)
    assert t[0].index == (best,) and t[0].name == f"L{best}" and {x.index[0] for x in t} == {1, 2}
    assert abs(t[0].score - float(res.cv[res.layers.index(best)])) < 1e-6   # ScoreGrid reads scores as float32
    df = res.to_pandas()
    assert df["layer"].tolist() == [1, 2] and df["name"].tolist() == ["L1", "L2"] and "selectivity" in df

def test_head_probes_top_uses_real_indices():
    X, y, _ = gaussian_layers(n=200, d=8)
    Xh = torch.randn(4, 200, 3, 8, generator=torch.Generator().manual_seed(0)); Xh[2, :, 1] = X[3]
    r = train_probes(Xh, y, folds=2)
    top = r.top(1)[0]
    assert top.index == (2, 1) == r.best_layer() and top.name == "L2H1"
    assert r.to_pandas()[["layer", "head"]].values.tolist()[:4] == [[0, 0], [0, 1], [0, 2], [1, 0]]
