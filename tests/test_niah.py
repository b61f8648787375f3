"""The needle-in-a-haystack grid, head masking and AttentionInfluence against independent references on tiny models.

References: `retrieval_scores` run on each task alone (grid bookkeeping), greedy decoding (`greedy_decode`) with the
heads zeroed by plain PyTorch pre-hooks on `o_proj` (the teacher-forced masked verdict), and plain forwards with the same
plain hooks and `F.cross_entropy` (the loss differences). Bad input fails before any forward; nothing stays attached."""
import pytest, torch
from torch import nn
from headscope.models import tiny_model
from headscope.heads.retrieval import retrieval_scores, greedy_decode
from headscope.heads.niah import (niah_tasks, niah_grid, NIAHGrid, head_mask_hooks, exact_copies, mask_retrieval_heads,
                                  influence_domains, attention_influence)
from headscope.hooking import hooks
from _checks import assert_no_hooks

@pytest.fixture(scope="module")
def m(): return tiny_model("llama", n_layers=3, n_heads=4, n_kv_heads=2, seed=1)

@pytest.fixture(scope="module")
def grid(m): return niah_grid(m, lengths=(24, 40), depths=(0.2, 0.5, 0.9), n_needles=2, n_digits=3, progress=False)

def zeroed(m, heads):
    "Plain PyTorch pre-hooks zeroing each (layer, head)'s slice of the `o_proj` input: the reference ablation"
    D = m.config.hidden_size // m.config.num_attention_heads
    def pre(hs):
        def f(mod, args):
            x = args[0].clone()
            for h in hs: x[..., h * D:(h + 1) * D] = 0
            return (x,)
        return f
    by = {}
    for l, h in heads: by.setdefault(l, []).append(h)
    return [m.model.layers[l].self_attn.o_proj.register_forward_pre_hook(pre(hs)) for l, hs in by.items()]

def greedy_zeroed(m, ids, steps, heads):
    hs = zeroed(m, heads)
    try: return greedy_decode(m, ids, steps)
    finally:
        for h in hs: h.remove()

def test_grid_bookkeeping_matches_per_task_retrieval(m, grid):
    assert (grid.accuracy.shape, grid.copied.shape, grid.scores_by_length.shape) == ((2, 3), (2, 3, 2), (2, 3, 4))
    one = [retrieval_scores(m, [t], progress=False) for t in grid.tasks]
    assert torch.equal(grid.copied.flatten(), torch.cat([o.accuracy for o in one]))
    assert torch.allclose(grid.accuracy, grid.copied.mean(-1))
    assert torch.allclose(grid.scores, torch.stack([o.scores for o in one]).double().mean(0).float(), atol=1e-6)
    for i in range(2): assert torch.allclose(grid.scores_by_length[i], torch.stack([o.scores for o in one[6 * i:6 * (i + 1)]]).mean(0), atol=1e-6)
    assert grid.generated == [o.generated[0] for o in one]
    # where each task sits: length-major, then depth; the prompt grows with the haystack, the needle sits int(d * L) tokens in
    over, at = len(grid.tasks[0].ids) - 24, set()
    for i, L in enumerate((24, 40)):
        for j, d in enumerate((0.2, 0.5, 0.9)):
            for t in grid.tasks[6 * i + 2 * j:6 * i + 2 * j + 2]:
                assert len(t.ids) == L + over
                at.add(int(t.needle_pos[0]) - int(d * L))
    assert len(at) == 1                                  # the same prefix (BOS, separator, "The secret code is") everywhere
    assert torch.equal(grid.tasks[0].needle_ids, grid.tasks[2].needle_ids)

def test_teacher_forced_verdict_equals_masked_greedy_decoding(m, grid):
    heads = [(2, 1), (0, 3)]
    ts = []
    for i, t in enumerate(grid.tasks[:6]):   # answers the masked model does give, some corrupted at one step
        a = torch.tensor(greedy_zeroed(m, t.ids, len(t.answer_ids), heads))
        if i % 3 == 1: a[i % len(a)] = (a[i % len(a)] + 1) % m.config.vocab_size
        ts.append(type(t)(t.ids, t.needle_pos, t.needle_ids, a))
    ref = torch.tensor([float(greedy_zeroed(m, t.ids, len(t.answer_ids), heads) == t.answer_ids.tolist()) for t in ts])
    assert ref.tolist() == [1, 0, 1, 1, 0, 1]
    assert torch.equal(exact_copies(m, ts, head_mask_hooks(m, heads), batch_size=2), ref)
    assert exact_copies(m, ts).tolist() == [float(greedy_decode(m, t.ids, len(t.answer_ids)) == t.answer_ids.tolist()) for t in ts]

@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_mask_hooks_equal_explicit_zero_ablation(arch):
    mm = tiny_model(arch, n_layers=2, n_heads=4, seed=2)
    ids = niah_tasks(mm.tokenizer, lengths=(20,), depths=(0.5,), n_needles=2, n_digits=2)
    x = torch.stack([t.ids for t in ids])
    heads = [(1, 3), (0, 0), (1, 1)]
    hs = zeroed(mm, heads)
    with torch.no_grad(): ref = mm(x).logits
    for h in hs: h.remove()
    with torch.no_grad(), hooks(mm, head_mask_hooks(mm, heads)): got = mm(x).logits
    with torch.no_grad(): plain = mm(x).logits
    assert torch.allclose(got, ref, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)
    assert_no_hooks(mm)

