"""Head census scores against independent references on every tiny architecture.

References: full attention patterns from the hook core, recomputed in float64 (`_pattern_reference`),
the sum rule of direct logit attribution against the model's own logits, and one forward per ablated
head with `ablate` against the batched ablation."""
import math, pytest, torch
from headscope.models import tiny_model, TINY_ARCHS
from headscope.arch import model_dims, arch_spec, get_module
from headscope.cache import run_with_cache
from headscope.hooking import hooks, run_with_hooks, forward
from headscope.interventions import ablate
from headscope.tokens import to_inputs
from headscope.attention import attention_pattern
from headscope.arch import head_out_weights, fold_norm
from headscope.tokens import single_token_ids
from headscope.data.needles import text_tokens, repeated_tokens, needle_tasks
from headscope.heads.stats import AttentionStats, attention_stats, stats_from_pattern, STAT_NAMES
from headscope.heads.patterns import pattern_scores, _pattern_reference, PATTERN_SCORES
from headscope.heads.retrieval import retrieval_scores, greedy_decode as _greedy
from headscope.heads.causal import head_dla, ablation_scores, _nll
from headscope.heads.census import head_census, HeadCensus
from headscope.results import Top
from _checks import assert_no_hooks

@pytest.fixture(scope="module", params=TINY_ARCHS)
def model(request): return tiny_model(request.param, n_layers=2, seed=3)

def test_pattern_scores_match_full_patterns(model):
    tok = model.tokenizer
    txt, rep = text_tokens(tok, 3, 21, seed=1), repeated_tokens(tok, 2, 9, seed=2)
    got = pattern_scores(model, txt, rep, batch_size=2, q_chunk=6, k_chunk=5, progress=False)
    ref = _pattern_reference(model, txt, rep)
    for k in PATTERN_SCORES:
        assert torch.allclose(got[k], ref[k], atol=1e-4, equal_nan=True), (k, (got[k] - ref[k]).abs().max())

@pytest.mark.parametrize("arch,kw", [("mistral", dict(sliding_window=5)), ("gemma2", dict(sliding_window=4)),
                                     ("gemma3", dict(sliding_window=4))])
def test_sliding_windows_and_softcap(arch, kw):
    "The statistics use the mask the model really uses (sliding windows) and Gemma 2's score soft-capping"
    m = tiny_model(arch, n_layers=2, **kw)
    txt, rep = text_tokens(m.tokenizer, 2, 17), repeated_tokens(m.tokenizer, 2, 8)
    got = pattern_scores(m, txt, rep, q_chunk=4, k_chunk=3, progress=False)
    ref = _pattern_reference(m, txt, rep)
    for k in PATTERN_SCORES: assert torch.allclose(got[k], ref[k], atol=1e-4, equal_nan=True), k
    assert (ref["distance_nobos"] <= kw["sliding_window"]).any()       # some layer really is windowed

def test_stats_random_masks_float64():
    "Arbitrary boolean masks (padding-like holes) and additive masks, against float64 patterns"
    torch.manual_seed(1)
    q, k = torch.randn(3, 4, 19, 8) * 3, torch.randn(3, 2, 19, 8) * 3
    keep = (torch.rand(3, 1, 19, 19) > 0.3) & torch.ones(19, 19, dtype=torch.bool).tril()
    keep[..., 0] = True
    for mask in (keep, torch.where(keep, 0., torch.finfo(torch.float32).min)):
        ref = stats_from_pattern(attention_pattern(None, q.double(), k.double(), mask if mask.dtype == torch.bool else mask.double())[0])
        got = attention_stats(q, k, mask, q_chunk=7, k_chunk=4)
        for n in STAT_NAMES:
            if n == "n_keys": assert torch.equal(got.n_keys, keep.sum(-1).expand(3, 4, 19).float()); continue
            x, y = getattr(got, n).double(), getattr(ref, n).double()
            assert torch.allclose(x, y, atol=1e-5, equal_nan=True), n

def test_dla_sums_to_the_logit(model):
    "Heads' DLA + the rest of the final residual through the frozen norm + the norm's bias = the answer's logit"
    L = model_dims(model).n_layers
    spec = arch_spec(model)
    prompts, ans = ["the cat sat", "a dog ran!"], ["x", "y"]
    dla_each = torch.stack([head_dla(model, p, a) for p, a in zip(prompts, ans)])
    x = to_inputs(model, prompts, padding_side="left")
    with torch.no_grad(): logits = forward(model, x).logits[:, -1].float()
    a = single_token_ids(model.tokenizer, ans)
    c = run_with_cache(model, x, names=[f"blocks.{l}.hook_attn_out" for l in range(L)] + [f"blocks.{L-1}.hook_resid_post"])
    final = c[f"blocks.{L-1}.hook_resid_post"][:, -1]
    norm = get_module(model, spec.ln_final)
    U = model.get_output_embeddings().weight[a].float()
    for b in range(2):
        attn = sum(c[f"blocks.{l}.hook_attn_out"][b, -1] for l in range(L))
        bias = sum(head_out_weights(model, l)[1] for l in range(L) if head_out_weights(model, l)[1] is not None and spec.attn_out == spec.attn) if spec.attn_out == spec.attn else 0
        nb = getattr(norm, "bias", None)
        total = dla_each[b].sum() + fold_norm(norm, final[b], final[b] - attn + bias) @ U[b] + (nb.float() @ U[b] if nb is not None else 0)
        cap = getattr(model.config, "final_logit_softcapping", None)
        want = logits[b, a[b]] if not cap else torch.atanh(logits[b, a[b]] / cap) * cap
        assert torch.allclose(total, want, atol=2e-4), (b, float(total), float(want))

