"""SAE feature statistics against brute force: the streaming top-k, counts, histograms and contexts against every
activation kept in memory; logit effects against a float64 recomputation (through a per-head W_O loop for hook_z);
head attribution against a hand-built decoder."""
import math
from itertools import islice
import pytest
import torch

from headscope.models import tiny_model
from headscope.arch import model_dims
from headscope.sae.core import make_sae
from headscope.data.corpora import token_windows, python_docs_corpus
from headscope.sae.features import head_attribution, top_activations, logit_effects, FeatureActivations

@pytest.fixture(scope="module")
def model(): return tiny_model("llama", n_layers=2, seed=0)

def plain_acts(model, name, toks):
    "The hook's activation from a plain PyTorch forward hook on the HF module (no headscope hooks), flattened per token"
    l = int(name.split(".")[1])
    got = {}
    if name.endswith("hook_resid_post"):
        h = model.model.layers[l].register_forward_hook(lambda m, a, o: got.__setitem__("a", o[0] if isinstance(o, tuple) else o))
    else:   # attn.hook_z: the input of o_proj is [batch pos head*d_head], heads in order
        h = model.model.layers[l].self_attn.o_proj.register_forward_pre_hook(lambda m, a: got.__setitem__("a", a[0]))
    try:
        with torch.no_grad(): model(toks)
    finally: h.remove()
    return got["a"]

def brute(model, sae, toks, skip_bos=True):
    "Every activation `[windows pos d_sae]`, kept in memory"
    with torch.no_grad(): a = sae.encode(plain_acts(model, sae.cfg.hook_name, toks))
    if skip_bos: a[:, 0] = 0
    return a

@pytest.mark.parametrize("name,d_in,arch,k,bs", [("blocks.1.hook_resid_post", 64, "standard", 5, 3),
                                                  ("blocks.0.attn.hook_z", 64, "topk", 7, 4),
                                                  ("blocks.1.hook_resid_post", 64, "standard", 40, 8)])
