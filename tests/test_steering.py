"""Steering vectors against independent references.

- `diff_in_means` equals a hand computation from `run_with_cache` (one prompt at a time, no padding);
- coeff 0 is bit-identical to no steering; steered logits equal a plain HF forward with a hand-written
  `register_forward_hook` on the decoder layer (resid_post) or forward pre-hook (resid_pre);
- `generate()` with the KV cache equals a no-cache loop that re-runs the whole sequence, steered each step;
- the `pos` rules pick the right positions under left padding;
- `scale_heads` equals scaling `o_proj`'s input columns by hand; zero equals zero-ablation;
- bad input says what is valid; no hook is left behind; `test_bad_inputs_probes` is one table of every entry
  point's bad inputs (NaN/inf vectors and coefficients, float labels, wrong widths, unknown hooks and `pos`,
  empty prompt lists), each refused before any forward."""
import pytest, torch
from headscope.models import tiny_model
from headscope.arch import blocks
from headscope.tokens import to_inputs
from headscope.hooking import forward, hooks
from headscope.cache import run_with_cache
from headscope.probes.steering import (SteeringVector, diff_in_means, pca_direction, steering_vector, steer, steering_hooks)
from headscope.probes.sweep import steering_sweep, SteeringSweep
from _checks import assert_no_hooks

POS, NEG = ["I love it", "great fun!", "so good"], ["I hate it", "awful", "so bad, really"]

def _vec(m, layers, seed=0, scale=1.):
    d = m.config.hidden_size if hasattr(m.config, "hidden_size") else m.config.n_embd
    return torch.randn(d, generator=torch.Generator().manual_seed(seed)) * scale

@pytest.mark.parametrize("hook", ["hook_resid_post", "hook_resid_pre"])
@pytest.mark.parametrize("pos", [-1, "mean"])
def test_diff_in_means_by_hand(hook, pos):
    m = tiny_model("llama", n_layers=3, seed=0)
    v = diff_in_means(m, POS, NEG, layers=[0, 2], hook=hook, pos=pos, batch_size=2, progress=False)
    for l in [0, 2]:
        name = f"blocks.{l}.{hook}"
        read = lambda p: (lambda a: a[0, -1] if pos == -1 else a[0].mean(0))(run_with_cache(m, p, names=[name])[name].double())
        ref = torch.stack([read(p) for p in POS]).mean(0) - torch.stack([read(p) for p in NEG]).mean(0)
        torch.testing.assert_close(v.vectors[l].double(), ref, atol=1e-5, rtol=0)

def test_pca_direction_aligned_and_scaled():
    m = tiny_model("gpt2", n_layers=2, seed=0)
    v = diff_in_means(m, POS, NEG, progress=False)
    p = pca_direction(m, POS, NEG, progress=False)
    for l in p.layers:
        u = p.vectors[l] / p.vectors[l].norm()
        assert float(u @ v.vectors[l]) > 0
        torch.testing.assert_close(p.vectors[l].norm(), u @ v.vectors[l], atol=1e-4, rtol=1e-4)

def _plain_ref(m, x, l, vec, coeff, hook):
    "A plain HF forward with a hand-written hook on decoder layer l adding coeff*vec to its output (or input)"
    if hook == "hook_resid_post":
        def f(mod, args, out):
            return (out[0] + coeff * vec,) + tuple(out[1:]) if isinstance(out, tuple) else out + coeff * vec
        h = blocks(m)[l].register_forward_hook(f)
    else:
        def f(mod, args, kwargs):
            if args: return (args[0] + coeff * vec,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + coeff * vec}
        h = blocks(m)[l].register_forward_pre_hook(f, with_kwargs=True)
    try:
        with torch.no_grad(): return forward(m, x).logits
    finally: h.remove()

