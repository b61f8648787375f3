"""Safety heads (`headscope.causal.safety`): refusal metrics against plain HF forwards, the batched exact scan against
one-head ablation through `ablate_heads`, Ships against a KL recomputed from two forwards, the linear estimate against a
finite difference, and nothing left behind after errors. Tiny random models; the chapter runs SmolLM2."""
import pytest, torch
from headscope.models import tiny_model
from headscope.data.requests import HARMFUL, HARMLESS, chat_prompts
from headscope.causal.ablation import ablate_heads
from headscope.causal.safety import (refusal_mass, refusal_token_ids, is_refusal, safety_heads, ablate_top, REFUSAL_STARTS)

def _model(): return tiny_model("llama", n_layers=2, seed=0).double()

def _plain_logp(m, prompts, hook_fns=()):
    "Last-position log-probs of each prompt on its own (no padding), with plain torch forward hooks"
    out = []
    for p in prompts:
        ids = m.tokenizer(p, return_tensors="pt")["input_ids"]
        hs = [mod.register_forward_pre_hook(fn) for mod, fn in hook_fns]
        try:
            with torch.no_grad(): out.append(torch.log_softmax(m(input_ids=ids).logits[0, -1].double(), -1))
        finally:
            for h in hs: h.remove()
    return torch.stack(out)

def _zero_head(m, l, h):
    "A pre-hook on o_proj that zeroes head h's slice of its input (the head's z)"
    d = m.config.hidden_size // m.config.num_attention_heads
    def pre(mod, args):
        z = args[0].clone(); z[..., h * d:(h + 1) * d] = 0; return (z,)
    return m.model.layers[l].self_attn.o_proj, pre

def test_refusal_mass_is_the_softmax_of_a_plain_forward():
    m = _model()
    ids = refusal_token_ids(m.tokenizer)
    lp = _plain_logp(m, chat_prompts(m.tokenizer, HARMFUL[:3]))
    torch.testing.assert_close(refusal_mass(m, HARMFUL[:3]).double(), lp[:, ids].exp().sum(-1), atol=1e-6, rtol=1e-5)

def test_phrases():
    assert is_refusal("I’m sorry, but I can't help.") and is_refusal("AS AN AI model...") and not is_refusal("To wash a car, rinse it.")

def test_exact_scan_matches_one_head_ablation_and_ships_a_plain_kl():
    m = _model()
    r = safety_heads(m, HARMFUL[:3], HARMLESS[:3], mode="zero", candidates=None, progress=False)
    ids = refusal_token_ids(m.tokenizer)
    prompts = chat_prompts(m.tokenizer, HARMFUL[:3])
    clean = _plain_logp(m, prompts)
    assert not r.scores["refusal_change"].isnan().any()
    for l, h in [(0, 0), (0, 3), (1, 2)]:
        a = _plain_logp(m, prompts, [_zero_head(m, l, h)])
        change = (a[:, ids].exp().sum(-1) - clean[:, ids].exp().sum(-1)).mean()
        kl = (clean.exp() * (clean - a)).sum(-1).mean()
        assert abs(float(r.scores["refusal_change"][l, h]) - float(change)) < 1e-6
        assert abs(float(r.scores["ships"][l, h]) - float(kl)) < 1e-6
        hs = ablate_heads(m, [(l, h)], "zero")                       # the house ablation, on the harmless set
        sp = HARMLESS[:3]
        ref = float((refusal_mass(m, sp, fwd_hooks=hs) - refusal_mass(m, sp)).mean())
        assert abs(float(r.scores["harmless_change"][l, h]) - ref) < 1e-6

def test_estimate_is_the_derivative_along_the_ablation():
    m = _model()
    r = safety_heads(m, HARMFUL[:2], mode="zero", candidates=2, progress=False)
    ids, prompts = refusal_token_ids(m.tokenizer), chat_prompts(m.tokenizer, HARMFUL[:2])
    d = m.config.hidden_size // m.config.num_attention_heads
    eps = 1e-4
    for l, h in [(0, 1), (1, 3)]:
        def pre(mod, args, l=l, h=h):                                  # z_h -> (1 - eps) z_h: a step towards zero
            z = args[0].clone(); z[..., h * d:(h + 1) * d] *= 1 - eps; return (z,)
        a = _plain_logp(m, prompts, [(m.model.layers[l].self_attn.o_proj, pre)])
        c = _plain_logp(m, prompts)
        fd = float((a[:, ids].exp().sum(-1) - c[:, ids].exp().sum(-1)).mean()) / eps
        assert abs(float(r.scores["estimate"][l, h]) - fd) < 1e-4 * max(1., abs(fd)) + 1e-7
    assert int((~r.scores["refusal_change"].isnan()).sum()) == 2     # only the candidates were ablated exactly

def test_mean_ablation_matches_ablate_heads_and_top_heads_hooks():
    m = _model()
    r = safety_heads(m, HARMFUL[:3], HARMLESS[:3], mode="mean", candidates=None, progress=False)
    ref = chat_prompts(m.tokenizer, HARMFUL[:3] + HARMLESS[:3])
    (l, h), = r.circuit(1)
    hs = ablate_heads(m, [(l, h)], "mean", reference=ref, per_pos=False)
    plain = float((refusal_mass(m, HARMFUL[:3], fwd_hooks=hs) - refusal_mass(m, HARMFUL[:3])).mean())
    assert abs(float(r.scores["refusal_change"][l, h]) - plain) < 1e-6
    assert float(r.scores["refusal_change"][l, h]) == float(r.scores["refusal_change"].min())
    top = ablate_top(m, r, 2, reference=HARMFUL[:3] + HARMLESS[:3])
    assert sorted({n for n, _ in top}) == sorted({f"blocks.{l}.attn.hook_z" for l, _ in r.circuit(2)})

def _n_hooks(m): return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())

def test_nothing_left_behind_when_a_forward_raises():
    m = _model()
    before, calls, flags = _n_hooks(m), [], [p.requires_grad for p in m.parameters()]
    def boom(mod, args):
        calls.append(1)
        if len(calls) >= 3: raise RuntimeError("boom")     # 1: the gradient pass, 2: the clean record, 3: an ablated chunk
    h = m.model.layers[1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"): safety_heads(m, HARMFUL[:2], mode="zero", candidates=None, progress=False)
    finally: h.remove()
    assert _n_hooks(m) == before
    assert all("forward" not in b.__dict__ for b in m.model.layers)   # recorded blocks are not left replaying
    assert [p.requires_grad for p in m.parameters()] == flags         # the gradient pass's freeze is undone

def test_bad_input_fails_before_any_forward():
    m = _model()
    calls = []
    h = m.register_forward_pre_hook(lambda mod, a: calls.append(1))
    try:
        for kw, msg in ((dict(harmful=[]), "non-empty"), (dict(harmful=HARMFUL[:1], mode="resample"), "'mean' or 'zero'"),
                        (dict(harmful=HARMFUL[:1], candidates=0), "candidates"), (dict(harmful=HARMFUL[:1], max_tokens=True), "max_tokens"),
                        (dict(harmful=HARMFUL[:1], starts="I"), "non-empty list")):
            with pytest.raises(ValueError, match=msg): safety_heads(m, **kw, progress=False)
    finally: h.remove()
    assert not calls
