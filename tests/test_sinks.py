"""Extreme tokens, secondary sinks and active-dormant heads against independent references on tiny models.

References: plain PyTorch hooks on the Hugging Face modules (block outputs, `v_proj`, `mlp`) and
transformers' own eager attention weights (`output_attentions`), recomputed in float64."""
import pytest, torch
from headscope.models import tiny_model
from headscope.arch import blocks, model_dims
from headscope.heads import sinks
from headscope.heads.sinks import extreme_tokens, active_dormant, default_domains
from _checks import assert_no_hooks, hook_state

def _ids(n_rows, n, seed=0): return torch.randint(3, 259, (n_rows, n), generator=torch.Generator().manual_seed(seed))

def _reference(model, ids):
    "Block outputs, MLP outputs (plain torch hooks) and float64 eager patterns of one forward"
    out, hs = {}, []
    for l, b in enumerate(blocks(model)):
        hs.append(b.register_forward_hook(lambda m, a, o, l=l: out.__setitem__(("post", l), (o[0] if isinstance(o, tuple) else o).double())))
        hs.append(b.mlp.register_forward_hook(lambda m, a, o, l=l: out.__setitem__(("mlp", l), o.double())))
        if hasattr(b, "self_attn"): hs.append(b.self_attn.v_proj.register_forward_hook(lambda m, a, o, l=l: out.__setitem__(("v", l), o.double())))
    try:
        with torch.no_grad(): att = model(ids, output_attentions=True).attentions
    finally:
        for h in hs: h.remove()
    return out, [a.double() for a in att]

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fields_match_plain_hooks_and_eager_patterns(arch):
    m = tiny_model(arch, n_layers=3, seed=2, attn_implementation="eager")
    d = model_dims(m)
    ids = _ids(3, 13)
    ref, att = _reference(m, ids)
    before = hook_state(m)                                     # transformers keeps its own output-recording hooks
    res = extreme_tokens(m, ids, batch_size=2, q_chunk=5, progress=False)      # two batches, three query chunks
    n = ids.shape[1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    for l in range(d.n_layers):
        x = ref[("post", l)]
        assert torch.allclose(res.resid_norm[:, l].double(), x.norm(dim=-1), rtol=1e-5)
        assert torch.allclose(res.resid_median[:, l].double(), x.abs().flatten(1).median(-1).values, rtol=1e-5)
        A = att[l]
        assert torch.allclose(res.sink_mass[l].double(), A[:, :, 1:, 0].mean((0, 2)), atol=1e-6)
        km = (A * (i > j)).sum(2).mean(1) / (n - 1 - torch.arange(n))
        assert torch.allclose(res.key_mass[:, l, :-1].double(), km[:, :-1], atol=1e-6)
        assert torch.allclose(res.mlp_cos[:, l].double(), torch.cosine_similarity(ref[("mlp", l)], x[:, :1], dim=-1), atol=1e-5)
        if ("v", l) in ref:                                   # llama: GQA, 4 query heads read 2 KV heads
            vn = ref[("v", l)].unflatten(-1, (d.n_kv_heads, d.d_head)).norm(dim=-1)
            want = (vn[:, 0] / vn[:, 1:].median(1).values).repeat_interleave(d.n_heads // d.n_kv_heads, 1).mean(0)
            assert torch.allclose(res.value_norm_ratio[l].double(), want, rtol=1e-5)
    assert_no_hooks(m, before)

def test_batches_and_chunks_do_not_change_anything():
    m = tiny_model("llama", n_layers=2, seed=4)
    ids = _ids(3, 11, seed=1)
    a = extreme_tokens(m, ids, batch_size=3, q_chunk=256, progress=False)
    b = extreme_tokens(m, ids, batch_size=1, q_chunk=2, progress=False)
    for f in ("resid_norm", "resid_median", "sink_mass", "value_norm_ratio", "key_mass", "mlp_cos"):
        assert torch.allclose(getattr(a, f), getattr(b, f), atol=1e-6, equal_nan=True), f

def test_massive_entries_follow_the_rule():
    "A hand-made massive embedding entry: the result's entries are exactly those above ratio x the row's median"
    m = tiny_model("llama", n_layers=2, seed=1)
    with torch.no_grad(): m.model.embed_tokens.weight[7, 3] = 3e3
    ids = torch.tensor([[7, 20, 30, 7, 40, 50], [9, 7, 21, 31, 41, 51]])
    res = extreme_tokens(m, ids, ratio=50, max_massive=1000, progress=False)
    ref, _ = _reference(m, ids)
    want = set()
    for l in range(2):
        x = ref[("post", l)]
        med = x.abs().flatten(1).median(-1).values
        want |= {(l, r, p, dd) for r, p, dd in (x.abs() > 50 * med[:, None, None]).nonzero().tolist()}
    got = {(a.layer, a.row, a.pos, a.dim) for a in res.massive}
    assert got == want and {(r, p) for _, r, p, _ in got} == {(0, 0), (0, 3), (1, 1)}
    assert set(res.massive_dims()) == {3}
    few = extreme_tokens(m, ids, ratio=50, max_massive=2, progress=False)
    assert len(few.massive) == 4 and all(abs(a.value) >= 1000 for a in few.massive)   # the two largest per layer

def test_hooks_are_gone_even_after_an_error(monkeypatch):
    m = tiny_model("llama", n_layers=2)
    extreme_tokens(m, _ids(1, 6), progress=False)
    assert_no_hooks(m)
    def boom(*a, **k): raise RuntimeError("boom")
    monkeypatch.setattr(sinks, "_column_stats", boom)
    with pytest.raises(RuntimeError, match="boom"): extreme_tokens(m, _ids(1, 6), progress=False)
    assert_no_hooks(m)

def test_bad_inputs_fail_before_any_forward():
    m = tiny_model("llama", n_layers=2)
    calls = []
    h = m.register_forward_pre_hook(lambda *a: calls.append(1))
    for kw, msg in ((dict(ids_or_text=["a b", "a much longer one"]), "different lengths"),
                    (dict(ids_or_text=torch.tensor([[4]])), "at least 2 tokens"),
                    (dict(ids_or_text=_ids(1, 300)), "at most 256 positions"),
                    (dict(ids_or_text=torch.tensor([[4, 9999]])), "outside the vocabulary"),
                    (dict(ids_or_text=_ids(1, 5), ratio=-1), "ratio must be > 0"),
                    (dict(ids_or_text=_ids(1, 5), batch_size=0), "batch_size must be")):
        with pytest.raises(ValueError, match=msg): extreme_tokens(m, progress=False, **kw)
    for doms, msg in (({"a": _ids(1, 5)}, "at least two domains"), ({"a": _ids(1, 5), "b": torch.tensor([4])}, "pos >= 2"),
                      ({"a": _ids(1, 5), "b": _ids(1, 300)}, "at most 256")):
        with pytest.raises(ValueError, match=msg): active_dormant(m, doms, progress=False)
    h.remove()
    assert not calls

def test_secondary_sinks_on_a_hand_built_result():
    m = tiny_model("llama", n_layers=2)
    res = extreme_tokens(m, _ids(2, 12), progress=False)
    res.key_mass = torch.zeros(2, 8, 12); res.mlp_cos = torch.zeros(2, 8, 12)
    res.key_mass[1, 2:6, 4] = 0.4; res.mlp_cos[1, 1, 4] = -0.5           # a 4-layer band at row 1, pos 4
    res.key_mass[0, 0:3, 2] = 0.9                                         # starts in layer 0: outside the middle layers
    res.key_mass[0, 3:7, 10] = 0.9                                        # pos 10 has one later query: skipped
    (s,) = res.secondary_sinks()
    assert (s.row, s.pos, s.start, s.end, s.mlp_layer) == (1, 4, 2, 5, 1) and abs(s.mlp_cos + 0.5) < 1e-6
    assert {(x.row, x.pos) for x in res.secondary_sinks(layers=range(8), min_queries=1)} == {(0, 2), (1, 4), (0, 10)}

def test_active_dormant_matches_eager_patterns_and_default_domains():
    m = tiny_model("gpt2", n_layers=2, seed=5, attn_implementation="eager")
    doms = {"a": _ids(3, 9, 1), "b": _ids(2, 14, 2), "c": _ids(1, 5, 3)}
    ad = active_dormant(m, doms, batch_size=2, threshold=0.05, progress=False)
    with torch.no_grad(): ref = torch.stack([torch.stack([a[:, :, 1:, 0].double().mean((0, 2)) for a in m(x, output_attentions=True).attentions]) for x in doms.values()])
    assert torch.allclose(ad.sink.double(), ref, atol=1e-5)
    sp = ref.max(0).values - ref.min(0).values
    assert [(l, h) for l, h, *_ in ad.heads()] == sorted(((l, h) for l, h in (sp > 0.05).nonzero().tolist()), key=lambda t: -sp[t])
    dd = default_domains(m.tokenizer, n_seq=2, seq_len=16)
    assert list(dd) == ["prose", "code", "repeated random"] and all(x.shape[0] == 2 for x in dd.values())
    assert len({int(x[0, 0]) for x in dd.values()}) == 1                 # every domain starts with the same first token

@pytest.mark.parametrize("arch,kw", [("mistral", dict(sliding_window=4)), ("gemma2", dict(sliding_window=4))])
def test_sliding_windows_and_softcap_under_the_models_own_attention(arch, kw):
    "Chunked columns use the mask the model really uses (sliding window) and Gemma 2's soft-capped scores"
    m = tiny_model(arch, n_layers=2, seed=6, **kw)                       # sdpa where the family has it
    eager = tiny_model(arch, n_layers=2, seed=6, attn_implementation="eager", **kw)
    ids, n = _ids(2, 11, 4), 11
    res = extreme_tokens(m, ids, q_chunk=3, progress=False)
    with torch.no_grad(): att = eager(ids, output_attentions=True).attentions
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    for l, A in enumerate(att):
        A = A.double()
        assert torch.allclose(res.key_mass[:, l, :-1].double(), ((A * (i > j)).sum(2).mean(1) / (n - 1 - torch.arange(n)))[:, :-1], atol=1e-6)
        assert torch.allclose(res.sink_mass[l].double(), A[:, :, 1:, 0].mean((0, 2)), atol=1e-6)
