"""Sublayer dropping (P23) against independent references.

References: plain Hugging Face forwards with PyTorch forward hooks on the real modules that replace their
output with zeros; next-token losses recomputed text by text without padding; the residuals a sublayer
reads and writes read from `output_hidden_states` and from hooks on the HF modules; a toy whose attention
is an exact no-op (its output projection zeroed)."""
import pytest, torch
import torch.nn.functional as F
from headscope.models import tiny_model
from headscope.arch import blocks
from headscope.hooking import run_with_hooks
from headscope.causal.redundancy import drop_sublayers, sublayer_similarity, sublayer_redundancy, _Scorer
from _checks import assert_no_hooks, hook_state

# where each architecture's sublayer outputs come from (block-relative): what is added to the residual
OUT = {"llama": ("self_attn", "mlp"), "gpt2": ("attn", "mlp"), "gpt_neox": ("attention", "mlp"),
       "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm")}
O_PROJ = {"llama": "self_attn.o_proj", "gpt2": "attn.c_proj"}

def _get(mod, path):
    for p in path.split("."): mod = getattr(mod, p)
    return mod

def _zero(mod, a, o): return (torch.zeros_like(o[0]),) + tuple(o[1:]) if isinstance(o, tuple) else torch.zeros_like(o)

def _plain(model, ids, attn=(), mlp=(), extra=()):
    "Logits of a plain HF forward with the given sublayers' outputs zeroed by hand-written forward hooks"
    a, m = OUT[model.config.model_type]
    bs = blocks(model)
    hs = [_get(bs[l], a).register_forward_hook(_zero) for l in attn] + [_get(bs[l], m).register_forward_hook(_zero) for l in mlp]
    hs += [mod.register_forward_hook(f) for mod, f in extra]
    try:
        with torch.no_grad(): return model(ids).logits
    finally:
        for h in hs: h.remove()

def _ids(seed, shape): return torch.randint(3, 250, shape, generator=torch.Generator().manual_seed(seed))

def _loss(logits, ids):
    "Mean next-token cross-entropy over all predictions `[batch pos-1]`, float64"
    return float(F.cross_entropy(logits[:, :-1].double().flatten(0, 1), ids[:, 1:].flatten(), reduction="mean"))

@pytest.fixture(scope="module")
def noop():
    "A 3-layer llama whose attention 1 adds exactly nothing"
    m = tiny_model("llama", n_layers=3, seed=1)
    with torch.no_grad(): _get(blocks(m)[1], O_PROJ["llama"]).weight.zero_()
    return m

@pytest.mark.parametrize("arch", sorted(OUT))
def test_drop_matches_hand_zeroed_modules(arch):
    m = tiny_model(arch, n_layers=3)
    ids = _ids(0, (2, 10))
    with torch.no_grad(): full = m(ids).logits
    for attn, mlp in (([1], []), ([], [0]), ([0, 2], [1])):
        got = run_with_hooks(m, ids, drop_sublayers(m, attn=attn, mlp=mlp))
        want = _plain(m, ids, attn, mlp)
        assert torch.allclose(got, want, atol=1e-5), (arch, attn, mlp)
        assert (got - full).abs().max() > 1e-4                      # the drop did something
    # names and negative layers say the same thing
    assert torch.equal(run_with_hooks(m, ids, drop_sublayers(m, ["ATTN0", ("attn", -1), "MLP1"])),
                       run_with_hooks(m, ids, drop_sublayers(m, attn=[0, 2], mlp=[1])))
    assert_no_hooks(m)