@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("hook", ["hook_resid_post", "hook_resid_pre"])
def test_steered_logits_equal_plain_hf_hook(arch, hook):
    m = tiny_model(arch, n_layers=3, seed=1)
    x = to_inputs(m, ["the cat sat on the", "a dog"], padding_side="left")
    d = _vec(m, 1, seed=2)
    sv = steering_vector(d, layers=1, hook=hook)
    with torch.no_grad(): base = forward(m, x).logits
    with steer(m, sv, coeff=0.), torch.no_grad(): assert torch.equal(forward(m, x).logits, base)
    ref = _plain_ref(m, x, 1, d, 2.5, hook)
    with steer(m, sv, coeff=2.5), torch.no_grad(): got = forward(m, x).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (got - base).abs().max() > 1e-3
    assert_no_hooks(m)

def _nocache(m, x, n, **kw):
    ids, mask = x["input_ids"], x["attention_mask"]
    with steer(m, **kw), torch.no_grad():
        for _ in range(n):
            nxt = forward(m, {"input_ids": ids, "attention_mask": mask}).logits[:, -1].argmax(-1)
            ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids

@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_generate_with_kv_cache_equals_nocache_loop(arch):
    m = tiny_model(arch, n_layers=2, seed=3)
    x = to_inputs(m, ["the cat sat", "a dog ran away"], padding_side="left")
    sv = steering_vector(_vec(m, 0, seed=4, scale=4.), layers=[0, 1])
    with torch.no_grad(): plain = m.generate(**x, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    for pos in [None, "prompt", "generated", -1]:
        with steer(m, sv, pos=pos), torch.no_grad():
            got = m.generate(**x, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        if pos == -1: continue   # the cache never revisits a position: -1 steers each new token once (see the notebook)
        assert torch.equal(got, _nocache(m, x, 6, vector=sv, pos=pos)), pos
        assert not torch.equal(got, plain), pos
    assert_no_hooks(m)

def _steered_positions(m, x, pos, n_gen=0):
    "Which (row, position) got the vector: record the delta at resid_post of layer 0 against an unsteered run"
    sv = steering_vector(torch.ones(m.config.hidden_size), layers=0)
    seen = []
    rec = lambda act, hook: seen.append(act.detach().clone())
    with hooks(m, steering_hooks(m, sv, 1., pos=pos) + [("blocks.0.hook_resid_post", rec)]), torch.no_grad():
        forward(m, x)
    with hooks(m, [("blocks.0.hook_resid_post", rec)]), torch.no_grad(): forward(m, x)
    return ((seen[0] - seen[1]).abs().amax(-1) > 0.5)

def test_pos_rules_under_left_padding():
    m = tiny_model("llama", n_layers=2, seed=0)
    x = to_inputs(m, ["abcdef", "ab"], padding_side="left")     # 7 and 3 real tokens (bos), 4 pads in row 1
    T = x["input_ids"].shape[1]
    real = x["attention_mask"].bool()
    got = _steered_positions(m, x, -1)
    assert got.sum() == 2 and got[0, T - 1] and got[1, T - 1]
    got = _steered_positions(m, x, 0)                             # the first real token, after the padding
    assert got[0, 0] and got[1, 4] and got.sum() == 2
    got = _steered_positions(m, x, [0, -2])
    assert got[0].nonzero().flatten().tolist() == [0, T - 2] and got[1].nonzero().flatten().tolist() == [4, T - 2]
    assert torch.equal(_steered_positions(m, x, "prompt"), real)
    assert not _steered_positions(m, x, "generated").any()
    assert _steered_positions(m, x, None).all()

def test_prompt_and_generated_split_in_generate():
    m = tiny_model("llama", n_layers=2, seed=0)
    x = to_inputs(m, ["abcdef", "ab"], padding_side="left")
    sv = steering_vector(torch.ones(64), layers=0)
    for pos in ["prompt", "generated", None]:
        steps = []
        def rec(act, hook): steps.append((hook.state.past, act.detach().clone()))
        def rec0(act, hook): steps0.append(act.detach().clone())
        steps0 = []
        with hooks(m, [("blocks.0.hook_resid_post", rec0)]), torch.no_grad():
            m.generate(**x, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        with hooks(m, steering_hooks(m, sv, 0.25, pos=pos) + [("blocks.0.hook_resid_post", rec)]), torch.no_grad():
            m.generate(**x, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        # a tiny nudge leaves greedy tokens unchanged, so compare step by step: prefill, then one token a step
        assert len(steps) == len(steps0) == 3
        prefill = (steps[0][1] - steps0[0]).abs().amax(-1) > 0.1
        new = [(s[1] - s0).abs().amax() > 0.1 for s, s0 in zip(steps[1:], steps0[1:])]
        if pos == "prompt": assert torch.equal(prefill, x["attention_mask"].bool()) and not any(new)
        if pos == "generated": assert not prefill.any() and all(new)
        if pos is None: assert prefill.all() and all(new)

def test_errors_say_what_is_valid():
    m = tiny_model("llama", n_layers=2, seed=0)
    with pytest.raises(ValueError, match="hook_resid_post, hook_resid_pre"):
        SteeringVector({0: torch.ones(64)}, hook="hook_mlp_out")
    with pytest.raises(ValueError, match="hook_resid_post, hook_resid_pre"):
        diff_in_means(m, POS, NEG, hook="attn.hook_z", progress=False)
    with pytest.raises(IndexError, match=r"layers 0\.\.1"):
        diff_in_means(m, POS, NEG, layers=5, progress=False)
    with pytest.raises(IndexError, match=r"layers 0\.\.1"):
        with steer(m, steering_vector(torch.ones(64), layers=7)): pass
    with pytest.raises(ValueError, match="width 32, but the model's d_model is 64"):
        with steer(m, steering_vector(torch.ones(32), layers=0)): pass
    with pytest.raises(ValueError, match="no direction at layer"):
        with steer(m, steering_vector(torch.ones(64), layers=0), layers=[1]): pass
    with pytest.raises(ValueError, match="'prompt', 'generated'"):
        with steer(m, steering_vector(torch.ones(64), layers=0), pos="all"): pass
    assert_no_hooks(m)

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_scale_heads_equals_scaled_out_proj(arch):
    import copy
    from headscope.probes.steering import scale_heads
    from headscope.interventions import ablate
    m = tiny_model(arch, n_layers=2, seed=5)
    x = to_inputs(m, ["the cat sat on", "a dog"], padding_side="left")
    dh = m.config.hidden_size // m.config.num_attention_heads if arch != "gpt2" else m.config.n_embd // m.config.n_head
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        for l, h, f in [(0, 1, 0.), (1, 3, 2.5)]:
            if arch == "gpt2": m2.transformer.h[l].attn.c_proj.weight[h * dh:(h + 1) * dh, :] *= f   # Conv1D: [in out]
            else: m2.model.layers[l].self_attn.o_proj.weight[:, h * dh:(h + 1) * dh] *= f
        ref = forward(m2, x).logits
    with scale_heads(m, {(0, 1): 0., (1, 3): 2.5}), torch.no_grad(): got = forward(m, x).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with scale_heads(m, {(0, 1): 0.}), torch.no_grad(): z1 = forward(m, x).logits
    with hooks(m, [("blocks.0.attn.hook_z", ablate(head=1))]), torch.no_grad(): z2 = forward(m, x).logits
    assert torch.equal(z1, z2)
    with pytest.raises(IndexError, match=r"heads 0\.\.3"):
        with scale_heads(m, {(0, 4): 0.}): pass
    with pytest.raises(IndexError, match=r"layers 0\.\.1"):
        with scale_heads(m, {(2, 0): 0.}): pass
    assert_no_hooks(m)

def test_sweep_against_references():
    import math
    m = tiny_model("gpt2", n_layers=2, seed=0)
    d = _vec(m, 1, seed=6)
    sv = steering_vector(d, layers=1)
    text = "the quick brown fox jumps over the lazy dog"
    prompts = ["the cat", "a dog sat"]
    sw = steering_sweep(m, sv, [0, 2, 8], prompts, (["a", "e"], ["x", "z"]), text, progress=False)
    ids = to_inputs(m, text)["input_ids"]
    with torch.no_grad():
        assert abs(math.log(sw.base_perplexity) - float(m(input_ids=ids, labels=ids).loss)) < 1e-5
        # steered perplexity and KL from a plain HF forward with a hand-written hook, in float64
        ref_lp = _plain_ref(m, {"input_ids": ids}, 1, d, 8., "hook_resid_post").double().log_softmax(-1)
        base_lp = m(input_ids=ids).logits.double().log_softmax(-1)
    nll = -ref_lp[0, :-1].gather(-1, ids[0, 1:, None]).mean()
    assert abs(math.log(float(sw.perplexity[2])) - float(nll)) < 1e-4
    kl = (base_lp.exp() * (base_lp - ref_lp)).sum(-1).mean()
    assert abs(float(sw.kl[2]) - float(kl)) < 1e-4 and float(sw.kl[0]) < 1e-7
    # the word-list attribute from plain logits of each prompt alone
    tok = m.tokenizer
    a, e, xx, z = (tok.encode(w, add_special_tokens=False)[0] for w in "aexz")
    h = blocks(m)[1].register_forward_hook(lambda mod, args, out: (out[0] + 2 * d,) + tuple(out[1:]) if isinstance(out, tuple) else out + 2 * d)
    try:
        with torch.no_grad():
            ref = torch.stack([(lambda lg: (lg[a] + lg[e]) / 2 - (lg[xx] + lg[z]) / 2)(m(**to_inputs(m, p)).logits[0, -1]) for p in prompts])
    finally: h.remove()
    torch.testing.assert_close(sw.per_prompt[1], ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="single token"):
        steering_sweep(m, sv, [0], prompts, (["hello"], ["x"]), text, progress=False)
    # breakdown: the first coeff past the factor, in sweep order
    s = SteeringSweep(torch.tensor([0., 1, 2, 4]), torch.zeros(4), torch.tensor([10., 15, 25, float("nan")]), torch.zeros(4), 0., 10.)
    assert s.breakdown_coeff() == 2. and s.breakdown_coeff(1.2) == 1. and s.breakdown_coeff(3.) == 4.
    assert "<img src='data:image/png;base64," in s._repr_html_()

@pytest.mark.slow
def test_smollm2_sentiment_steering(smollm2):
    subj = ["I feel", "Today was", "This movie is", "My friend is"]
    v = diff_in_means(smollm2, [f"{s} happy" for s in subj], [f"{s} sad" for s in subj], layers=12, progress=False).normalised()
    words = ([" happy", " great", " good"], [" sad", " bad", " terrible"])
    sw = steering_sweep(smollm2, v, [-16, 0, 16], ["The meeting this morning was", "My neighbour's garden looks"], words,
                        "The capital of France is Paris.", progress=False)
    assert sw.shift[0] < -0.5 and sw.shift[2] > 0.5 and float(sw.shift[1]) == 0.
    assert sw.breakdown_coeff() is None and float(sw.kl[1]) < 1e-6

# --- bad input: one table, every entry point of probing and steering -----------------------------------------

NAN, INF = float("nan"), float("inf")
_V = lambda: steering_vector(torch.ones(64), layers=[0, 1])

def _enter(cm):
    with cm: pass

def _table():
    from headscope.probes.steering import steer_generate, scale_heads
    from headscope.probes.activations import collect_activations
    from headscope.probes.probing import train_probes
    from headscope.probes.gact import gact_fit, GACT
    from headscope.data.prompts import labelled_prompts, LabelledPrompts
    from headscope.widgets.steering import SteeringPlayground
    A, y = torch.randn(2, 10, 8), torch.tensor([0, 1] * 5)
    nan_dir = torch.ones(64); nan_dir[5] = NAN
    words, text = (["a"], ["x"]), "the quick brown fox"
    return [   # (what, call on the tiny model, the message: what was wrong and what is valid)
        ("vector with NaN", lambda m: steering_vector(nan_dir, layers=0), r"1 of 64 entries are NaN or inf.*Give finite numbers"),
        ("vector with inf", lambda m: SteeringVector({0: torch.full((64,), INF)}), r"layer 0: 64 of 64 entries are NaN or inf"),
        ("direction a string", lambda m: steering_vector("abc"), r"a direction is a tensor \(or list\) of numbers \[d_model\], not 'abc'"),
        ("direction in a dict a string", lambda m: steering_vector({0: "abc"}), r"vector at layer 0: a direction is a tensor"),
        ("layer a string", lambda m: steering_vector(torch.ones(64), layers="1"), r"real layer indices 0, 1, \.\.\., not '1'"),
        ("negative layer key", lambda m: SteeringVector({-1: torch.ones(64)}), r"real layer indices 0, 1, \.\.\., not -1"),
        ("wrong width", lambda m: _enter(steer(m, steering_vector(torch.ones(32), layers=0))), r"width 32, but the model's d_model is 64"),
        ("coeff NaN", lambda m: _enter(steer(m, _V(), coeff=NAN)), r"coeff must be finite, not nan"),
        ("coeff inf", lambda m: _enter(steer(m, _V(), coeff=INF)), r"coeff must be finite, not inf"),
        ("coeff a string", lambda m: _enter(steer(m, _V(), coeff="big")), r"coeff must be a real number such as 4 or -2.5, not 'big'"),
        ("coeff a bool", lambda m: _enter(steer(m, _V(), coeff=True)), r"coeff must be a real number"),
        ("pos unknown", lambda m: _enter(steer(m, _V(), pos="last")), r"`pos` must be None, 'prompt', 'generated', or an int"),
        ("pos a bool", lambda m: _enter(steer(m, _V(), pos=True)), r"`pos` must be None, 'prompt', 'generated', or an int"),
        ("pos an empty list", lambda m: _enter(steer(m, _V(), pos=[])), r"non-empty list of ints"),
        ("steer at an unknown hook", lambda m: steering_vector(torch.ones(64), layers=0, hook="resid_post"), r"choose one of hook_resid_post, hook_resid_pre"),
        ("head factor NaN", lambda m: _enter(scale_heads(m, {(0, 1): NAN})), r"factor of head \(0, 1\) must be finite"),
        ("generate: coeff NaN", lambda m: steer_generate(m, "hi", _V(), 0, NAN), r"coeff must be finite"),
        ("generate: pos unknown", lambda m: steer_generate(m, "hi", _V(), 0, 1., pos="middle"), r"`pos` must be None"),
        ("generate: layer a string", lambda m: steer_generate(m, "hi", _V(), "0", 1.), r"no direction at layer '0'; it has layers \[0, 1\]"),
        ("generate: max_new_tokens 0", lambda m: steer_generate(m, "hi", _V(), 0, 1., max_new_tokens=0), r"max_new_tokens must be a positive int"),
        ("diff_in_means: empty positive", lambda m: diff_in_means(m, [], NEG, progress=False), r"`positive` is empty: give a list of prompts"),
        ("diff_in_means: empty negative", lambda m: diff_in_means(m, POS, [], progress=False), r"`negative` is empty: give a list of prompts"),
        ("diff_in_means: unknown hook", lambda m: diff_in_means(m, POS, NEG, hook="resid_post", progress=False), r"choose one of hook_resid_post"),
        ("diff_in_means: marker missing", lambda m: diff_in_means(m, ["I love it", "I like it"], ["I hate it", "awful"], pos=" it", progress=False), r"marker pos=' it' is not in the negative prompt 'awful'"),
        ("pca: unpaired", lambda m: pca_direction(m, POS, NEG[:2], progress=False), r"paired lists of prompts of equal length; got 3 positive and 2"),
        ("collect: no prompts", lambda m: collect_activations(m, [], progress=False), r"No prompts given: pass a list of prompt strings"),
        ("collect: a number as prompt", lambda m: collect_activations(m, ["hi", 7], progress=False), r"prompt 1 is 7 \(int\)"),
        ("collect: unknown hook kind", lambda m: collect_activations(m, ["hi"], "resid_foo", progress=False), r"Unknown hook kind 'resid_foo'\. Known kinds: resid_pre"),
        ("collect: unknown hook name", lambda m: collect_activations(m, ["hi"], ["blocks.0.hook_foo"], progress=False), r"Unknown hook name 'blocks.0.hook_foo'\. Nearest valid names"),
        ("collect: pos a float", lambda m: collect_activations(m, ["hi"], pos=1.5, progress=False), r"pos must be an int, 'mean' or a marker string, not 1.5"),
        ("collect: pos past the end", lambda m: collect_activations(m, ["a b c d e f g", "hi"], pos=5, batch_size=1, progress=False), r"Position 5 is out of range for prompt 1 of 3 tokens"),
        ("collect: batch_size 0", lambda m: collect_activations(m, ["hi"], batch_size=0, progress=False), r"batch_size must be a positive int, not 0"),
        ("probes: float labels", lambda m: train_probes(A, y + 0.5), r"label 0 is 0.5, which would be truncated\. Round or bin"),
        ("probes: NaN labels", lambda m: train_probes(A, torch.full((10,), NAN)), r"label 0 is nan"),
        ("probes: string labels", lambda m: train_probes(A, ["a", "b"] * 5), r"integer class ids 0\.\.K-1, not strings"),
        ("probes: labels too few", lambda m: train_probes(A, y[:8]), r"There are 8 labels for 10 activations"),
        ("probes: labels 2-D", lambda m: train_probes(A, y[:, None]), r"one class id per prompt, shape \[batch\]; got shape \(10, 1\)"),
        ("probes: NaN activations", lambda m: train_probes(torch.full((2, 10, 8), NAN), y), r"acts hold NaN or inf"),
        ("probes: test_frac 0", lambda m: train_probes(A, y, test_frac=0), r"test_frac must be between 0 and 1"),
        ("probes: folds a string", lambda m: train_probes(A, y, folds="5"), r"folds must be an int >= 0"),
        ("probes: too few class names", lambda m: train_probes(A, y, classes=["a"]), r"1 class names for labels 0\.\.1"),
        ("prompts: labels of the wrong length", lambda m: LabelledPrompts(["a", "b"], torch.tensor([0]), ["x"]), r"one label per prompt: 2 prompts"),
        ("prompts: n 0", lambda m: labelled_prompts("sentiment", n=0), r"n must be None \(all\) or an int >= 2"),
        ("sweep: coeff inf", lambda m: steering_sweep(m, _V(), [0, INF], ["hi"], words, text, progress=False), r"coeffs\[1\] must be finite"),
        ("sweep: no coeffs", lambda m: steering_sweep(m, _V(), [], ["hi"], words, text, progress=False), r"`coeffs` is empty"),
        ("sweep: one coeff", lambda m: steering_sweep(m, _V(), 4, ["hi"], words, text, progress=False), r"`coeffs` must be a list of numbers"),
        ("sweep: pos unknown", lambda m: steering_sweep(m, _V(), [1.], ["hi"], words, text, pos="x", progress=False), r"`pos` must be None"),
        ("gact: no prompts", lambda m: gact_fit(m, [], "x ", "a", 0, progress=False), r"`prompts` must be a non-empty list of strings"),
        ("gact: concepts of the wrong length", lambda m: gact_fit(m, ["a b", "c d"], ["x"], "a", 0, progress=False), r"Got 1 concept prompts for 2 prompts"),
        ("gact: coeff NaN", lambda m: gact_fit(m, ["a b", "c d"], "x ", "a", 0, n_clusters=1, coeff=NAN, progress=False), r"coeff must be finite"),
        ("playground: coeff NaN", lambda m: SteeringPlayground(m, {"v": _V()}, coeff=NAN), r"coeff must be finite"),
        ("playground: not a vector", lambda m: SteeringPlayground(m, {"v": torch.ones(64)}), r"must be a SteeringVector"),
    ]

_ROWS = _table()

@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", n_layers=2, seed=0)

@pytest.mark.parametrize("call,message", [r[1:] for r in _ROWS], ids=[r[0] for r in _ROWS])
def test_bad_inputs_probes(tiny, call, message):
    "Each bad input gets an error that says what was wrong and what is valid, raised before any forward, leaving no hook behind"
    runs = []
    h = tiny.register_forward_pre_hook(lambda mod, args: runs.append(1))
    try:
        with pytest.raises((TypeError, ValueError, IndexError, KeyError), match=message): call(tiny)
    finally: h.remove()
    assert runs == [], "the error came after a forward"
    assert_no_hooks(tiny)
