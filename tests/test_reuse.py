"""Circuit reuse (`headscope.causal.reuse`) and the Colored Objects pairs (`headscope.data.tasks`): the hypergeometric
chance baseline against brute-force enumeration, overlaps of head sets and grids, the two-task pipeline against direct
patching runs on a tiny model, and the pairs on an in-memory word-level tokenizer."""
import itertools, math, random
from fractions import Fraction
import pytest
import torch
from headscope.models import tiny_model
from headscope.data.pairs import PromptPairs
from headscope.data.tasks import colored_objects_pairs, COLORED_OBJECTS_TEMPLATE, COLORS, OBJECTS
from headscope.causal.attribution import attribution_patching
from headscope.causal.patching import activation_patching, PatchingResult
from headscope.causal.reuse import hypergeom_sf, circuit_overlap, circuit_reuse, Overlap

def _brute(N, A, n):
    "Exact distribution of |A ∩ S| over every n-subset S of range(N): {overlap: Fraction}"
    subsets = list(itertools.combinations(range(N), n))
    counts = {}
    for s in subsets: counts[len(A & set(s))] = counts.get(len(A & set(s)), 0) + 1
    return {x: Fraction(c, len(subsets)) for x, c in counts.items()}

@pytest.mark.parametrize("N,K,n", [(8, 3, 4), (9, 5, 6), (7, 0, 3), (6, 6, 2), (10, 2, 9)])
def test_hypergeom_sf_matches_enumeration(N, K, n):
    dist = _brute(N, set(range(K)), n)
    for x in range(0, min(K, n) + 2):
        assert hypergeom_sf(x, N, K, n) == pytest.approx(float(sum(p for o, p in dist.items() if o >= x)), abs=1e-15)

def test_overlap_against_enumeration():
    rng = random.Random(0)
    U = [f"L{l}H{h}" for l in range(3) for h in range(3)]
    for _ in range(5):
        a, b = rng.sample(U, 3), rng.sample(U, 4)
        o = circuit_overlap(a, b, universe=U)
        shared = set(a) & set(b)
        dist = _brute(len(U), {U.index(h) for h in a}, len(b))                        # b drawn at random
        assert set(o.shared) == shared and o.intersection == len(shared)
        assert o.jaccard == pytest.approx(len(shared) / len(set(a) | set(b)))
        assert o.expected == pytest.approx(float(sum(x * p for x, p in dist.items())))   # the mean of the enumeration
        assert o.p_value == pytest.approx(float(sum(p for x, p in dist.items() if x >= len(shared))))

def test_edge_cases():
    g = torch.tensor([[0.3, -0.7], [0.1, 0.2]])
    e = circuit_overlap(g, g, k=0)
    assert (e.a, e.shared, e.expected, e.p_value, e.n) == ([], [], 0.0, 1.0, 4) and math.isnan(e.jaccard)
    same = circuit_overlap(g, g, k=2)
    assert same.a == ["L0H1", "L0H0"] and same.jaccard == 1.0 and same.p_value == pytest.approx(1 / math.comb(4, 2))
    full = circuit_overlap(g, g, k=4)                                                  # the whole universe: certain
    assert full.p_value == pytest.approx(1.0) and full.expected == 4
    dis = circuit_overlap(["L0H0", (0, 1)], ["L1H0"], universe=tiny_model("llama", n_layers=2, n_heads=4))
    assert (dis.shared, dis.jaccard, dis.p_value, dis.n) == ([], 0.0, 1.0, 8)
    nan = g.clone(); nan[1, 1] = float("nan")                                          # NaN cells are not heads of the grid
    assert circuit_overlap(nan, nan, k=3).n == 3

def test_real_indices_of_a_result():
    s = torch.tensor([[0.0, 0.5], [0.9, 0.0]])
    res = PatchingResult(s, s, 1.0, 0.0, ["layer", "head"], "z", -1, [], {"layer": [5, 7], "head": [0, 1]})
    assert circuit_overlap(res, res, k=2).a == ["L7H0", "L5H1"]

def test_errors():
    g = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="k=None"): circuit_overlap(g, g)
    with pytest.raises(ValueError, match="from 0 to"): circuit_overlap(g, g, k=5)
    with pytest.raises(ValueError, match="universe"): circuit_overlap(["L0H0"], ["L0H1"])
    with pytest.raises(ValueError, match="smaller than"): circuit_overlap(["L0H0"], ["L0H1"], universe=1)
    with pytest.raises(ValueError, match="outside the universe"): circuit_overlap(["L3H0"], ["L0H1"], universe=["L0H0", "L0H1"])
    with pytest.raises(ValueError, match="Unknown head"): circuit_overlap([(0, "a")], ["L0H1"], universe=4)
    with pytest.raises(ValueError, match=r"\[layer head\]"): circuit_overlap(torch.zeros(2, 2, 3), g, k=1)
    with pytest.raises(ValueError, match="non-negative"): hypergeom_sf(1, 4, 2, 1.5)

def _tiny_task(seed, n=3, length=6):
    g = torch.Generator().manual_seed(seed)
    cl, co = torch.randint(3, 250, (n, length), generator=g), torch.randint(3, 250, (n, length), generator=g)
    return PromptPairs(cl, co, torch.randint(3, 250, (n,), generator=g), torch.randint(3, 250, (n,), generator=g))

