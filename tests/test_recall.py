"""Factual-recall mechanics (`causal.recall`) against independent references on tiny models.

References: a plain Hugging Face forward per prompt (`output_hidden_states`, the model's final norm and
`lm_head` applied by hand; eager `output_attentions`), plain PyTorch hooks on the last decoder layer and
its `o_proj` with the final norm's formula written out in float64, and a hand-built result whose
statistics are known."""
import math, pytest, torch
from headscope.models import tiny_model
from headscope.tokens import to_inputs, set_prepend_bos
from headscope.causal.recall import recall_mechanics, FactualRecall
from _checks import assert_no_hooks

FACTS = [("The capital of {} is", "France", "P"), ("The capital of {} is", "Italy", "R"), ("{} is in the city of", "Big Ben", "L"),
         ("In {}, people speak", "Brazil", "p"), ("The capital of {} is", "Peru", "L")]   # three token lengths: left padding in each batch

# the final norm and where the last block lives, spelled out per family (not through headscope.arch)
NORM = {"llama": lambda m: m.model.norm, "gpt2": lambda m: m.transformer.ln_f, "gemma2": lambda m: m.model.norm}
LAST = {"llama": lambda m: m.model.layers[-1], "gpt2": lambda m: m.transformer.h[-1], "gemma2": lambda m: m.model.layers[-1]}