def test_dla_logit_difference_and_errors():
    m = tiny_model("llama")
    d = head_dla(m, "the cat", "x", "y")
    assert torch.allclose(d, head_dla(m, "the cat", "x") - head_dla(m, "the cat", "y"), atol=1e-5)
    with pytest.raises(ValueError, match="single-token"): head_dla(m, "the cat", "xy")

@pytest.mark.parametrize("arch", ["qwen2", "gpt_neox"])
def test_batched_ablation_equals_one_forward_per_head(arch):
    m = tiny_model(arch, n_layers=2)
    ids = text_tokens(m.tokenizer, 2, 13)
    got = ablation_scores(m, ids, modes=("zero",), max_rows=3, progress=False)
    with torch.no_grad(): base, base_lp = _nll(m(ids).logits, ids)
    H = model_dims(m).n_heads
    for l in range(2):
        for h in range(H):
            loss, lp = _nll(run_with_hooks(m, ids, [(f"blocks.{l}.attn.hook_z", ablate(head=h))]), ids)
            assert abs(float(got["loss_zero"][l, h]) - float((loss - base).mean())) < 1e-5
            assert abs(float(got["kl_zero"][l, h]) - float((base_lp.exp() * (base_lp - lp)).sum(-1).mean())) < 1e-5
    with pytest.raises(ValueError, match="zero"): ablation_scores(m, ids, modes=("resample",), progress=False)

def test_greedy_matches_generate_and_retrieval_hits():
    "Our KV-cache decoding loop equals `generate`, and a head that puts its arg-max on the copied needle token scores"
    m = tiny_model("llama", n_layers=2)
    t = needle_tasks(m.tokenizer, n=1, haystack_len=30)[0]
    with torch.no_grad():
        ref = m.generate(t.ids[None], max_new_tokens=5, do_sample=False, pad_token_id=m.tokenizer.pad_token_id)[0, len(t.ids):]
    assert _greedy(m, t.ids, 5) == ref.tolist()
    # a task whose "needle" is whatever the model generates: the score counts arg-max hits exactly
    seen = []
    _greedy(m, t.ids, 3, on_step=lambda l, st, tok: seen.append((l, st.argmax[0, :, 0].clone(), tok)))
    l0, j, tok = seen[0]
    fake = type(t)(ids=t.ids.clone(), needle_pos=j[:1].clone(), needle_ids=torch.tensor([tok]), answer_ids=torch.tensor([tok]))
    fake.ids[j[0]] = tok
    r = retrieval_scores(m, [fake], progress=False)
    assert r.scores.shape == (2, model_dims(m).n_heads) and 0 <= float(r.scores.min()) <= float(r.scores.max()) <= 1

def test_census_leaves_model_clean():
    m = tiny_model("qwen3", n_layers=2)
    cen = head_census(m, text_tokens(m.tokenizer, 2, 12), repeated_tokens(m.tokenizer, 2, 5), retrieval=False,
                      ablation_text=text_tokens(m.tokenizer, 2, 8), progress=False)
    assert_no_hooks(m)
    assert "loss_zero" in cen.scores and "retrieval" not in cen.scores
    html = cen._repr_html_()
    assert "induction" in html and "<script>alert" not in html

def test_retrieval_and_dla_leave_model_clean():
    m = tiny_model("gemma2", n_layers=2)
    retrieval_scores(m, needle_tasks(m.tokenizer, n=1, haystack_len=20), progress=False)
    head_dla(m, "the cat", "x")
    assert_no_hooks(m)

def test_stat_names_are_the_fields():
    "One list of statistics: the kernel package's `STAT_NAMES`, in the order of `AttentionStats`' fields"
    from dataclasses import fields
    from headscope.kernels import STAT_NAMES as kernel_names
    import headscope.heads.census as old
    assert tuple(f.name for f in fields(AttentionStats)) == STAT_NAMES == kernel_names
    assert old.STAT_NAMES is STAT_NAMES and old.text_tokens is text_tokens      # names kept where they were

