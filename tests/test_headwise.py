"""Per-head discrete SAEs (P15): codes against a float64 recomputation, training, checkpoints, and the code circuit on a toy whose answer is known"""
import json, math
import pytest
import torch
from headscope.models import tiny_model
from headscope.sae.headwise import (HeadwiseConfig, HeadwiseDiscreteSAE, make_headwise, save_headwise, load_headwise, headwise_activations,
                                    head_codes, train_headwise, sae_code_circuit, precision_recall, CodeCircuit, CODE_SCORES, _scores)


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

def _o_proj_inputs(model, ids):
    "Every layer's `o_proj` input (all heads' z side by side), read with plain PyTorch hooks: `[batch pos layer head d_head]`"
    seen, L = {}, model.config.num_hidden_layers
    hs = [model.model.layers[l].self_attn.o_proj.register_forward_pre_hook(lambda m, a, l=l: seen.__setitem__(l, a[0].detach()))
          for l in range(L)]
    try:
        with torch.no_grad(): model(ids)
    finally:
        for h in hs: h.remove()
    H, d = model.config.num_attention_heads, model.config.head_dim
    return torch.stack([seen[l].view(*ids.shape, H, d) for l in range(L)], 2)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_codes_are_the_float64_argmax(arch):
    model = tiny_model(arch, n_layers=3, n_heads=4, seed=1)
    sae = make_headwise(model, layers=[0, 2], d_sae=12, k=3, seed=2)
    with torch.no_grad(): sae.b_enc.normal_(0, 0.3); sae.b_dec.normal_(0, 0.3)
    ids = torch.randint(3, 250, (3, 9), generator=torch.Generator().manual_seed(0))
    got = head_codes(model, sae, ids)
    assert got.shape == (3, 9, 2, 4) and _no_hooks(model)
    z = _o_proj_inputs(model, ids)[:, :, [0, 2]].double()
    pre = torch.einsum('bplhd,lhdm->bplhm', z - sae.b_dec.double(), sae.W_enc.double()) + sae.b_enc.double()
    top2 = pre.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-4          # away from near ties, float32 and float64 pick the same latent
    assert clear.float().mean() > 0.95
    assert torch.equal(got[clear], pre.argmax(-1)[clear])
    # left padding: -1 before a shorter prompt, and the real tokens keep the codes they have unpadded
    both = head_codes(model, sae, ["abcdef", "xyz"])
    assert (both[1, :3] == -1).all() and (both[1, 3:] >= 0).all()
    assert torch.equal(both[1, 3:], head_codes(model, sae, "xyz")[0])


def test_hooks_removed_when_a_forward_raises():
    model = tiny_model("llama", n_layers=2, n_heads=4)
    sae = make_headwise(model, [0, 1], d_sae=4)
    def boom(*a, **k): raise RuntimeError("boom")
    model.model.layers[0].mlp.forward = boom
    with pytest.raises(RuntimeError, match="boom"): head_codes(model, sae, ["some text"])
    assert _no_hooks(model)


