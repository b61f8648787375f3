"""Masked-LM lens and DLA at a mask (headscope.causal.mlm), fill-mask pairs (headscope.data.fillmask): against plain HF
forwards and an independent float64 recomputation of each component's direct path through the real modules."""
import pytest
import torch
import transformers
from headscope.causal.mlm import mlm_lens, mlm_dla, mlm_head

from headscope.data.fillmask import word_tokenizer, fill_mask_words, fill_mask_pairs, fill_mask_batch
from headscope.causal.patching import activation_patching

ARCHS = ("bert", "roberta", "distilbert", "modernbert")
TOK = word_tokenizer(fill_mask_words() + "the cat dog sat on mat ran to park a red blue big small".split())
PROMPTS = ["the cat [MASK] on the mat", "a big dog [MASK] to the park"]
_LAYERS = {   # the reference's own map of the real modules: (blocks, embeddings, attention output projection, post-attention norm, MLP output projection, output norm)
    "bert":       ("bert.encoder.layer", "bert.embeddings", "attention.output.dense", "attention.output.LayerNorm", "output.dense", "output.LayerNorm"),
    "roberta":    ("roberta.encoder.layer", "roberta.embeddings", "attention.output.dense", "attention.output.LayerNorm", "output.dense", "output.LayerNorm"),
    "distilbert": ("distilbert.transformer.layer", "distilbert.embeddings", "attention.out_lin", "sa_layer_norm", "ffn.lin2", "output_layer_norm"),
    "modernbert": ("model.layers", "model.embeddings", "attn.Wo", None, "mlp.Wo", None),
}
_get = lambda m, path: m.get_submodule(path)

def _encoder(arch, seed=0, L=2):
    kw = dict(vocab_size=len(TOK), hidden_size=32, num_hidden_layers=L, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64, pad_token_id=0, initializer_range=0.2)
    if arch == "distilbert": kw = dict(vocab_size=len(TOK), max_position_embeddings=64, pad_token_id=0, dim=32, hidden_dim=64, n_layers=L, n_heads=4, initializer_range=0.2)
    if arch == "modernbert": kw.update(cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3, global_attn_every_n_layers=2,
                                      local_attention=4, norm_bias=True, classifier_bias=True)
    cfg = getattr(transformers, dict(bert="BertConfig", roberta="RobertaConfig", distilbert="DistilBertConfig", modernbert="ModernBertConfig")[arch])(**kw)
    torch.manual_seed(seed)
    m = transformers.AutoModelForMaskedLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():   # give norms and biases values an initialisation would not
        for n, p in m.named_parameters():
            if "norm" in n.lower() or "bias" in n: p.add_(torch.randn_like(p) * 0.3)
    m.tokenizer = TOK
    return m

@pytest.fixture(scope="module")
def encoders(): return {a: _encoder(a, L=3) for a in ARCHS}

