"""Mixtures of experts: routing, per-expert outputs, ablating and forcing experts, census and patching on MoE models.

References, all independent of headscope's hook core:
- Hugging Face's own router logits (`output_router_logits=True`) and the router module's own choice, from plain forwards;
- the block's output in a plain forward (a PyTorch hook on the HF module), and a float64 recomputation of the
  whole MoE block from its weights, by hand, with the routing edited by hand (ablated, dropped, forced);
- HF behaviour: a model whose expert's weights are zeroed equals dropping that expert; forcing the expert the
  router already chose changes nothing;
- census pattern scores from eager attention weights (`output_attentions=True`), zero-ablation from a copy with
  the head's `o_proj` columns zeroed; patching baselines from plain forwards."""
import copy, math
import pytest, torch
from headscope.models import tiny_model
from headscope.arch import model_dims
from headscope.hooking import run_with_hooks, forward, hooks
from headscope.tokens import to_inputs
from headscope.causal.experts import expert_routing, expert_outputs, route, moe_layers
from headscope.causal.expert_edits import ablate_expert, force_expert
from _checks import assert_no_hooks

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe"]
SOFTMAX_TOPK = ["mixtral", "qwen2_moe", "olmoe"]          # routers whose rule the float64 reference writes out
PROMPTS = ["The cat sat on the mat.", "Mixtures <of> experts"]

def moe(arch, sharp=30., **kw):
    "A tiny MoE model, its routers sharpened (random routers are nearly uniform: near-ties would make float64 choices differ)"
    m = tiny_model(arch, n_layers=2, d_model=32, seed=1, **kw)
    with torch.no_grad():
        for b in m.model.layers:
            r = b.mlp.router if hasattr(b.mlp, "router") else b.mlp.gate
            r.weight.mul_(sharp)
    return m

def plain_block_io(m, x, fwd_hooks=()):
    "{l: (input, output)} of every MoE block in one forward, read with PyTorch hooks on the HF modules"
    got = {}
    with hooks(m, fwd_hooks), torch.no_grad():   # registered after headscope's hooks: sees the block's final output
        hs = [m.model.layers[l].mlp.register_forward_hook(lambda mod, a, o, l=l: got.__setitem__(l, (a[0], o))) for l in moe_layers(m)]
        try: logits = forward(m, x).logits
        finally:
            for h in hs: h.remove()
    return got, logits

# ---- float64 reference of one MoE block, written from the weights

def _expert64(ex, e, x):
    g, u = (x @ ex.gate_up_proj[e].double().T).chunk(2, -1)
    return (ex.act_fn(g) * u) @ ex.down_proj[e].double().T

def ref_block(blk, x, edit=None):
    "Float64 MoE block on `x` `[N d_model]`; `edit`: (kind, expert, rows) with kind in replace/drop/renormalise/force"
    k, norm = blk.gate.top_k, getattr(blk.gate, "norm_topk_prob", True)
    lg = x @ blk.gate.weight.double().T
    kind, e, rows = edit or (None, None, torch.zeros(len(x), dtype=torch.bool))
    if kind == "replace": lg = torch.where(rows[:, None] & (torch.arange(lg.shape[1]) == e), -math.inf, lg)
    p = lg.softmax(-1)
    w, idx = p.topk(k, dim=-1)
    if kind == "force":   # e takes the k-th slot (and its probability) where it was not chosen
        put = rows & ~(idx == e).any(-1)
        idx[put, -1] = e
    if norm: w = w / w.sum(-1, keepdim=True)
    if kind in ("drop", "renormalise"):
        gone = (idx == e) & rows[:, None]
        w2 = w.masked_fill(gone, 0)
        if kind == "renormalise": w2 = torch.where(w2.sum(-1, keepdim=True) > 0, w2 * w.sum(-1, keepdim=True) / w2.sum(-1, keepdim=True), w2)
        w = w2
    y = torch.zeros_like(x)
    for j in range(k):
        for ex in idx[:, j].unique().tolist():
            r = idx[:, j] == ex
            y[r] += w[r, j, None] * _expert64(blk.experts, ex, x[r])
    if getattr(blk, "shared_expert", None) is not None:
        s = blk.shared_expert
        h = torch.nn.functional.silu(x @ s.gate_proj.weight.double().T) * (x @ s.up_proj.weight.double().T)
        y += torch.sigmoid(x @ blk.shared_expert_gate.weight.double().T) * (h @ s.down_proj.weight.double().T)
    return y, idx

# ---- routing and per-expert outputs against plain HF