def _frozen(arch, m, x, v):
    "`v` through the final norm at the scale it computes from `x` (float64), gain applied, bias left out"
    x, v, g = x.double(), v.double(), NORM[arch](m).weight.detach().double()
    if arch == "gpt2":
        eps = m.config.layer_norm_epsilon
        return (v - v.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt() * g
    w = 1 + g if arch == "gemma2" else g
    return v / (x.pow(2).mean(-1, keepdim=True) + m.config.rms_norm_eps).sqrt() * w

@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma2"])
def arch(request): return request.param

@pytest.fixture(scope="module")
def run(arch):
    m = tiny_model(arch, n_layers=2, seed=2, attn_implementation="eager")
    return arch, m, recall_mechanics(m, FACTS, batch_size=3, progress=False)

def test_lens_ranks_match_hidden_states(run):
    arch, m, r = run
    U, norm = m.get_output_embeddings().weight.detach().double(), NORM[arch](m)
    for i, (t, s, a) in enumerate(FACTS):
        with torch.no_grad(): o = m(**to_inputs(m, t.format(s)), output_hidden_states=True)
        rows = [norm(h[0, -1]).double() @ U.T for h in o.hidden_states[:-1]]   # hidden_states[l]: the input of layer l
        lg = torch.stack(rows + [o.logits[0, -1].double()])                  # the last row is the model's own output
        cap = getattr(m.config, "final_logit_softcapping", None)
        if cap: lg[:-1] = torch.tanh(lg[:-1] / cap) * cap
        ai = int(r.answer_ids[i])
        assert torch.allclose(r.logits[i].double(), lg[:, ai], atol=1e-4)
        assert torch.equal(r.ranks[i], (lg > lg[:, ai:ai + 1]).sum(-1))
        assert torch.allclose(r.probs[i].double(), lg.softmax(-1)[:, ai], atol=1e-6)
        assert bool(r.correct[i]) == (int(o.logits[0, -1].argmax()) == ai)

def test_subject_attention_matches_eager_patterns(run):
    arch, m, r = run
    for i, (t, s, a) in enumerate(FACTS):
        with torch.no_grad(): o = m(**to_inputs(m, t.format(s)), output_attentions=True)
        span = [1 + t.index("{}") + j for j in range(len(s))]                  # byte tokens after a <bos>
        ref = torch.stack([p[0, :, -1, span].sum(-1) for p in o.attentions])  # [layer head]
        assert torch.allclose(r.subject_attn[i], ref.float(), atol=1e-5)

def test_batching_changes_nothing():
    m = tiny_model("qwen2", n_layers=2, seed=4)
    one, many = (recall_mechanics(m, FACTS, batch_size=b, progress=False) for b in (1, 5))
    for k in ("ranks", "logits", "probs", "last_dla", "last_dla_raw", "subject_attn"):
        assert torch.allclose(getattr(one, k).double(), getattr(many, k).double(), atol=1e-4), k
    assert_no_hooks(m)                                                       # every hook and the attention switch undone

def test_last_block_dla_adds_up(run):
    "Each component and their sum against plain hooks: the last block's write through the final norm at its real scale"
    arch, m, r = run
    last, U = LAST[arch](m), m.get_output_embeddings().weight.detach().double()
    got = {}
    hs = [last.register_forward_pre_hook(lambda mod, a, k: got.__setitem__("pre", (a[0] if a else k["hidden_states"]).detach()), with_kwargs=True),
          last.register_forward_hook(lambda mod, a, o: got.__setitem__("post", (o[0] if isinstance(o, tuple) else o).detach()))]
    if arch == "llama":
        hs.append(last.self_attn.o_proj.register_forward_pre_hook(lambda mod, a: got.__setitem__("z", a[0].detach())))
        hs.append(last.mlp.register_forward_hook(lambda mod, a, o: got.__setitem__("mlp", o.detach())))
    try:
        for i, (t, s, a) in enumerate(FACTS):
            with torch.no_grad(): m(**to_inputs(m, t.format(s)))
            x, d = got["post"][0, -1], U[int(r.answer_ids[i])]
            wrote = _frozen(arch, m, x, got["post"][0, -1] - got["pre"][0, -1])
            assert math.isclose(float(r.last_dla_raw[i].sum()), float(wrote @ d), abs_tol=1e-4)
            assert math.isclose(float(r.last_dla[i].sum()), float(wrote @ (d - U.mean(0))), abs_tol=1e-4)
            if arch == "llama":                                              # per head: z_h W_O^h, and the MLP
                H, W = m.config.num_attention_heads, last.self_attn.o_proj.weight.detach().double()
                dh = W.shape[1] // H
                z = got["z"][0, -1].double()
                for h in range(H):
                    o_h = W[:, h * dh:(h + 1) * dh] @ z[h * dh:(h + 1) * dh]
                    assert math.isclose(float(r.last_dla_raw[i, h]), float(_frozen(arch, m, x, o_h) @ d), abs_tol=1e-5)
                assert math.isclose(float(r.last_dla_raw[i, -1]), float(_frozen(arch, m, x, got["mlp"][0, -1]) @ d), abs_tol=1e-5)
                assert float(r.last_dla_raw[i, H]) == 0.0                     # Llama's o_proj has no bias
    finally:
        for h in hs: h.remove()

def test_first_token_left_out_without_bos():
    "With no BOS the first token is the sink: a subject starting the prompt loses it, and a one-token subject there is refused"
    m = set_prepend_bos(tiny_model("llama", n_layers=2, seed=1, attn_implementation="eager"), False)
    r = recall_mechanics(m, [("{} is big", "Rome", "x")], progress=False)
    with torch.no_grad(): o = m(**to_inputs(m, "Rome is big"), output_attentions=True)
    assert to_inputs(m, "Rome is big")["input_ids"][0, 0] == ord("R")
    ref = torch.stack([p[0, :, -1, 1:4].sum(-1) for p in o.attentions])        # "ome", not "R"
    assert torch.allclose(r.subject_attn[0], ref, atol=1e-5)
    with pytest.raises(ValueError, match="first token"): recall_mechanics(m, [("{} is big", "R", "x")], progress=False)

def test_bad_input_fails_before_any_forward():
    m = tiny_model("llama", n_layers=2)
    calls = []
    h = m.register_forward_pre_hook(lambda mod, a: calls.append(1))
    try:
        for facts, err, msg in [([("The capital of {} is", "France", "Pa")], ValueError, "2 tokens"),
                                ([("The capital of France is", "France", "P")], ValueError, "exactly one"),
                                ([("The capital of {} is", "", "P")], ValueError, "empty"),
                                (["The capital of France is"], TypeError, "triple"),
                                ([("The capital of {} is", "France", "P"), ("{} is", "Rome", 3)], TypeError, "triple"),
                                (None, ValueError, "No fact to read")]:       # the shipped answers are several bytes each
            with pytest.raises(err, match=msg): recall_mechanics(m, facts, progress=False)
        with pytest.raises(ValueError, match="batch_size"): recall_mechanics(m, FACTS, batch_size=0)
        with pytest.raises(ValueError, match="batch_size"): recall_mechanics(m, FACTS, batch_size=True)
        assert not calls
    finally: h.remove()
    tok, m.tokenizer = m.tokenizer, None
    with pytest.raises(ValueError, match="tokenizer"): recall_mechanics(m, FACTS)
    m.tokenizer = tok

def _toy(ranks, probs, last, attn, correct):
    n, L1 = len(ranks), len(ranks[0])
    return FactualRecall(templates=["{} is"] * n, subjects=[f"s{i}" for i in range(n)], prompts=[f"s{i} is" for i in range(n)],
                         answers=["a"] * n, answer_ids=torch.zeros(n, dtype=torch.long), predicted=["a" if c else "b" for c in correct],
                         correct=torch.tensor(correct), lens_labels=[f"L{l}" for l in range(L1 - 1)] + ["final"],
                         ranks=torch.tensor(ranks), logits=torch.zeros(n, L1), probs=torch.tensor(probs),
                         last_labels=["L1H0", "L1H1", "L1 attn bias", "L1 MLP"], last_dla=torch.tensor(last),
                         last_dla_raw=torch.tensor(last) + 1, subject_attn=torch.tensor(attn), n_kv_heads=1)

def test_statistics_of_a_hand_built_result():
    "Known answers: facts right only, median and quartiles of ranks, peaks, signs and topic heads"
    a = [[[0.1, 0.5], [0.25, 0.0]]] * 4
    r = _toy(ranks=[[100, 10, 0], [300, 20, 0], [200, 5, 1], [9, 9, 9]],
             probs=[[0.0, 0.6, 0.5], [0.0, 0.1, 0.7], [0.0, 0.2, 0.1], [0.9, 0.0, 0.0]],
             last=[[-1., 0., 0., 0.5], [1., 0., 0., 0.], [0., -3., 0., 1.], [-9., 0., 0., 0.]],
             attn=[a[0], a[0], [[0.4, 0.1], [0.25, 0.0]], [[1.0, 1.0], [1.0, 1.0]]], correct=[True, True, True, False])
    assert torch.equal(r.median_rank(), torch.tensor([200., 10., 0.], dtype=torch.float64))
    assert torch.allclose(r.rank_quantiles()[[0, 2], 0], torch.tensor([150., 250.], dtype=torch.float64))
    assert r.peak_layer.tolist() == [1, 2, 1, 0] and math.isclose(r.early_fraction(), 2 / 3)
    assert math.isclose(r.suppressed_fraction(), 2 / 3) and r.suppressed_fraction(raw=True) == 0.0   # raw = centred + 1 here
    assert torch.allclose(r.scores, torch.tensor([[0.2, 0.3667], [0.25, 0.0]]), atol=1e-4)            # the wrong fact left out
    assert [t.name for t in r.topic_heads()] == ["L0H1"] and [t.name for t in r.topic_heads(0.15)] == ["L0H1", "L1H0", "L0H0"]
    assert r.wrong == [("s3 is", "a", "b")]
    e = r.e9()
    assert (e["n_facts"], e["n_right"], e["median_rank_mid"], e["median_rank_late"], e["topic_heads"]) == (4, 3, 10.0, 10.0, 1)
    s = r.select([0, 3])
    assert s.prompts == ["s0 is", "s3 is"] and s.correct.tolist() == [True, False] and s.lens_labels == r.lens_labels
    none = r.select([3])
    assert "0 of 1 facts right" in repr(none)
    with pytest.raises(ValueError, match="none of the 1 facts"): none.e9()