def test_training_lowers_reconstruction_error():
    model = tiny_model("llama", n_layers=2, n_heads=4, seed=0)
    z = headwise_activations(model, torch.randint(3, 250, (48, 16), generator=torch.Generator().manual_seed(0)), [0, 1], progress=False)
    assert z.shape == (48 * 16, 2, 4, 16)
    ref = _o_proj_inputs(model, torch.randint(3, 250, (48, 16), generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(z, ref.flatten(0, 1).float())                     # the rows are every head's real z
    sae = make_headwise(model, [0, 1], d_sae=16, seed=0)
    with torch.no_grad(): before = sae.loss(z)['mse']                            # [layer head]
    log = train_headwise(sae, z, n_steps=60, batch_size=256, progress=False)
    with torch.no_grad(): after = sae.loss(z)['mse']
    sae.zero_grad()
    assert (after < 0.8 * before).all(), (before, after)
    assert log.history[-1]['fvu'] < log.history[0]['fvu'] and log.history[-1]['dead_frac'] < 0.5
    assert not sae.training and torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(()), atol=1e-5)
    # the heads share nothing: head (1, 2)'s error moves only head (1, 2)'s weights
    sae.loss(z)['mse'][1, 2].backward()
    for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
        moved = p.grad.flatten(2).abs().sum(-1) > 0                               # [layer head]
        assert moved[1, 2] and moved.sum() == 1
    with pytest.raises(ValueError, match=r"\[n layer head d_head\]"): train_headwise(sae, z[:, :1])
    with pytest.raises(ValueError, match="NaN"): train_headwise(sae, z.clone().index_fill_(0, torch.tensor([0]), float('nan')))
    with pytest.raises(ValueError, match="positive ints"): train_headwise(sae, z, n_steps=0)


def test_save_load_round_trip(tmp_path):
    model = tiny_model("llama", n_layers=2, n_heads=4)
    sae = make_headwise(model, [1], d_sae=8, k=2, seed=3)
    with torch.no_grad(): sae.b_enc.normal_()
    save_headwise(sae, tmp_path/"hw")
    cfg = json.loads((tmp_path/"hw"/"cfg.json").read_text())
    assert cfg["architecture"] == "headwise_topk" and cfg["hook_names"] == ["blocks.1.attn.hook_z"]
    back = load_headwise(tmp_path/"hw")
    assert back.cfg == sae.cfg and not back.training
    for k, v in sae.state_dict().items(): assert torch.equal(back.state_dict()[k], v)
    ids = torch.randint(3, 250, (2, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(head_codes(model, back, ids), head_codes(model, sae, ids))
    # what it refuses
    with pytest.raises(FileNotFoundError): load_headwise(tmp_path/"nothing")
    for d in ("small", "other"): save_headwise(make_headwise(model, [1], d_sae=4), tmp_path/d)
    (tmp_path/"small"/"sae_weights.safetensors").replace(tmp_path/"hw"/"sae_weights.safetensors")
    with pytest.raises(ValueError, match="does not fit cfg.json"): load_headwise(tmp_path/"hw")
    (tmp_path/"other"/"cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 4, "d_sae": 8}))
    with pytest.raises(ValueError, match="not a headwise SAE"): load_headwise(tmp_path/"other")


def test_config_refuses_bad_sizes():
    with pytest.raises(ValueError, match="distinct"): HeadwiseConfig([0, 0], 4, 16)
    with pytest.raises(ValueError, match="d_sae"): HeadwiseConfig([0], 4, 16, d_sae=0)
    with pytest.raises(ValueError, match="k=3"): HeadwiseConfig([0], 4, 16, d_sae=2, k=3)
    with pytest.raises(ValueError, match="dtype"): HeadwiseConfig([0], 4, 16, dtype="int8")


def test_scores_by_hand():
    c = torch.tensor([0, 0, 1, 3]).view(4, 1, 1)    # clean codes of one head
    q = torch.tensor([1, 2, 1, 2]).view(4, 1, 1)    # its corrupted codes
    assert _scores(c, q, 4, 'unique').item() == pytest.approx(3 / 4)    # 0, 0, 3 never appear corrupted
    assert _scores(c, q, 4, 'changed').item() == pytest.approx(3 / 4)   # pair 2 keeps code 1
    p, r = [.5, .25, 0, .25], [0, .5, .5, 0]
    m = [(a + b) / 2 for a, b in zip(p, r)]
    kl = lambda a: sum(x * math.log2(x / y) for x, y in zip(a, m) if x > 0)
    assert _scores(c, q, 4, 'js').item() == pytest.approx((kl(p) + kl(r)) / 2)
    assert _scores(c, c, 4, 'js').item() == 0 and _scores(c, c, 4, 'changed').item() == 0


def one_head_toy(h_star, a=40, b=41, seed=0):
    "One layer in which only head `h_star` can tell token a from token b: they mirror each other along u, and every other head's q, k, v ignore u"
    m = tiny_model("llama", seed=seed, n_layers=1, n_heads=4, n_kv_heads=4, dtype=torch.float64)
    with torch.no_grad():
        E = m.model.embed_tokens.weight
        u = torch.randn(E.shape[1], generator=torch.Generator().manual_seed(seed), dtype=E.dtype); u /= u.norm()
        c, s = E[a] - (E[a] @ u) * u, 4 * E[a].norm()
        E[a], E[b] = c + s * u, c - s * u                          # one norm: RMSNorm scales both alike
        v = u * m.model.layers[0].input_layernorm.weight; v /= v.norm()
        at, dh = m.model.layers[0].self_attn, m.config.head_dim
        for p in (at.q_proj, at.k_proj, at.v_proj):
            for h in set(range(4)) - {h_star}: W = p.weight[h * dh:(h + 1) * dh]; W -= (W @ v)[:, None] * v
    return m

def _template(fill, tok):
    ids = torch.randint(50, 200, (1, 8), generator=torch.Generator().manual_seed(0)).repeat(len(fill), 1)
    ids[:, 6], ids[:, 3] = fill, tok
    return ids


@pytest.mark.parametrize("h_star", [1, 3])
def test_code_circuit_finds_the_only_head_that_can_differ(h_star):
    toy, g = one_head_toy(h_star), torch.Generator().manual_seed(1)
    f = torch.randint(50, 54, (16,), generator=g)                               # four fillers: the a/b difference dominates head h_star
    clean, corrupt = _template(f, 40), _template(f, 41)
    dz = (_o_proj_inputs(toy, clean) - _o_proj_inputs(toy, corrupt))[:, -1, 0].abs().amax(dim=(0, 2))
    assert dz[h_star] > 1e-2 and (dz[[h for h in range(4) if h != h_star]] < 1e-6).all()   # the construction holds
    tr = torch.cat([_template(torch.randint(50, 54, (64,), generator=g), t) for t in (40, 41)] + [torch.randint(50, 200, (64, 8), generator=g)])
    sae = make_headwise(toy, [0], d_sae=16)
    train_headwise(sae, headwise_activations(toy, tr, [0], progress=False), n_steps=100, batch_size=256, progress=False)
    cc = sae_code_circuit(toy, sae, clean, corrupt)
    assert isinstance(cc, CodeCircuit) and cc.clean_codes.shape == (16, 1, 4)
    others = [h for h in range(4) if h != h_star]
    for s in CODE_SCORES:
        r = cc.rescored(s)
        assert r.circuit(1) == [f"L0H{h_star}"] and r.scores[0, h_star] > 0.3, (s, r.scores)
        assert (r.scores[0, others] == 0).all()
    pr = cc.precision_recall([f"L0H{h_star}"])
    assert (pr["precision"], pr["recall"], pr["chance_precision"]) == (1.0, 1.0, 0.25)
    df = cc.to_pandas()
    assert list(df["name"]) == [f"L0H{h}" for h in range(4)] and cc.top(1)[0].index == (0, h_star)


def test_code_circuit_names_real_layers_and_refuses_bad_input_before_a_forward():
    model = tiny_model("llama", n_layers=3, n_heads=4)
    sae = make_headwise(model, [2], d_sae=4)
    calls = []
    hook = model.register_forward_pre_hook(lambda *a, **k: calls.append(1))
    try:
        for kw, err in ((dict(score="kl"), "valid: 'unique'"), (dict(pos=9), "outside"), (dict(pos=True), "an int")):
            with pytest.raises((ValueError, IndexError, TypeError), match=err): sae_code_circuit(model, sae, ["abcdef"], ["abcdeg"], **kw)
        with pytest.raises(ValueError, match="compares pairs"): sae_code_circuit(model, sae, ["abc", "abd"], ["abe"])
        with pytest.raises(ValueError, match="falls on padding"): sae_code_circuit(model, sae, ["abcdef", "ab"], ["abcdeg", "ac"], pos=0)
        with pytest.raises(ValueError, match="made for this model"): sae_code_circuit(tiny_model("llama", n_layers=2, n_heads=4), sae, ["a"], ["b"])
        with pytest.raises(TypeError, match="HeadwiseDiscreteSAE"): sae_code_circuit(model, object(), ["a"], ["b"])
        assert not calls
    finally: hook.remove()
    cc = sae_code_circuit(model, sae, ["abcdef", "ab"], ["abcdeg", "ac"], score="unique")
    assert cc.universe() == [f"L2H{h}" for h in range(4)] and all(t.name.startswith("L2H") for t in cc.top(4))
    assert precision_recall(["L2H0"], ["L2H0", "L0H1"], cc.universe())["n_reference"] == 1
    with pytest.raises(ValueError, match="not among"): precision_recall(["L0H0"], [], cc.universe())