@pytest.mark.parametrize("arch", MOE)
def test_routing_matches_hf(arch):
    m = moe(arch)
    r = expert_routing(m, PROMPTS)
    assert_no_hooks(m)                                  # (the HF forward below installs transformers' own output recorders)
    x = to_inputs(m, PROMPTS)
    B, P = x["input_ids"].shape
    seen = {}
    rs = [m.model.layers[l].mlp.router if arch == "phimoe" else m.model.layers[l].mlp.gate for l in r.layers]
    hs = [g.register_forward_hook(lambda mod, a, o, l=l: seen.__setitem__(l, o)) for l, g in zip(r.layers, rs)]
    try:
        with torch.no_grad(): hf = forward(m, x, output_router_logits=True).router_logits
    finally:
        for h in hs: h.remove()
    d = model_dims(m)
    assert r.logits.shape == (B, P, 2, d.n_experts) and r.experts.shape == (B, P, 2, d.top_k)
    for i, l in enumerate(r.layers):
        assert torch.equal(r.logits[:, :, i], hf[l].reshape(B, P, -1).float())
        assert torch.equal(r.experts[:, :, i], seen[l][2].reshape(B, P, -1))
        torch.testing.assert_close(r.weights[:, :, i], seen[l][1].reshape(B, P, -1).float(), atol=1e-7, rtol=0)
    real = x["attention_mask"].bool()
    hit = torch.nn.functional.one_hot(r.experts, d.n_experts).sum(-2)[real].double()     # [tokens layer expert]
    torch.testing.assert_close(r.load.double(), hit.mean(0), atol=1e-6, rtol=0)
    p = r.logits.double().softmax(-1)
    torch.testing.assert_close(r.entropy.double(), -(p * p.log()).sum(-1), atol=1e-5, rtol=0)

@pytest.mark.parametrize("arch", MOE)
def test_expert_outputs_sum_to_the_block(arch):
    "Each chosen expert's weighted output (+ the shared expert) adds up to the HF block's output, and to a float64 recomputation"
    m = moe(arch)
    x = to_inputs(m, PROMPTS)
    io, _ = plain_block_io(m, x)
    o = expert_outputs(m, PROMPTS, pos=[0, -1, 3])
    assert o.out.shape == (2, 3, 2, 2, 32) and (o.shared is not None) == (arch == "qwen2_moe")
    for i, l in enumerate(o.layers):
        xin, y = io[l]
        torch.testing.assert_close(o.total[:, :, i], y[:, o.pos], atol=2e-6, rtol=0)
        torch.testing.assert_close(o.mlp_out[:, :, i], y[:, o.pos], atol=0, rtol=0)
        if arch in SOFTMAX_TOPK:
            blk = m.model.layers[l].mlp
            y64, idx = ref_block(blk, xin[:, o.pos].reshape(-1, 32).double())
            assert torch.equal(idx.reshape(2, 3, -1), o.experts[:, :, i])
            torch.testing.assert_close(o.total[:, :, i].double(), y64.reshape(2, 3, 32), atol=2e-6, rtol=0)
            for j in range(2):   # slot by slot: w_e E_e(x) in float64
                w = o.weights[:, :, i, j].double().reshape(-1)
                e = o.experts[:, :, i, j].reshape(-1)
                xs = xin[:, o.pos].reshape(-1, 32).double()
                want = torch.stack([w[t] * _expert64(blk.experts, int(e[t]), xs[t:t+1])[0] for t in range(len(e))])
                torch.testing.assert_close(o.out[:, :, i, j].double().reshape(-1, 32), want, atol=2e-6, rtol=0)
    torch.testing.assert_close(o.dense().sum(-2), o.out.sum(-2), atol=1e-6, rtol=0)

def test_expert_outputs_are_exact_in_float64():
    "In float64 the decomposition is exact to rounding: nothing of the block's output is left out"
    m = tiny_model("qwen2_moe", n_layers=2, d_model=32, seed=2, dtype=torch.float64)
    o = expert_outputs(m, PROMPTS)
    assert o.out.dtype == torch.float64 and o.residual < 1e-13

# ---- edits against a hand-edited float64 block

def _rows(x, pos):
    "[batch pos] True at the real-token positions `pos` (negative from each row's end), as headscope counts them"
    msk = x["attention_mask"].bool()
    real = msk.long().cumsum(-1) - 1
    n = msk.sum(-1, keepdim=True)
    want = torch.tensor(pos)
    want = torch.where(want[None] < 0, n + want[None], want[None])      # [batch k]
    return (real[..., None] == want[:, None]).any(-1) & msk

