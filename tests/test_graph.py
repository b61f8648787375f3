"Attribution graphs (`headscope.sae.graph`): exact sums in float64, an independent autograd reference, pruning, hooks gone"
import pytest, torch
from headscope.models import tiny_model
from headscope.sae.core import make_sae
from headscope.sae.transcoder import transcoder_hooks
from headscope.hooking import hooks, forward
from headscope.sae.graph import attribution_graph, AttributionGraph

def _tcs(model, layers, d_sae=48, dtype="float64", skip_last=True):
    tcs = {}
    for l in layers:
        g = torch.Generator().manual_seed(10 + l)
        tc = make_sae("transcoder", model.config.hidden_size, d_sae, seed=l, hook_name=transcoder_hooks(model, l)[0], dtype=dtype,
                      skip=skip_last and l == max(layers))
        with torch.no_grad():
            tc.b_enc.normal_(0, .1, generator=g); tc.b_dec.normal_(0, .1, generator=g)
            if tc.cfg.skip: tc.W_skip.normal_(0, .05, generator=g)
        tcs[l] = tc
    return tcs

def _real_values(model, ids, tcs, graph):
    "Each target's value from a plain HF forward: the transcoder's pre-activation at its input hook; logit minus mean logit"
    got = {}
    with hooks(model, [(tc.cfg.hook_name, lambda a, h: got.__setitem__(h.name, a)) for tc in tcs.values()]), torch.no_grad():
        lg = forward(model, {"input_ids": ids}).logits[0, -1]
    t = graph.kind_mask("feature", "logit")
    v = [tcs[n["layer"]].pre(got[tcs[n["layer"]].cfg.hook_name][0, n["pos"]])[n["index"]] if n["kind"] == "feature"
         else lg[n["index"]] - lg.mean() for n in graph.nodes if n["kind"] in ("feature", "logit")]
    return t, torch.stack(v).double()

@pytest.mark.parametrize("arch,tol", [("gpt2", 1e-11), ("gpt_neox", 1e-11), ("llama", 1e-5), ("qwen3", 1e-5)])
def test_edges_sum_to_value(arch, tol):
    "target = Σ incoming edges + its bias constant (llama-family RMSNorms compute in float32, hence the looser tolerance)"
    m = tiny_model(arch, n_layers=3, d_model=32, n_heads=4, dtype=torch.float64, seed=3)
    tcs = _tcs(m, [0, 2])
    g = attribution_graph(m, "abcab", tcs, progress=False, batch_size=40)
    ids = m.tokenizer("abcab", return_tensors="pt")["input_ids"]
    t, real = _real_values(m, ids, tcs, g)
    assert (g.adjacency[t].sum(1) + g.bias[t] - real).abs().max() < tol * real.abs().max()
    assert g.kind_mask("feature").sum() > 20 and g.kind_mask("logit").sum() >= 1
    assert g.logit_ids[0] == int(forward(m, {"input_ids": ids}).logits[0, -1].argmax())
    assert not (g.bias[t] == 0).all()   # the biases do reach the targets: the constant is not trivially zero

def _reference(model, ids, tcs, targets):
    "Plain autograd: each source a leaf (input residual, feature activations, errors) in a forward with patterns and norm scales patched to their real values"
    n, rec = model.config.num_hidden_layers, {}
    fixed = ["ln_final.hook_scale"] + [f"blocks.{l}.{s}" for l in range(n) for s in ("attn.hook_pattern", "ln1.hook_scale", "ln2.hook_scale")]
    keep = lambda a, h: rec.__setitem__(h.name, a.detach().clone())
    reads = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_mlp_out" for l in range(n)] + [tc.cfg.hook_name for tc in tcs.values()]
    with hooks(model, [(nm, keep) for nm in fixed + reads]), torch.no_grad(): forward(model, {"input_ids": ids})
    X0 = rec["blocks.0.hook_resid_pre"].clone().requires_grad_()
    A, E, live = {}, {}, {}
    for l in range(n):
        out = rec[f"blocks.{l}.hook_mlp_out"]
        if l in tcs:
            tc, x = tcs[l], rec[tcs[l].cfg.hook_name]
            A[l] = tc.encode(x).detach().clone().requires_grad_()
            out = out - tc(x)
        E[l] = out.detach().clone().requires_grad_()
    def mlp(l):
        def f(act, hook):
            if l not in tcs: return E[l]
            tc = tcs[l]
            return A[l] @ tc.W_dec + tc.b_dec + (live[l] @ tc.W_skip.T if tc.cfg.skip else 0) + E[l]
        return f
    fwd = [(nm, (lambda nm: lambda a, h: rec[nm])(nm)) for nm in fixed] + [("blocks.0.hook_resid_pre", lambda a, h: X0)]
    fwd += [(tc.cfg.hook_name, (lambda l: lambda a, h: live.__setitem__(l, a))(l)) for l, tc in tcs.items()]
    fwd += [(f"blocks.{l}.hook_mlp_out", mlp(l)) for l in range(n)]
    out = []
    for kind, l, p, f in targets:
        with hooks(model, fwd), torch.enable_grad():
            lg = forward(model, {"input_ids": ids}).logits[0, -1]
            v = lg[f] - lg.mean() if kind == "logit" else tcs[l].pre(live[l][0, p])[f]
            leaves = [X0, *A.values(), *E.values()]
            gs = torch.autograd.grad(v, leaves, allow_unused=True)
        gs = [torch.zeros_like(t) if g is None else g for g, t in zip(gs, leaves)]
        gX, gA, gE = gs[0], dict(zip(A, gs[1:1 + len(A)])), dict(zip(E, gs[1 + len(A):]))
        out.append(((gX * X0)[0].sum(-1), {l: (gA[l] * A[l])[0] for l in A}, {l: (gE[l] * E[l])[0].sum(-1) for l in E}))
    return out

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_matches_autograd_reference(arch):
    m = tiny_model(arch, n_layers=3, d_model=32, n_heads=4, dtype=torch.float64, seed=4)
    tcs = _tcs(m, [0, 2])
    g = attribution_graph(m, "xyzxy", tcs, progress=False)
    ids = m.tokenizer("xyzxy", return_tensors="pt")["input_ids"]
    rows = [i for i, n in enumerate(g.nodes) if n["kind"] == "logit"][:2] + [i for i, n in enumerate(g.nodes) if n["kind"] == "feature" and n["layer"] == 2][:3]
    tg = [(g.nodes[r]["kind"], g.nodes[r]["layer"], g.nodes[r]["pos"], g.nodes[r]["index"]) for r in rows]
    for r, (tok, feat, err) in zip(rows, _reference(m, ids, tcs, tg)):
        want = torch.zeros(len(g.nodes), dtype=torch.float64)
        for s, n in enumerate(g.nodes):
            if n["kind"] == "token": want[s] = tok[n["pos"]]
            elif n["kind"] == "feature": want[s] = feat[n["layer"]][n["pos"], n["index"]]
            elif n["kind"] == "error": want[s] = err[n["layer"]][n["pos"]]
        assert torch.allclose(g.adjacency[r], want, atol=1e-10, rtol=1e-8), (g.nodes[r]["id"], (g.adjacency[r] - want).abs().max())
        assert want.abs().max() > 1e-3