def _hf(m, prompts, dtype=None):
    x = TOK(prompts, return_tensors="pt", padding=True)
    with torch.no_grad(): return m(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits

def _direct_path(m, prompt, pos, layer, head, a_id, w_id):
    """Reference: logit difference lost when head (layer, head)'s write is removed at `pos` only, with every LayerNorm's scale, the
    MLM head's activation gate, and every later attention and MLP output at `pos` frozen at the real run (float64, real HF modules)."""
    m = m.double()
    lay, emb, o, n1, mo, n2 = _LAYERS[m.config.model_type]
    blocks, hd = _get(m, lay), mlm_head(m)
    norms = [mod for mod in m.modules() if isinstance(mod, torch.nn.LayerNorm)]
    ids = TOK(prompt, return_tensors="pt")["input_ids"]
    real, hs = {}, []
    def rec(key, inp=False):
        def f(mod, args, out): real[key] = (args[0] if inp else out).detach().clone()
        return f
    for i, nm in enumerate(norms): hs.append(nm.register_forward_hook(rec(("norm", i), True)))
    for l, b in enumerate(blocks):
        hs.append(_get(b, o).register_forward_hook(rec(("o", l)))); hs.append(_get(b, o).register_forward_hook(rec(("z", l), True)))
        hs.append(_get(b, mo).register_forward_hook(rec(("m", l))))
    hs.append(hd.dense.register_forward_hook(rec("u")))
    with torch.no_grad(): base = m(input_ids=ids).logits[0, pos]
    for h in hs: h.remove()
    hs = []
    def frozen_norm(i):
        def f(mod, args, out):
            x, xr = args[0], real[("norm", i)]
            c = x - x.mean(-1, keepdim=True)
            s = (xr.var(-1, unbiased=False, keepdim=True) + mod.eps).sqrt()
            return c / s * mod.weight + (mod.bias if mod.bias is not None else 0)
        return f
    for i, nm in enumerate(norms): hs.append(nm.register_forward_hook(frozen_norm(i)))
    u = real["u"]; g = hd.act(u) / u                                        # the head's gate at the real run
    def set_at(key, l, minus=None):
        def f(mod, args, out):
            out = out.clone()
            if minus is None: out[:, pos] = real[(key, l)][:, pos]
            else: out[:, pos] = out[:, pos] - minus
            return out
        return f
    H = real[("z", 0)].shape[-1] // 8
    W = _get(blocks[layer], o).weight.view(-1, H, 8)[:, head]                 # [d_model d_head]
    write = real[("z", layer)][0, pos].view(H, 8)[head] @ W.T                 # the head's write at pos
    for l, b in enumerate(blocks):
        if l == layer: hs.append(_get(b, o).register_forward_hook(set_at("o", l, write)))
        elif l > layer: hs.append(_get(b, o).register_forward_hook(set_at("o", l)))
        if l >= layer: hs.append(_get(b, mo).register_forward_hook(set_at("m", l)))
    dense_out = {}                                                           # the head's activation as the diagonal map u -> g ⊙ u
    hs.append(hd.dense.register_forward_hook(lambda mod, args, out: dense_out.__setitem__("u", out)))
    hs.append(hd.norm.register_forward_pre_hook(lambda mod, args: (g * dense_out["u"],)))
    try:
        with torch.no_grad(): abl = m(input_ids=ids).logits[0, pos]
    finally:
        for h in hs: h.remove()
        m.float()
    return float((base[a_id] - base[w_id]) - (abl[a_id] - abl[w_id]))

@pytest.mark.parametrize("arch", ARCHS)
def test_lens_last_row_is_the_model_output(encoders, arch):
    m = encoders[arch]
    ll = mlm_lens(m, "the [MASK] sat on [MASK]", targets=["cat", "mat"])
    lg = _hf(m, "the [MASK] sat on [MASK]")[0, ll.positions]
    torch.testing.assert_close(ll.logits[-1], lg, atol=1e-5, rtol=0)
    torch.testing.assert_close(ll.target_ranks[-1], (lg > lg.gather(-1, ll.target_ids[:, None])).sum(-1))
    assert len(ll.labels) == 4 and ll.positions == [2, 5]

@pytest.mark.parametrize("arch", ARCHS)
def test_dla_parts_sum_to_the_logit_difference(encoders, arch):
    m = encoders[arch]
    r = mlm_dla(m, PROMPTS, "sat", "ran")
    lg = _hf(m, PROMPTS)[[0, 1], [3, 4]]
    a, w = TOK.convert_tokens_to_ids(["sat", "ran"])
    torch.testing.assert_close(r.total, lg[:, a] - lg[:, w], atol=1e-5, rtol=0)
    parts = r.embed + r.heads.sum((1, 2)) + r.attn_bias.sum(1) + r.mlps.sum(1) + r.ln_bias.sum((1, 2)) + r.norm_bias + r.head_bias + r.unembed_bias
    torch.testing.assert_close(parts, lg[:, a] - lg[:, w], atol=1e-5, rtol=0)
    assert float(r.heads.abs().sum()) > 1e-3   # not a split that gives everything to the biases

@pytest.mark.parametrize("arch", ARCHS)
def test_dla_head_equals_its_frozen_direct_path(encoders, arch):
    m = encoders[arch]
    a, w = TOK.convert_tokens_to_ids(["sat", "ran"])
    r = mlm_dla(m, PROMPTS[0], "sat", "ran")
    for l, h in ((0, 1), (2, 3)):
        ref = _direct_path(m, PROMPTS[0], 3, l, h, a, w)
        assert abs(float(r.heads[0, l, h]) - ref) < 1e-5, (arch, l, h, float(r.heads[0, l, h]), ref)

def _toy(steps=120, seed=0):
    "A tiny BERT trained on the capitals task (clean prompts, and the same cut after the mask)"
    tok = word_tokenizer(fill_mask_words())
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=32, pad_token_id=tok.pad_token_id)
    m = transformers.AutoModelForMaskedLM.from_config(cfg, attn_implementation="eager")
    b, opt = fill_mask_batch(tok, upto_mask=True), torch.optim.AdamW(m.parameters(), 3e-3)
    m.train()
    for _ in range(steps):
        loss = m(**b).loss; opt.zero_grad(); loss.backward(); opt.step()
    m.eval(); m.tokenizer = tok
    return m, tok