def test_streaming_topk_matches_brute_force(model, name, d_in, arch, k, bs):
    "Top-k values, their (window, pos), contexts, counts, sums and histograms equal those of the full materialisation"
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 256, (13, 12), generator=g); toks[:, 0] = model.tokenizer.bos_token_id
    sae = make_sae(arch, d_in, 24, seed=3, hook_name=name, **({"k": 4} if arch == "topk" else {}))
    with torch.no_grad():                                # thresholds: half the features fire on ~30% of tokens, half on ~2%
        pre = sae.pre(plain_acts(model, name, toks)[:, 1:].reshape(-1, d_in))
        sae.b_enc.copy_(-pre.quantile(torch.tensor([0.7, 0.98]).repeat(12), dim=0).diagonal())
    fa = top_activations(model, sae, toks, k=k, batch_size=bs, context=(3, 2), bins=20, hist_range=(1e-2, 1e2), progress=False)
    A = brute(model, sae, toks)                          # [13 12 24]
    flat = A.reshape(-1, 24).T                           # [feat tokens], token index = window*12 + pos
    assert fa.n_tokens == 13 * 11
    assert torch.equal(fa.counts, (flat > 0).sum(1))
    torch.testing.assert_close(fa.sums.double(), flat.double().sum(1), rtol=1e-5, atol=1e-5)
    edges = torch.logspace(-2, 2, 21, dtype=torch.float64)
    for f in range(24):
        x = flat[f][flat[f] > 0].double()
        ref = torch.histc(torch.bucketize(x, edges).clamp(1, 20).double() - 1, bins=20, min=0, max=19).long()
        assert torch.equal(fa.hist[f], ref), f
        pos = flat[f].argsort(descending=True)[:k]
        pos = pos[flat[f][pos] > 0]
        n = len(pos)
        assert n == min(k, int((flat[f] > 0).sum()))
        torch.testing.assert_close(fa.values[f, :n], flat[f][pos], rtol=1e-5, atol=1e-6)
        assert (fa.values[f, n:] == 0).all() and (fa.window[f, n:] == -1).all()
        assert fa.window[f, :n].tolist() == (pos // 12).tolist() and fa.pos[f, :n].tolist() == (pos % 12).tolist()
        for j, (w, p) in enumerate(zip((pos // 12).tolist(), (pos % 12).tolist())):   # context: tokens and this feature's acts
            for c, q in enumerate(range(p - 3, p + 3)):
                inside = 0 <= q < 12
                assert fa.ctx_tokens[f, j, c].item() == (toks[w, q].item() if inside else -1)
                if inside: torch.testing.assert_close(fa.ctx_acts[f, j, c], A[w, q, f], rtol=1e-5, atol=1e-6)
                else: assert math.isnan(fa.ctx_acts[f, j, c].item())
    assert (fa.counts < k).any() and (fa.counts > 0).any()   # the toy covers both cases

def test_subset_text_and_contexts(model):
    "Tracking a few features gives their rows of the full run; texts are cut into the same windows as token_windows"
    sae = make_sae("standard", 64, 16, seed=1, hook_name="blocks.1.hook_resid_post")
    docs = python_docs_corpus()[:40]
    full = top_activations(model, sae, docs, k=4, seq_len=10, max_windows=9, batch_size=4, progress=False)
    sub = top_activations(model, sae, docs, k=4, seq_len=10, max_windows=9, batch_size=2, features=[7, 2], progress=False)
    toks = torch.stack(list(islice(token_windows(model.tokenizer, docs, 10), 9)))
    ids = top_activations(model, sae, toks, k=4, batch_size=9, progress=False)
    for f in (7, 2):   # (windows are not compared: this prose repeats, and tied activations may come in any order)
        r = sub.row(f)
        assert torch.equal(sub.counts[r], full.counts[f]) and torch.equal(ids.counts[f], full.counts[f])
        torch.testing.assert_close(sub.values[r], full.values[f])
        torch.testing.assert_close(ids.values[f], full.values[f])
        for j in range(4):   # each kept context is the window's tokens around the kept position
            w, p = sub.window[r, j].item(), sub.pos[r, j].item()
            assert sub.ctx_tokens[r, j, 8].item() == toks[w, p].item()
    c = full.contexts(7, model.tokenizer)[0]
    assert c["ids"][c["at"]] == toks[c["window"], c["pos"]].item() and c["value"] == pytest.approx(c["acts"][c["at"]])
    with pytest.raises(KeyError, match="not tracked"): sub.row(3)
    assert "FeatureActivations(2 features" in repr(sub) and "hs-featacts" in sub._repr_html_()

def test_logit_effects(model):
    "Resid SAE: W_U @ W_dec[f] in float64; hook_z SAE: through each head's block of o_proj, looped by hand"
    d = model_dims(model)
    WU = model.lm_head.weight.double()
    s = make_sae("standard", 64, 8, seed=2, hook_name="blocks.1.hook_resid_post")
    le = logit_effects(model, s, 6, k=4)
    ref = WU @ s.W_dec[6].double()
    torch.testing.assert_close(le.logits.double(), ref, rtol=1e-5, atol=1e-5)
    assert le.top_ids.tolist() == ref.topk(4).indices.tolist() and le.bottom_ids.tolist() == ref.topk(4, largest=False).indices.tolist()
    assert le.top_values.tolist() == sorted(le.top_values.tolist(), reverse=True)
    z = make_sae("standard", d.n_heads * d.d_head, 8, seed=2, hook_name="blocks.1.attn.hook_z")
    Wo = model.model.layers[1].self_attn.o_proj.weight.double()
    via = sum(Wo[:, h * d.d_head:(h + 1) * d.d_head] @ z.W_dec[3, h * d.d_head:(h + 1) * d.d_head].double() for h in range(d.n_heads))
    torch.testing.assert_close(logit_effects(model, z, 3).logits.double(), WU @ via, rtol=1e-5, atol=1e-5)
    # and the z read by plain hooks on o_proj's input really is heads in order: o_proj(z) == sum of per-head writes
    toks = torch.randint(0, 256, (1, 5))
    zz = plain_acts(model, "blocks.1.attn.hook_z", toks)[0].double()
    torch.testing.assert_close(zz @ Wo.T, sum(zz[:, h * 16:(h + 1) * 16] @ Wo[:, h * 16:(h + 1) * 16].T for h in range(4)))

def test_head_attribution():
    "Hand-built decoder rows: one head only, a 3:4 split, uniform; rows sum to 1; a d_in that heads don't divide is refused"
    s = make_sae("standard", 12, 3, seed=0, hook_name="blocks.0.attn.hook_z")
    with torch.no_grad():
        s.W_dec.zero_(); s.W_dec[0, 3:6] = torch.tensor([1., 2., 2.])
        s.W_dec[1, :3] = torch.tensor([0., 3., 0.]); s.W_dec[1, 9:] = torch.tensor([0., 0., 4.]); s.W_dec[2] = -1.
    torch.testing.assert_close(head_attribution(s, 4), torch.tensor([[0., 1, 0, 0], [3 / 7, 0, 0, 4 / 7], [.25] * 4]))
    with pytest.raises(ValueError, match="not divisible"): head_attribution(s, 5)
    with pytest.raises(ValueError, match="positive int"): head_attribution(s, 0)

def test_hooks_removed_and_forward_stopped(model):
    "The read hook is gone afterwards (plain forward unchanged) and layers after the hook never ran"
    toks = torch.randint(0, 256, (2, 6))
    with torch.no_grad(): before = model(toks).logits
    ran = []
    h = model.model.layers[1].register_forward_hook(lambda *a: ran.append(1))
    try: top_activations(model, make_sae("standard", 64, 4, seed=0, hook_name="blocks.0.hook_resid_post"), toks, k=2, progress=False)
    finally: h.remove()
    assert ran == []
    with torch.no_grad(): assert torch.equal(model(toks).logits, before)