@pytest.mark.parametrize("method,run", [("attribution", attribution_patching), ("activation", activation_patching)])
def test_circuit_reuse_matches_direct_runs(method, run):
    m = tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2)
    a, b = _tiny_task(0), _tiny_task(1)
    r = circuit_reuse(m, a, b, k=3, names=("one", "two"), method=method, progress=False)
    for t, n in ((a, "one"), (b, "two")):
        ref = run(m, t.clean, t.corrupt, t.logit_diff(), pos=-1, progress=False)
        torch.testing.assert_close(r.scores[n], ref.scores)
    exp = circuit_overlap(r.scores["one"], r.scores["two"], k=3)
    assert (r.overlap.a, r.overlap.b, r.overlap.p_value) == (exp.a, exp.b, exp.p_value) and r.overlap.n == 8
    assert r.top(1, by="two", absolute=True)[0].name == exp.b[0]
    same = circuit_reuse(m, a, a, k=3, progress=False)
    assert same.overlap.jaccard == 1.0
    h = r._repr_html_()
    assert h.count("class='hs-patching'") == 2
    assert h.count("stroke='#111111' stroke-width='3'") == 2 * r.overlap.intersection      # shared heads outlined in both maps
    assert h.count("stroke-dasharray='3,2'") == 2 * (3 - r.overlap.intersection)
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())

def test_circuit_reuse_errors_before_any_forward():
    m = tiny_model("llama", n_layers=2, n_heads=4, n_kv_heads=2)
    t = _tiny_task(0)
    calls = []
    h = m.register_forward_pre_hook(lambda *a: calls.append(1))
    for kw, msg in [(dict(method="exact"), "Unknown method"), (dict(kind="v"), "kind="), (dict(k=9), "from 1 to the 8"),
                    (dict(k=0), "from 1"), (dict(pos="each"), "pos='each'"), (dict(names=("x", "x")), "two different")]:
        with pytest.raises(ValueError, match=msg): circuit_reuse(m, t, t, progress=False, **{"k": 2, **kw})
    with pytest.raises(TypeError, match="PromptPairs"): circuit_reuse(m, t, ["a prompt"], k=2, progress=False)
    h.remove()
    assert calls == []

def _word_tokenizer():
    "An in-memory word-level tokenizer knowing the template's words, the colours and the objects"
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["[UNK]"] + sorted(set(COLORED_OBJECTS_TEMPLATE.replace(",", " , ").replace(".", " . ").split()) | set(COLORS) | set(OBJECTS) | {"{"})
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")

def test_colored_objects_pairs_on_a_word_tokenizer():
    tok = _word_tokenizer()
    pp = colored_objects_pairs(tok, 10, seed=3)
    assert len(pp) == 10 and pp.correct.shape == pp.wrong.shape == (10,)
    unk = tok.convert_tokens_to_ids("[UNK]")
    for p, q, a, b in zip(pp.clean, pp.corrupt, pp.correct.tolist(), pp.wrong.tolist()):
        x, y = tok(p)["input_ids"], tok(q)["input_ids"]
        assert len(x) == len(y) and unk not in x and p != q and a != b
        assert len(tok(" " + tok.decode([a]))["input_ids"]) == 1                  # the answer is one token
        diff = [i for i, (u, v) in enumerate(zip(x, y)) if u != v]
        assert len(diff) == 2 and sorted(x[i] for i in diff) == sorted(y[i] for i in diff) == sorted([a, b])   # colours swapped
        obj = p.rsplit("The ", 1)[1].split()[0]                                   # the object asked about
        query = [w.strip(".,") for w in p.split("\n\n")[1].split()]
        assert query[query.index(obj) - 1] == tok.decode([a]).strip()            # the answer is its colour
    first = [p.rsplit("The ", 1)[1].split()[0] == p.split("\n\n")[1].split()[7] for p in pp.clean]
    assert first == [i % 2 == 0 for i in range(10)]                               # half ask for the first object

def test_colored_objects_errors():
    with pytest.raises(ValueError, match="single tokens"): colored_objects_pairs(tiny_model("llama").tokenizer, 4)   # bytes
    with pytest.raises(ValueError, match="lacks"): colored_objects_pairs(_word_tokenizer(), 4, template="The {q} is")
    with pytest.raises(ValueError, match="positive"): colored_objects_pairs(_word_tokenizer(), 0)

@pytest.mark.slow
def test_attribution_picks_the_exact_top_heads_on_smollm2(smollm2):
    "The chapter ranks heads by attribution patching; on the last layers its top-5 for Colored Objects are the exact ones"
    co = colored_objects_pairs(smollm2.tokenizer, 8, model=smollm2)
    kw = dict(kind="z", pos=-1, layers=[23, 24, 29], progress=False)
    ex = activation_patching(smollm2, co.clean, co.corrupt, co.logit_diff(), **kw)
    at = attribution_patching(smollm2, co.clean, co.corrupt, co.logit_diff(), **kw)
    o = circuit_overlap(ex, at, k=5)
    assert o.intersection >= 4, o