def test_hooks_gone_and_errors_before_forward():
    m = tiny_model("qwen2", n_layers=2, d_model=32, n_heads=4, dtype=torch.float64)
    impl = m.config._attn_implementation
    tcs = _tcs(m, [1])
    attribution_graph(m, "hello", tcs, progress=False)
    assert m.config._attn_implementation == impl
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())
    calls = []
    h = m.register_forward_pre_hook(lambda *a: calls.append(1))
    for bad, msg in [({0: tcs[1]}, "reads"), ({}, "non-empty"), ({1: "x"}, "not a Transcoder")]:
        with pytest.raises((ValueError, TypeError), match=msg): attribution_graph(m, "hello", bad)
    with pytest.raises(ValueError, match="max_logits"): attribution_graph(m, "hello", tcs, max_logits=0)
    h.remove()
    assert not calls
    with pytest.raises(NotImplementedError, match="not frozen"): attribution_graph(tiny_model("olmo2"), "hi", tcs)

def test_max_features_folds_into_errors_and_prune():
    m = tiny_model("gpt2", n_layers=3, d_model=32, n_heads=4, dtype=torch.float64, seed=5)
    tcs = _tcs(m, [0, 1, 2])
    g = attribution_graph(m, "hello wor", tcs, progress=False, max_features=30)
    assert g.kind_mask("feature").sum() == 30
    ids = m.tokenizer("hello wor", return_tensors="pt")["input_ids"]
    t, real = _real_values(m, ids, tcs, g)
    assert (g.adjacency[t].sum(1) + g.bias[t] - real).abs().max() < 1e-10
    p = g.pruned(0.5, 0.9)
    assert isinstance(p, AttributionGraph) and len(p.nodes) < len(g.nodes)
    assert p.kind_mask("token").sum() == g.kind_mask("token").sum() and p.logit_ids == g.logit_ids
    ix = [g.node(n["id"]) for n in p.nodes]
    sub = g.adjacency[ix][:, ix]
    assert ((p.adjacency == 0) | (p.adjacency == sub)).all() and (p.adjacency != 0).sum() < (sub != 0).sum()
    kept = [n["influence"] for n in p.nodes if n["kind"] in ("feature", "error")]
    cross = min(n["influence"] for n in g.nodes if n["influence"] >= 0.5)
    assert max(kept) <= cross + 1e-12   # node pruning keeps the nodes up to (and including) the one crossing 50% cumulative influence
    top = g.top(3)
    assert top[0].score >= top[1].score >= top[2].score

@pytest.mark.slow
def test_smollm2_block(smollm2):
    "Transcoders on two SmolLM2 layers, every other MLP an error node: still exact up to float32"
    tcs = _tcs(smollm2, [3, 4], d_sae=256, dtype="float32")
    g = attribution_graph(smollm2, "The cat sat on", tcs, progress=False, max_features=60, max_logits=3)
    ids = smollm2.tokenizer("The cat sat on", return_tensors="pt")["input_ids"]
    t, real = _real_values(smollm2, ids, tcs, g)
    assert (g.adjacency[t].sum(1).double() + g.bias[t].double() - real).abs().max() < 2e-3 * real.abs().max()
    assert g.kind_mask("error").sum() >= 28 * ids.shape[1]