@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("kind", ["replace", "drop", "renormalise", "force"])
def test_edits_match_float64_reference(arch, kind):
    m = moe(arch)
    x = to_inputs(m, PROMPTS)
    base = expert_routing(m, PROMPTS)
    l, pos = 1, [1, -1]
    rows = _rows(x, pos)
    e = int(base.experts[rows][:, 1, 0].mode().values) if kind != "force" else int(base.experts[rows][:, 1, -1].max() + 1) % 4
    fh = force_expert(m, l, e, pos=pos) if kind == "force" else ablate_expert(m, l, e, pos=pos, mode=kind)
    io, logits = plain_block_io(m, x, fh)
    xin, y = io[l]
    blk = m.model.layers[l].mlp
    y64, idx = ref_block(blk, xin.reshape(-1, 32).double(), (kind, e, rows.reshape(-1)))
    torch.testing.assert_close(y.double(), y64.reshape(y.shape), atol=2e-6, rtol=0)
    touched = rows & (base.experts[:, :, 1] == e).any(-1) if kind != "force" else rows & ~(base.experts[:, :, 1] == e).any(-1)
    assert bool(touched.any())                              # the edit really changed some token
    # the whole model: the hooked forward equals one whose block `l` is replaced by the float64 reference
    h = blk.register_forward_hook(lambda mod, a, o: ref_block(mod, a[0].reshape(-1, 32).double(), (kind, e, rows.reshape(-1)))[0].reshape(o.shape).to(o.dtype))
    try:
        with torch.no_grad(): want = forward(m, x).logits
    finally: h.remove()
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)
    seen = expert_routing(m, PROMPTS, fwd_hooks=fh) if kind in ("replace", "force") else None
    if seen is not None: assert torch.equal(seen.experts[:, :, 1].reshape(-1, 2), idx)    # the routing headscope reports is the edited one
    assert_no_hooks(m)

def test_hf_behaviour():
    m = moe("qwen2_moe")
    x = to_inputs(m, PROMPTS)
    with torch.no_grad(): plain = forward(m, x).logits
    base = expert_routing(m, PROMPTS)
    # dropping expert 2 of layer 0 everywhere = HF's own forward with that expert's weights zeroed
    z = copy.deepcopy(m)
    with torch.no_grad(): z.model.layers[0].mlp.experts.down_proj[2].zero_()
    with torch.no_grad(): ref = forward(z, x).logits
    torch.testing.assert_close(run_with_hooks(m, x, ablate_expert(m, 0, 2, mode="drop")), ref, atol=1e-5, rtol=0)
    assert (ref - plain).abs().max() > 1e-3                   # and that is a real change
    from headscope.interventions import generate              # and through generation with a KV cache (one token per step)
    assert generate(m, PROMPTS, 6, hooks=ablate_expert(m, 0, 2, mode="drop")) == generate(z, PROMPTS, 6)
    # forcing, at each token of one prompt, the expert the router ranks first there: bit for bit nothing changes
    one = PROMPTS[0]
    r1 = expert_routing(m, one)
    same = [h for p in range(r1.experts.shape[1]) for l in (0, 1) for h in force_expert(m, l, int(r1.experts[0, p, l, 1]), pos=p)]
    with torch.no_grad(): ref1 = forward(m, to_inputs(m, one)).logits
    assert torch.equal(run_with_hooks(m, one, same), ref1)
    # Mixtral renormalises over the chosen experts: removing an expert no token chose changes nothing (up to rounding)
    mx = moe("mixtral")
    bm = expert_routing(mx, PROMPTS)
    unused = [e for e in range(4) if not bool((bm.experts[:, :, 0] == e).any())]
    if unused:
        with torch.no_grad(): pm = forward(mx, to_inputs(mx, PROMPTS)).logits
        torch.testing.assert_close(run_with_hooks(mx, PROMPTS, ablate_expert(mx, 0, unused[0])), pm, atol=1e-5, rtol=0)
    assert_no_hooks(m); assert_no_hooks(mx)