@pytest.fixture(scope="module")
def toy(): return _toy()

def test_toy_learns_the_facts_and_lens_dla_see_it(toy):
    m, tok = toy
    pairs = fill_mask_pairs(tok)
    ev = pairs.evaluate(m)
    assert ev["clean"]["top1"] == 1.0 and ev["corrupt"]["logit_diff_positive"] == 0.0
    ll = mlm_lens(m, pairs.clean[0], targets=tok.convert_ids_to_tokens(int(pairs.correct[0])))
    assert int(ll.target_ranks[-1, 0]) == 0 and int(ll.target_ranks[0, 0]) > 0   # known at the end, not from the embeddings alone
    d = mlm_dla(m, pairs.clean, pairs.correct, pairs.wrong)
    assert abs(float(d.total.mean()) - ev["clean"]["logit_diff"]) < 1e-4
    assert float(d.heads.sum((1, 2)).mean()) > 0.5 * float(d.total.mean())   # the subject reaches the mask through attention

def test_patching_a_fill_mask_task_reads_the_mask(toy):
    m, tok = toy
    pairs = fill_mask_pairs(tok)
    clean, corrupt = pairs.token_ids(tok)                    # full prompts; the metric reads the mask (`metric_pos`)
    mp = pairs.mask_pos % clean.shape[1]
    r = activation_patching(m, clean, corrupt, pairs.logit_diff(), kind="resid_pre", pos="each", metric_pos=mp, progress=False)
    f = pairs.logit_diff()
    with torch.no_grad(): lc, lk = m(input_ids=clean).logits, m(input_ids=corrupt).logits
    assert abs(r.clean - float(f(lc).mean())) < 1e-5 and abs(r.corrupt - float(f(lk).mean())) < 1e-5
    assert abs(r.clean - r.corrupt) > 5
    subj = int((clean != corrupt).any(0).nonzero()[0])
    others = [p for p in range(clean.shape[1]) if p != subj]
    torch.testing.assert_close(r.scores[0, subj], torch.tensor(1.0), atol=1e-5, rtol=0)   # patch the only difference: everything comes back
    torch.testing.assert_close(r.scores[0, others], torch.zeros(len(others)), atol=1e-5, rtol=0)   # patch nothing that differs: corrupted
    rz = activation_patching(m, clean, corrupt, pairs.logit_diff(), kind="z", pos=mp, metric_pos=mp, progress=False)
    assert rz.scores.shape == (2, 4) and bool(torch.isfinite(rz.scores).all())