def test_scorer_batched_rows_match_text_by_text_losses():
    "K drop sets over the batch (padded texts, few sets per forward) = one plain forward per text and set"
    m = tiny_model("llama", n_layers=3, seed=2)
    texts = ["the cat sat on the mat", "a longer sentence that pads the first one out", "short"]
    x = {k: v for k, v in m.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right").items() if k in ("input_ids", "attention_mask")}
    sets = [[("attn", 2)], [("mlp", 0), ("attn", 1)], [("mlp", 2)], [("attn", 0)]]
    got = _Scorer(m, x, "loss", max_tokens=2 * x["input_ids"].numel()).run(sets)
    for s, g in zip(sets, got.tolist()):
        tot = n = 0
        for t in texts:
            ids = torch.tensor([m.tokenizer(t)["input_ids"]])
            lg = _plain(m, ids, [l for k, l in s if k == "attn"], [l for k, l in s if k == "mlp"])
            tot += _loss(lg, ids) * (ids.shape[1] - 1); n += ids.shape[1] - 1
        assert abs(g - tot / n) < 1e-4, (s, g, tot / n)

@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_similarity_matches_hidden_states(arch):
    m = tiny_model(arch, n_layers=3)
    assert arch != "gpt_neox" or m.config.use_parallel_residual
    ids = _ids(3, (2, 9))
    a, mm = OUT[arch]
    outs, hs = {}, []
    for l, b in enumerate(blocks(m)):
        for kind, p in (("attn", a), ("mlp", mm)):
            hs.append(_get(b, p).register_forward_hook(lambda mod, i, o, k=(kind, l): outs.__setitem__(k, o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad(): H = m(ids, output_hidden_states=True).hidden_states
    finally:
        for h in hs: h.remove()
    cos = lambda x, y: F.cosine_similarity(x.double(), y.double(), dim=-1).mean()
    got = sublayer_similarity(m, ids)
    for l in range(3):
        X = H[l]
        Xm = X if arch == "gpt_neox" else X + outs["attn", l]            # parallel blocks: the MLP reads the block's input
        assert abs(got[0, l] - cos(X, X + outs["attn", l])) < 1e-6
        assert abs(got[1, l] - cos(Xm, Xm + outs["mlp", l])) < 1e-6
        if arch == "llama" and l < 2: assert torch.allclose(Xm + outs["mlp", l], H[l + 1], atol=1e-5)

def test_noop_is_redundant_first(noop):
    ids = _ids(4, (2, 12))
    r = sublayer_redundancy(noop, ids, kind="both", max_drop=3, metric="kl", progress=False)
    assert abs(float(r.scores["similarity"][0, 1]) - 1) < 1e-12
    assert float(r.scores["similarity"].flatten().topk(2).values[1]) < 1 - 1e-4
    assert r.greedy_order[0] == r.sim_order[0] == "ATTN1"
    assert abs(r.single()["ATTN1"]) < 1e-7 and min(v for k, v in r.single().items() if k != "ATTN1") > 1e-6
    rl = sublayer_redundancy(noop, ids, kind="attn", greedy=False, metric="loss", progress=False)
    with torch.no_grad(): full = _loss(noop(ids).logits, ids)
    assert abs(rl.base - full) < 1e-5
    assert abs(float(rl.scores["increase"][0, 1])) < 1e-5
    for l in (0, 2):   # every single drop against its plain forward
        assert abs(float(rl.scores["increase"][0, l]) - (_loss(_plain(noop, ids, [l]), ids) - full)) < 1e-5

def test_greedy_and_similarity_curves_by_construction(noop):
    ids = _ids(5, (2, 10))
    r = sublayer_redundancy(noop, ids, kind="both", max_drop=4, metric="loss", progress=False, max_tokens=40)
    with torch.no_grad(): full = _loss(noop(ids).logits, ids)
    lo = lambda names: _loss(_plain(noop, ids, [int(n[4:]) for n in names if n.startswith("ATTN")], [int(n[3:]) for n in names if n.startswith("MLP")]), ids)
    for order, curve in ((r.greedy_order, r.greedy_curve), (r.sim_order, r.sim_curve)):
        assert len(order) == 4 and len(set(order)) == 4 and len(curve) == 5
        for k in range(5): assert abs(float(curve[k]) - (lo(order[:k]) if k else full)) < 1e-5, (order, k)
    assert abs(float(r.greedy_curve[1]) - (min(r.single().values()) + r.base)) < 1e-6      # step 1: the best single drop
    sims = [float(r.scores["similarity"][0 if n.startswith("ATTN") else 1, int(n.lstrip("ATMLPN"))]) for n in r.sim_order]
    assert sims == sorted(sims, reverse=True) and sims[0] == float(r.scores["similarity"].max())
    # each greedy step is the best among what remained (full search: no pool)
    for k in range(1, 4):
        rest = [c for c in r.cell_labels if c not in r.greedy_order[:k]]
        assert float(r.greedy_curve[k + 1]) <= min(lo(r.greedy_order[:k] + [c]) for c in rest) + 1e-5
    assert r.droppable(tol=1e9) == r.greedy_order and r.droppable(tol=-1) == []
    df = r.to_pandas()
    assert set(df.columns) >= {"sublayer", "layer", "name", "increase", "similarity"} and len(df) == 6

def test_hooks_gone_after_raising_forward(noop):
    ids = _ids(6, (2, 8))
    def boom(mod, a, o):
        if o[0].shape[0] > 2: raise RuntimeError("boom")     # the batched drops raise, the clean run does not
    h = blocks(noop)[2].register_forward_hook(boom)
    before = hook_state(noop)
    try:
        with pytest.raises(RuntimeError, match="boom"): sublayer_redundancy(noop, ids, kind="both", progress=False)
        assert_no_hooks(noop, before)
        assert not any("forward" in b.__dict__ for b in blocks(noop))            # no block left replaying
    finally: h.remove()
    assert_no_hooks(noop)
    with torch.no_grad(): assert torch.equal(noop(ids).logits, _plain(noop, ids))

def test_errors_before_any_forward(noop):
    calls = []
    h = noop.register_forward_pre_hook(lambda mod, a: calls.append(1))
    try:
        with pytest.raises(IndexError, match=r"ATTN3: layer 3 does not exist; the model has layers 0\.\.2"): drop_sublayers(noop, ["ATTN3"])
        with pytest.raises(IndexError, match="MLP: layer -4 does not exist"): drop_sublayers(noop, mlp=[-4])
        with pytest.raises(IndexError, match="Attention: layer 7 does not exist"): drop_sublayers(noop, attn=7)
        with pytest.raises(ValueError, match="write 'ATTN"): drop_sublayers(noop, ["L0H1"])
        with pytest.raises(TypeError, match="give an int or a list of ints"): drop_sublayers(noop, attn=[1.0])
        ids = _ids(7, (1, 6))
        with pytest.raises(IndexError, match="layer 3 does not exist"): sublayer_redundancy(noop, ids, layers=[0, 3])
        with pytest.raises(ValueError, match=r"max_drop=2: give an int in 0\.\.1"): sublayer_redundancy(noop, ids, layers=[0], max_drop=2)
        with pytest.raises(ValueError, match="choose one of 'attn', 'mlp', 'both'"): sublayer_redundancy(noop, ids, kind="block")
        with pytest.raises(ValueError, match="'loss', 'kl'"): sublayer_redundancy(noop, ids, metric="ppl")
        with pytest.raises(ValueError, match="at least 2 tokens"): sublayer_redundancy(noop, ids[:, :1])
    finally: h.remove()
    assert calls == []

@pytest.mark.slow
def test_smollm2_drop_matches_hand_zeroed_modules(smollm2):
    ids = smollm2.tokenizer(["The garden was quiet in the early morning."], return_tensors="pt")["input_ids"]
    got = run_with_hooks(smollm2, ids, drop_sublayers(smollm2, ["ATTN25", "MLP3"]))
    assert torch.allclose(got, _plain(smollm2, ids, [25], [3]), atol=1e-4)
    assert_no_hooks(smollm2)
