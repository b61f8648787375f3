"Semi-NMF of MLP activations (P18): planted factorisations, the solver's invariants, activations and residual writes against plain HF forwards"
import math
import pytest
import torch
from headscope.arch import arch_spec, blocks, get_module
from headscope.models import tiny_model
from headscope.probes.steering import SteeringVector
from headscope.probes.sweep import steering_sweep
from headscope.sae.snmf import (SNMF, snmf, MLPActivations, mlp_activations, snmf_top_activations, component_association,
                                component_direction, snmf_steering)


def _planted(seed=0, d=60, n=300, k=5, s=6, dens=0.5):
    "A = (Z Y)^T with each planted feature on its own `s` neurons and Y >= 0 sparse"
    g = torch.Generator().manual_seed(seed)
    Z = torch.zeros(d, k); perm = torch.randperm(d, generator=g)
    for j in range(k): Z[perm[s * j:s * (j + 1)], j] = torch.randn(s, generator=g)
    Y = torch.rand(k, n, generator=g) * (torch.rand(k, n, generator=g) < dens)
    return (Z @ Y).T, Z, Y


def _match(found, planted):
    "|cosine| [planted] of each planted column with its best found column, and whether the best matches form a permutation"
    c = ((found / found.norm(dim=0)).T @ (planted / planted.norm(dim=0))).abs()   # [found planted]
    return c.max(0).values, len(set(c.argmax(0).tolist())) == planted.shape[1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_planted_sparse_features(seed):
    A, Z, Y = _planted(seed)
    s = snmf(A, 5, n_iter=200, sparsity=0.1, init="random", n_init=4, seed=seed)
    best, perm = _match(s.Z, Z)
    assert perm and best.min() > 0.999                       # every planted feature found once, up to order and scale
    assert s.rel_error < 1e-4
    # matched coefficients agree up to the feature's scale: y_found = y_true * ‖z_true‖ (Z has unit columns)
    c = ((s.Z / s.Z.norm(dim=0)).T @ (Z / Z.norm(dim=0))).abs()
    for j, i in enumerate(c.argmax(0).tolist()):
        ref = Y[j] * Z[:, j].norm()
        assert (s.Y[i] - ref).norm() < 1e-2 * ref.norm()


def test_plain_semi_nmf_fits_exact_low_rank_and_never_rises():
    g = torch.Generator().manual_seed(3)
    Z, Y = torch.randn(40, 4, generator=g), torch.rand(4, 200, generator=g)
    s = snmf((Z @ Y).T, 4, n_iter=300)
    assert s.rel_error < 1e-3
    e = s.errors
    assert len(e) == 300 and (e.diff() <= 1e-9 * e[:-1]).all()
    assert s.best_iter == len(e) - 1


def test_objective_recomputed_in_float64_and_factors_valid():
    g = torch.Generator().manual_seed(4)
    A = torch.randn(150, 30, generator=g)                      # mixed-sign data: no exact factorisation
    for sp in (None, 0.2):
        s = snmf(A, 6, n_iter=60, sparsity=sp, init="kmeans")
        A64, R = A.double(), s.Z.double() @ s.Y.double()
        ref = float(((A64.T - R) ** 2).sum())
        assert math.isclose(ref, float(s.errors[s.best_iter]), rel_tol=1e-5)
        assert math.isclose(s.total, float((A64 ** 2).sum()), rel_tol=1e-12)
        assert (s.Y >= 0).all()
        torch.testing.assert_close(s.Z.norm(dim=0), torch.ones(6), atol=1e-5, rtol=0)
        assert (s.Y.norm(dim=1).diff() <= 1e-6).all()           # largest feature first
        torch.testing.assert_close(s.reconstruction(), R.T.float())
        if sp is not None: assert ((s.Z != 0).sum(0) <= math.ceil(0.2 * 30)).all()
        assert s.rel_error == min(s.rel_errors.tolist())        # the best iterate is the one kept


def test_seed_determinism():
    A, _, _ = _planted(5)
    for init in ("kmeans", "random"):
        a, b, c = (snmf(A, 4, n_iter=15, seed=sd, init=init) for sd in (7, 7, 8))
        assert torch.equal(a.Z, b.Z) and torch.equal(a.Y, b.Y) and torch.equal(a.errors, b.errors)
        assert not torch.equal(a.Z, c.Z)
    assert torch.equal(snmf(A, 4, 10, seed=1, init="svd").Z, snmf(A, 4, 10, seed=2, init="svd").Z)   # svd: no randomness


@pytest.mark.parametrize("args,msg", [
    (dict(k=301), "need at least k tokens"), (dict(k=-2), "k must be an int >= 1"), (dict(k=0), "k must be an int >= 1"),
    (dict(k=True), "k must be an int"), (dict(k=2.0), "k must be an int"), (dict(k=2, n_iter=0), "n_iter must be an int >= 1"),
    (dict(k=2, sparsity=1.5), "in (0, 1]"), (dict(k=2, init="nndsvd"), "valid: 'kmeans'"), (dict(k=2, n_init=0), "n_init"),
])
def test_clear_errors(args, msg):
    A, _, _ = _planted(0)
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")): snmf(A, **args)


@pytest.mark.parametrize("bad", [torch.randn(5), torch.randn(2, 3, 4), torch.ones(4, 3, dtype=torch.long), [[1., 2.]]])
def test_wrong_shapes(bad):
    with pytest.raises(ValueError, match=r"float tensor \[n d\]"): snmf(bad, 1)


def test_nan_refused():
    A = torch.randn(10, 4); A[3, 1] = math.nan
    with pytest.raises(ValueError, match="NaN or inf"): snmf(A, 2)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mlp_activations_and_direction_match_plain_forward(arch):
    m = tiny_model(arch, n_layers=2, seed=0)
    texts = ["the cat sat on the mat", "a dog", "hello there friend"]
    ma = mlp_activations(m, texts, 1, batch_size=2, progress=False)
    down = get_module(blocks(m)[1], arch_spec(m).mlp_down)
    for t, text in enumerate(texts):
        seen = []
        h = down.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach()))
        with torch.no_grad(): m(**m.tokenizer(text, return_tensors="pt"))
        h.remove()
        rows = ma.text == t
        ref = seen[0][0]
        skip = ref.shape[0] - int(rows.sum())                   # a BOS position, if the tokenizer adds one
        torch.testing.assert_close(ma.acts[rows], ref[skip:], atol=1e-5, rtol=1e-5)
        assert ma.pos[rows].tolist() == list(range(skip, ref.shape[0]))
    s = snmf(ma, 3, 30)
    assert s.layer == 1
    for i in range(3):
        with torch.no_grad(): ref = down(s.Z[:, i][None]) - down(torch.zeros(1, s.Z.shape[0]))   # what the MLP's output moves by
        torch.testing.assert_close(component_direction(m, s, None, i), ref[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="fit at layer 1"): component_direction(m, s, 0, 0)
    with pytest.raises(ValueError, match="features 0..2"): component_direction(m, s, 1, 3)


def test_direction_refused_where_the_mlp_output_is_normalised():
    m = tiny_model("gemma2", n_layers=2, seed=0)
    s = snmf(mlp_activations(m, ["the cat sat on the mat"], 0, progress=False), 2, 10)
    with pytest.raises(ValueError, match="normalises the MLP output"): component_direction(m, s, None, 0)


def _handmade():
    "An SNMF with known coefficients over 4 texts of 3 tokens each"
    Y = torch.tensor([[0., 1, 2, 0, 1, 3, 5, 0, 0, 1, 0, 0], [1., 1, 1, 2, 2, 2, 0, 0, 0, 4, 4, 4]])
    data = MLPActivations(torch.zeros(12, 3), torch.arange(12) + 10, torch.arange(4).repeat_interleave(3), torch.arange(3).repeat(4),
                          ["a", "b", "c", "d"], 0, "blocks.0.mlp.hook_post")
    return SNMF(torch.eye(3)[:, :2], Y, torch.zeros(1, dtype=torch.float64), 1., 0, data=data), Y


def test_top_activations_and_association_against_hand_computation():
    s, Y = _handmade()
    fa = snmf_top_activations(s, k=2, context=(1, 1))
    assert fa.values[0].tolist() == [5., 3.] and fa.window[0].tolist() == [2, 1] and fa.pos[0].tolist() == [0, 2]
    assert fa.ctx_tokens[0, 0].tolist() == [-1, 16, 17]            # the token before lies in another text: left out
    assert fa.ctx_tokens[0, 1].tolist() == [14, 15, -1]
    assert math.isnan(fa.ctx_acts[0, 0, 0]) and fa.ctx_acts[0, 0, 1:].tolist() == [5., 0.]
    assert fa.counts.tolist() == [int((Y[0] > 5e-3).sum()), int((Y[1] > 4e-3).sum())]
    labels = torch.tensor([1, 1, 0, 0])
    per = Y.reshape(2, 4, 3).double().mean(-1)                     # [k text]
    a, b = per[:, :2], per[:, 2:]
    ref = (a.mean(1) - b.mean(1)) / ((a.var(1) + b.var(1)) / 2).sqrt()
    torch.testing.assert_close(component_association(s, labels).double(), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one label per text"): component_association(s, [1, 0])
    with pytest.raises(ValueError, match="bare tensor"): snmf_top_activations(snmf(torch.rand(10, 3), 2, 5))


def test_steering_matches_a_plain_sweep_of_the_same_direction():
    m = tiny_model("llama", n_layers=2, seed=0)
    ma = mlp_activations(m, ["the cat sat on the mat", "a dog ran", "the sun is warm"], 1, progress=False)
    s = snmf(ma, 3, 30)
    kw = dict(prompts=["the cat", "a dog sat"], attribute=(["a", "e"], ["x", "z"]), utility_text="the quick brown fox")
    base = SteeringVector({1: torch.randn(64, generator=torch.Generator().manual_seed(1))})
    r = snmf_steering(m, s, base, coeffs=[1, 3], components=[2, 0], sign=[1, -1], progress=False, **kw)
    for row, i in enumerate([2, 0]):
        ref = steering_sweep(m, SteeringVector({1: component_direction(m, s, 1, i)}).normalised(), [1, 3], progress=False, **kw)
        torch.testing.assert_close(r.shift[row], ref.shift, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r.perplexity[row], ref.perplexity, atol=1e-4, rtol=1e-5)
    b = steering_sweep(m, base.normalised(), [1, 3, -1, -3], progress=False, **kw)
    torch.testing.assert_close(r.baseline_shift.reshape(-1), b.shift, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.effect[1], -r.shift[1])
    torch.testing.assert_close(r.baseline_effect[1], -r.baseline_shift[1])
    assert r.top(1, "effect")[0].name.startswith("component ")
    assert "<table" in r._repr_html_() and "<img" in s._repr_html_()


@pytest.mark.slow
def test_smollm2_mlp_activations_and_write(smollm2):
    m = smollm2
    texts = ["I passed my driving test. I feel", "The library opens on weekdays."]
    ma = mlp_activations(m, texts, 12, progress=False)
    down = get_module(blocks(m)[12], arch_spec(m).mlp_down)
    seen = []
    h = down.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach()))
    with torch.no_grad(): m(**m.tokenizer(texts[1], return_tensors="pt"))
    h.remove()
    torch.testing.assert_close(ma.acts[ma.text == 1], seen[0][0], atol=1e-4, rtol=1e-4)   # no BOS: every token kept
    s = snmf(ma, 4, 20, init="svd")
    with torch.no_grad(): ref = down(s.Z[:, 0][None])[0]                                  # Llama's down_proj has no bias
    torch.testing.assert_close(component_direction(m, s, 12, 0), ref, atol=1e-5, rtol=1e-4)