def test_masking_runs_the_right_heads(m, grid):
    "Answers that only the masked model (top heads zeroed by plain hooks) gives: copied with the mask, per cell as built"
    top = [t.index for t in grid.top(2)]
    g = NIAHGrid(**{**grid.__dict__, "tasks": list(grid.tasks)})
    for i, t in enumerate(g.tasks):
        a = torch.tensor(greedy_zeroed(m, t.ids, len(t.answer_ids), top))
        if i % 2: a[0] = (a[0] + 1) % m.config.vocab_size                       # every second needle: wrong at step 0
        g.tasks[i] = type(t)(t.ids, t.needle_pos, t.needle_ids, a)
    r = mask_retrieval_heads(m, g, k=2, n_random=4, threshold=1.0, seed=3, progress=False)
    assert r.heads == top and torch.allclose(r.masked, torch.full((2, 3), 0.5)) and torch.equal(r.baseline, grid.accuracy)
    assert r.n_steps == len(g.tasks) * 6 and r.n_fail >= len(g.tasks) // 2
    assert r.looks.shape == (2, 2, 3) and float(r.looks[..., 0].nan_to_num(0).max()) <= 1
    for d, hs in enumerate(r.random_heads):                                      # each draw: its own heads, checked by plain hooks
        assert len(set(hs)) == 2 and set(hs).isdisjoint(top)
        ref = torch.tensor([float(greedy_zeroed(m, t.ids, len(t.answer_ids), hs) == t.answer_ids.tolist()) for t in g.tasks])
        assert torch.allclose(r.random[d], ref.view(2, 3, 2).mean(-1))
    again = mask_retrieval_heads(m, g, k=2, n_random=4, threshold=1.0, seed=3, progress=False)
    other = mask_retrieval_heads(m, g, k=2, n_random=4, threshold=1.0, seed=4, progress=False)
    assert again.random_heads == r.random_heads and other.random_heads != r.random_heads
    assert_no_hooks(m)

def test_random_heads_are_non_retrieval_heads(m, grid):
    s = torch.zeros(3, 4); s[0, 0], s[1, 2], s[2, 3] = 0.9, 0.5, 0.3; s[2, 0] = 0.2
    r = mask_retrieval_heads(m, grid, k=2, n_random=5, scores=s, progress=False)
    assert r.heads == [(0, 0), (1, 2)]
    for hs in r.random_heads: assert all(float(s[l, h]) <= 0.1 for l, h in hs)
    with pytest.raises(ValueError, match="too few"): mask_retrieval_heads(m, grid, k=5, scores=torch.full((3, 4), 0.5), progress=False)

def test_influence_matches_plain_losses(m):
    doms = {"<a>": influence_domains(m.tokenizer, n=2, seq_len=20)["code"], "b": influence_domains(m.tokenizer, n=3, seq_len=16)["list"]}
    heads = [(1, 2), (2, 0)]
    r = attention_influence(m, heads, doms, batch_size=2, progress=False)
    def nll(x):
        with torch.no_grad(): lo = m(x).logits.double()
        return nn.functional.cross_entropy(lo[:, :-1].transpose(1, 2), x[:, 1:], reduction="none").mean(-1)
    base = torch.cat([nll(x) for x in doms.values()])
    hs = zeroed(m, heads)
    masked = torch.cat([nll(x) for x in doms.values()])
    for h in hs: h.remove()
    assert torch.allclose(r.loss.double(), base, atol=1e-4) and torch.allclose(r.loss_masked.double(), masked, atol=1e-4)
    assert torch.allclose(r.influence.double(), (masked - base) / base, atol=1e-4)
    assert r.by_domain().texts.tolist() == [2, 3] and r.domain.tolist() == [0, 0, 1, 1, 1]
    assert "&lt;a&gt;" in r._repr_html_() and "<a>" not in r._repr_html_()
    assert_no_hooks(m)

def test_bad_input_fails_before_any_forward(m, grid):
    calls = []
    h = m.register_forward_pre_hook(lambda mod, a: calls.append(1))
    try:
        bad = [lambda: niah_grid(m, lengths=(), progress=False), lambda: niah_grid(m, lengths=(24, 24), progress=False),
               lambda: niah_grid(m, lengths=(4,), progress=False), lambda: niah_grid(m, lengths=(24,), depths=(-0.1,), progress=False),
               lambda: niah_grid(m, lengths=(24,), n_needles=0, progress=False), lambda: niah_grid(m, lengths=(24,), batch_size=0, progress=False),
               lambda: niah_grid(m, lengths=(24, 250), progress=False),
               lambda: mask_retrieval_heads(m, grid, k=0, progress=False), lambda: mask_retrieval_heads(m, grid, n_random=0, progress=False),
               lambda: mask_retrieval_heads(m, grid, scores=torch.zeros(2, 4), progress=False),
               lambda: attention_influence(m, [(0, 7)], progress=False), lambda: attention_influence(m, [(5, 0)], progress=False),
               lambda: attention_influence(m, [(0, 1)], {"x": torch.full((2, 5), 10**6)}, progress=False),
               lambda: attention_influence(m, [(0, 1)], {}, progress=False)]
        for f in bad:
            with pytest.raises((ValueError, IndexError)): f()
        with pytest.raises(ValueError, match=r"Use lengths <= \d+"): niah_grid(m, lengths=(250,), progress=False)
    finally: h.remove()
    assert calls == []

def test_results_render_and_leave_model_clean(m, grid):
    r = mask_retrieval_heads(m, grid, k=2, n_random=2, progress=False)
    page = grid._repr_html_() + r._repr_html_()
    assert page.count("hs-niah-map") == 4 and all(t.name in page for t in grid.top(5))
    assert "NIAHGrid(lengths [24, 40] x depths [0.2, 0.5, 0.9] x 2 needles" in repr(grid) and "HeadMasking(K=2" in repr(r)
    assert_no_hooks(m)