def test_errors_before_any_forward_and_no_leftovers():
    m = moe("mixtral")
    calls = []
    h = m.register_forward_pre_hook(lambda *a: calls.append(1))
    for bad, err, msg in [(lambda: ablate_expert(m, 0, 7), IndexError, "experts 0..3"),
                          (lambda: ablate_expert(m, 3, 0), IndexError, "layer 3 does not exist"),
                          (lambda: ablate_expert(m, 0, [0, 1, 2]), ValueError, "use mode='drop'"),
                          (lambda: ablate_expert(m, 0, 0, mode="mean"), ValueError, "choose one of"),
                          (lambda: force_expert(m, 0, [0, 1]), TypeError, "forces one expert"),
                          (lambda: expert_outputs(m, PROMPTS, pos=40), IndexError, "outside the prompts"),
                          (lambda: expert_routing(tiny_model("llama"), "hi"), ValueError, "no mixture-of-experts layer"),
                          (lambda: expert_routing(m, "hi", layers=[0, 5]), IndexError, "layer 5 does not exist")]:
        with pytest.raises(err, match=msg): bad()
    assert not calls
    h.remove()
    def boom(a, hk): raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        expert_routing(m, PROMPTS, fwd_hooks=ablate_expert(m, 0, 1, mode="drop") + [("blocks.1.hook_mlp_out", boom)])
    assert_no_hooks(m)
    html = expert_routing(m, ["<script>alert(1)</script>"])._repr_html_()
    assert "<script" not in html and "&lt;" in html
    assert "hs-expert-outputs" in expert_outputs(m, "hi", pos=-1)._repr_html_()

# ---- census and patching run on MoE models

@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_census_on_moe_agrees_with_eager_hf(arch):
    from headscope.heads.census import head_census
    from headscope.heads.causal import _nll
    from headscope.data.needles import text_tokens, repeated_tokens
    m = moe(arch)
    eager = moe(arch, attn_implementation="eager")
    tok = m.tokenizer
    txt, rep, abl = text_tokens(tok, 2, 12, seed=1), repeated_tokens(tok, 2, 5, seed=2), text_tokens(tok, 2, 10, seed=3)
    cen = head_census(m, txt, rep, ablation_text=abl, retrieval=False, modes=("zero",), ablation_dtype=None,
                      gradient_samples=None, sinks=False, progress=False)
    with torch.no_grad():
        at = forward(eager, {"input_ids": txt}, output_attentions=True).attentions          # per layer [batch head q k]
        ar = forward(eager, {"input_ids": rep}, output_attentions=True).attentions
    T = (rep.shape[1] - 1) // 2
    for l in range(2):
        a, q = at[l].double(), torch.arange(1, txt.shape[1])
        torch.testing.assert_close(cen["prev_token"][l].double(), a[:, :, q, q - 1].mean((0, 2)), atol=1e-5, rtol=0)
        torch.testing.assert_close(cen["sink"][l].double(), a[:, :, q, 0].mean((0, 2)), atol=1e-5, rtol=0)
        i = torch.arange(1 + T, rep.shape[1])
        torch.testing.assert_close(cen["induction"][l].double(), ar[l].double()[:, :, i, i - T + 1].mean((0, 2)), atol=1e-5, rtol=0)
    # zero-ablating head (1, 2) = a copy with that head's columns of o_proj zeroed
    with torch.no_grad():
        base, _ = _nll(forward(m, {"input_ids": abl}).logits, abl)
        z = copy.deepcopy(m); d = model_dims(m).d_head
        z.model.layers[1].self_attn.o_proj.weight[:, 2 * d:3 * d] = 0
        loss, _ = _nll(forward(z, {"input_ids": abl}).logits, abl)
    assert abs(float(cen["loss_zero"][1, 2]) - float((loss - base).mean())) < 1e-5
    assert_no_hooks(m)

@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_patching_on_moe(arch):
    from headscope.causal.patching import activation_patching
    from headscope.causal.reference import naive_patching
    from headscope.causal.metrics import logit_diff
    m = moe(arch)
    g = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(3, 200, (2, 6), generator=g), torch.randint(3, 200, (2, 6), generator=g)
    metric = lambda lg: logit_diff(lg, 5, 6)
    with torch.no_grad():
        mc, mk = metric(m(input_ids=clean).logits[:, -1]).mean(), metric(m(input_ids=corrupt).logits[:, -1]).mean()
    # everything from the clean run (the whole residual entering layer 0) -> the clean metric; nothing -> the corrupted one
    full = activation_patching(m, clean, corrupt, metric, "resid_pre", None, layers=[0], progress=False)
    assert abs(float(full.raw[0]) - float(mc)) < 1e-5 and abs(full.clean - float(mc)) < 1e-5 and abs(full.corrupt - float(mk)) < 1e-5
    with torch.no_grad(): nothing = metric(run_with_hooks(m, corrupt, [])[:, -1]).mean()
    assert abs(float(nothing) - float(mk)) < 1e-6
    for kind, pos in [("mlp_out", "each"), ("z", -1)]:                 # restoring an MoE block's output, and heads
        got = activation_patching(m, clean, corrupt, metric, kind, pos, progress=False)
        torch.testing.assert_close(got.raw, naive_patching(m, clean, corrupt, metric, kind, pos), atol=1e-4, rtol=0)
    assert_no_hooks(m)