def test_census_is_a_score_grid():
    s = {"induction": torch.tensor([[0.1, 0.7], [0.9, 0.2]], requires_grad=True), "sink": torch.rand(2, 2)}
    cen = HeadCensus(s, n_kv_heads=1)
    assert cen.top(2, by="induction") == [Top("L1H0", pytest.approx(0.9), (1, 0)), Top("L0H1", pytest.approx(0.7), (0, 1))]
    assert cen.top("induction", 2) == cen.top(2, by="induction")           # the order written before the re-cut
    assert [t.index for t in cen.top(1, by="induction", largest=False)] == [(0, 0)]
    df = cen.to_pandas()                                                    # no autograd leaks into the table
    assert list(df.columns) == ["layer", "head", "name", "kv_head", "induction", "sink", "roles"]
    assert df["induction"].dtype == float and df.loc[2, "roles"] == "induction"
    part = HeadCensus({k: v.detach() for k, v in s.items()}, 1, index={"layer": [7, 9], "head": [0, 1]})
    assert part.heads("induction") == [(9, 0), (7, 1)] and part.top(1, by="induction")[0].name == "L9H0"

def test_heads_import_no_views_widgets_causal_or_triton():
    "Data flows one way: the head analyses load neither views, widgets, the causal family nor triton at import"
    import subprocess, sys
    code = ("import sys, headscope.heads.census, headscope.data.needles; "
            "bad = [m for m in sys.modules if m.startswith(('headscope.views', 'headscope.widgets', 'headscope.causal', 'triton', 'ipywidgets'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)

def test_census_shows_no_warnings_of_its_own(caplog):
    "headscope's own calls raise no user-visible warning: no transformers length warning, no autograd warning from to_pandas"
    import logging, warnings
    from headscope.heads.census import head_census
    m = tiny_model("llama")
    lg = logging.getLogger("transformers"); old = lg.propagate; lg.propagate = True
    try:
        with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
            warnings.simplefilter("error")
            head_census(m, retrieval=False, modes=("zero",), n_seq=2, seq_len=16, prompt="the cat", answer="x", progress=False).to_pandas()
    finally: lg.propagate = old
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ablation_chunks_across_layers_and_final_position(arch):
    "Default chunking (many heads per forward, spanning layers, blocks before the first replayed) and `final=True` equal one hooked forward per head"
    m = tiny_model(arch, n_layers=3)
    ids = text_tokens(m.tokenizer, 2, 9)
    got = ablation_scores(m, ids, modes=("zero",), max_tokens=5 * ids.numel(), progress=False)   # 5 heads per forward
    fin = ablation_scores(m, ids, modes=("zero",), final=True, progress=False)
    with torch.no_grad(): base, base_lp = _nll(m(ids).logits, ids); last = torch.log_softmax(m(ids).logits[:, -1].float(), -1)
    top = last.argmax(-1, keepdim=True)
    for l in range(3):
        for h in range(model_dims(m).n_heads):
            lg = run_with_hooks(m, ids, [(f"blocks.{l}.attn.hook_z", ablate(head=h))])
            loss, lp = _nll(lg, ids)
            assert abs(float(got["loss_zero"][l, h]) - float((loss - base).mean())) < 1e-5
            assert abs(float(got["kl_zero"][l, h]) - float((base_lp.exp() * (base_lp - lp)).sum(-1).mean())) < 1e-5
            q = torch.log_softmax(lg[:, -1].float(), -1)
            assert abs(float(fin["kl_zero"][l, h]) - float((last.exp() * (last - q)).sum(-1).mean())) < 1e-5
            assert abs(float(fin["loss_zero"][l, h]) - float((last.gather(-1, top) - q.gather(-1, top)).mean())) < 1e-5
    assert_no_hooks(m)

def test_ablation_restores_blocks_when_a_forward_raises():
    m = tiny_model("qwen2", n_layers=2)
    ids = text_tokens(m.tokenizer, 2, 8)
    calls = []
    def boom(mod, args, out):
        calls.append(1)
        if len(calls) > 1: raise RuntimeError("fault in an ablated forward")
    h = m.lm_head.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="fault"): ablation_scores(m, ids, modes=("zero",), progress=False)
    finally: h.remove()
    from headscope.arch import blocks
    assert all("forward" not in b.__dict__ for b in blocks(m))
    ref = ablation_scores(m, ids, modes=("zero",), max_rows=2, progress=False)     # and the model still computes
    assert torch.isfinite(ref["kl_zero"]).all()

def test_batched_retrieval_equals_one_task_at_a_time():
    m = tiny_model("llama", n_layers=2)
    tasks = needle_tasks(m.tokenizer, n=3, haystack_len=24, seed=3)
    r = retrieval_scores(m, tasks, progress=False)
    one = [retrieval_scores(m, [t], progress=False) for t in tasks]
    assert torch.allclose(r.scores, sum(o.scores for o in one) / 3, atol=1e-6)
    assert r.generated == [o.generated[0] for o in one] and r.accuracy.tolist() == [float(o.accuracy[0]) for o in one]