def test_decoder_lens_and_dla_refuse_encoders():
    "logit_lens / direct_logit_attribution would skip the MLM head's dense + GELU: they refuse, naming mlm_lens / mlm_dla"
    from headscope.causal.lens import logit_lens
    from headscope.causal.dla import direct_logit_attribution
    from headscope.tiny_encoders import tiny_encoder
    e = tiny_encoder("bert")
    with pytest.raises(ValueError, match="mlm_lens"): logit_lens(e, "hi")
    with pytest.raises(ValueError, match="mlm_dla"): direct_logit_attribution(e, "hi", 65)

def test_sink_and_pattern_scores_run_on_encoders():
    "Run on bidirectional patterns; the full-pattern reference sees keys after the query (what the streaming path must match once fixed)"
    from headscope.tiny_encoders import tiny_encoder
    from headscope.heads.patterns import pattern_scores, _pattern_reference
    from headscope.heads.sinks import extreme_tokens
    from headscope.heads.stats import attention_stats, stats_from_pattern
    from headscope.hooking import hooks, forward
    from headscope.cache import run_with_cache
    from headscope.data.needles import repeated_tokens, text_tokens
    m = tiny_encoder("bert", attn_implementation="eager")
    text, rep = text_tokens(m.tokenizer, 2, 16), repeated_tokens(m.tokenizer, 2, 6)
    s, ref = pattern_scores(m, text, rep, progress=False), _pattern_reference(m, text, rep)
    assert set(s) == set(ref) and all(v.shape == (2, 4) and bool(torch.isfinite(v).all()) for v in s.values())
    A = run_with_cache(m, text, names=["blocks.1.attn.hook_pattern"])["blocks.1.attn.hook_pattern"]
    assert float(A.triu(1).sum(-1).mean()) > 0.2                    # bidirectional: real mass on later keys
    got = {}
    def obs(module, q, k, v, mask, kw):                              # with an explicit all-True mask the streaming stats are exact
        got["st"] = attention_stats(q, k, torch.ones(1, 1, q.shape[2], k.shape[2], dtype=torch.bool), kw.get("scaling"))
    with torch.no_grad(), hooks(m, observe={1: obs}): forward(m, {"input_ids": text})
    st = stats_from_pattern(A)
    torch.testing.assert_close(got["st"].sink.double(), st.sink, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["st"].entropy.double(), st.entropy, atol=1e-5, rtol=0)
    et = extreme_tokens(m, text, progress=False)
    assert et.sink_mass.shape == (2, 4) and bool(torch.isfinite(et.sink_mass).all())

@pytest.mark.parametrize("arch", ARCHS)
def test_house_tiny_encoders_with_their_byte_tokenizer(arch):
    "headscope.tiny_encoders' models and `<mask>` byte tokenizer: lens = model, DLA parts = logit"
    from headscope.tiny_encoders import tiny_encoder
    m = tiny_encoder(arch, initializer_range=0.3)
    ps = ["the cat <mask> on the mat", "a dog <mask> to the park!"]
    ll = mlm_lens(m, ps[0], targets="a")
    x = m.tokenizer(ps, return_tensors="pt", padding=True)
    with torch.no_grad(): lg = m(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    torch.testing.assert_close(ll.logits[-1, 0], lg[0, 9], atol=1e-5, rtol=0)
    r = mlm_dla(m, ps, "a", "b")
    a, b = m.tokenizer.convert_tokens_to_ids(["a", "b"])
    mp = (x["input_ids"] == m.tokenizer.mask_token_id).int().argmax(1)
    assert mp.tolist() == [9, 7]
    torch.testing.assert_close(r.total, lg[[0, 1], mp, a] - lg[[0, 1], mp, b], atol=1e-5, rtol=0)
    torch.testing.assert_close(r.residual(), torch.zeros(2), atol=1e-5, rtol=0)
