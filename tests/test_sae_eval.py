"Splicing SAEs and transcoders into a forward, and evaluate_sae, against plain PyTorch hooks and float64 recomputations"
import copy
import pytest, torch
from headscope.models import tiny_model
from headscope.hooking import hooks, add
from headscope.sae.core import make_sae, init_b_dec
from headscope.sae.eval import splice, splice_hooks, evaluate_sae, sae_hook_names
from headscope.cache import run_with_cache
from _checks import assert_no_hooks

torch.set_num_threads(1)

@pytest.fixture(scope='module')
def llama(): return tiny_model('llama', seed=0).eval()

def _toks(model, b=3, p=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 250, (b, p), generator=g)
    t[:, 0] = model.tokenizer.bos_token_id
    return t

def _sae(arch, d_in, hook, seed=0, **kw):
    s = make_sae(arch, d_in, 4 * d_in, seed=seed, hook_name=hook, **kw)
    with torch.no_grad(): s.b_dec.normal_(generator=torch.Generator().manual_seed(seed)); s.b_enc.fill_(0.05)
    return s.eval()

def _with_module_hook(model, module, edit, toks, pre=False):
    "Logits of a plain forward where a plain PyTorch hook on `module` edits its output (or its first input)"
    if pre: h = module.register_forward_pre_hook(lambda m, a: (edit(a[0]),) + tuple(a[1:]))
    else: h = module.register_forward_hook(lambda m, a, o: (edit(o[0]),) + tuple(o[1:]) if isinstance(o, tuple) else edit(o))
    try:
        with torch.no_grad(): return model(toks).logits
    finally: h.remove()

# --- splicing ------------------------------------------------------------------------------------

@pytest.mark.parametrize('arch', ['llama', 'gpt2', 'gemma2', 'gpt_neox'])
@pytest.mark.parametrize('hook', ['blocks.0.hook_resid_post', 'blocks.1.hook_mlp_out', 'blocks.1.attn.hook_z'])
def test_error_mode_without_edits_is_exact(arch, hook):
    m = tiny_model(arch, seed=1).eval()
    toks = _toks(m)
    d = m.config.hidden_size
    s = _sae('topk', d, hook, k=4)
    with torch.no_grad():
        plain = m(toks).logits
        with splice(m, s, 'error') as st: err = m(toks).logits
        with splice(m, s, 'read') as st2: rd = m(toks).logits
        with splice(m, s, 'replace'): rep = m(toks).logits
    assert torch.equal(err, plain) and torch.equal(rd, plain)
    assert (rep - plain).abs().max() > 1e-4       # the untrained SAE does change the output
    torch.testing.assert_close(st[hook], st2[hook])
    assert st[hook].shape == (*toks.shape, 4 * d)
    assert_no_hooks(m)

def test_replace_and_feature_edits_match_manual_hook(llama):
    toks = _toks(llama)
    s = _sae('standard', 64, 'blocks.0.hook_resid_post')
    blk = llama.model.layers[0]
    with torch.no_grad():
        with splice(llama, s): rep = llama(toks).logits
        torch.testing.assert_close(rep, _with_module_hook(llama, blk, s, toks), atol=1e-5, rtol=1e-5)
        # clamp latent 5 to 3 and double latent 9, keeping the error term: x + Δf W_dec
        with splice(llama, s, 'error', features={5: 3., 9: lambda a: 2 * a}): e = llama(toks).logits
        def ref(x):
            f = s.encode(x)
            return x + (3. - f[..., 5:6]) * s.W_dec[5] + f[..., 9:10] * s.W_dec[9]
        torch.testing.assert_close(e, _with_module_hook(llama, blk, ref, toks), atol=1e-5, rtol=1e-5)
        # replace with an edit: decode of the edited latents
        with splice(llama, s, 'replace', features={5: 0.}): r0 = llama(toks).logits
        torch.testing.assert_close(r0, _with_module_hook(llama, blk, lambda x: s(x) - s.encode(x)[..., 5:6] * s.W_dec[5], toks),
                                   atol=1e-5, rtol=1e-5)

def test_splice_composes_with_steering(llama):
    toks = _toks(llama)
    s = _sae('topk', 64, 'blocks.1.hook_resid_post', k=6)
    v = torch.randn(64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), hooks(llama, splice_hooks(s) + [('blocks.1.hook_resid_post', add(v, pos=-1))]):
        got = llama(toks).logits
    def ref(x):
        y = s(x).clone(); y[:, -1] += v; return y
    torch.testing.assert_close(got, _with_module_hook(llama, llama.model.layers[1], ref, toks), atol=1e-5, rtol=1e-5)

def test_hook_z_sae_matches_o_proj_pre_hook(llama):
    toks = _toks(llama)
    s = _sae('standard', 64, 'blocks.1.attn.hook_z')        # 4 heads x 16
    with torch.no_grad():
        with splice(llama, s) as st: got = llama(toks).logits
    ref = _with_module_hook(llama, llama.model.layers[1].self_attn.o_proj, s, toks, pre=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    z = run_with_cache(llama, toks, names=['blocks.1.attn.hook_z'])['blocks.1.attn.hook_z']
    torch.testing.assert_close(st['blocks.1.attn.hook_z'], s.encode(z.reshape(*z.shape[:2], -1)))

def test_transcoder_splice_matches_manual_hooks(llama):
    toks = _toks(llama)
    tc = _sae('transcoder', 64, 'blocks.1.ln2.hook_normalized', k=8, skip=True)
    with torch.no_grad(): tc.W_skip.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
    assert sae_hook_names(tc) == ('blocks.1.ln2.hook_normalized', 'blocks.1.hook_mlp_out')
    lay = llama.model.layers[1]
    def manual(edit):
        got = {}
        h1 = lay.post_attention_layernorm.register_forward_hook(lambda m, a, o: got.__setitem__('x', o))
        h2 = lay.mlp.register_forward_hook(lambda m, a, o: edit(got['x'], o))
        try:
            with torch.no_grad(): return llama(toks).logits
        finally: h1.remove(); h2.remove()
    with torch.no_grad():
        with splice(llama, tc): rep = llama(toks).logits
        torch.testing.assert_close(rep, manual(lambda x, y: tc(x)), atol=1e-5, rtol=1e-5)
        with splice(llama, tc, 'error', features={2: 1.5}): e = llama(toks).logits
        torch.testing.assert_close(e, manual(lambda x, y: y + (1.5 - tc.encode(x)[..., 2:3]) * tc.W_dec[2]), atol=1e-5, rtol=1e-5)
        plain = llama(toks).logits
        with splice(llama, tc, 'error'): assert torch.equal(llama(toks).logits, plain)

def test_error_mode_gradients(llama):
    "Gradient to earlier activations is the plain model's; the stored latents get W_dec · dL/dx"
    toks = _toks(llama)
    s = _sae('topk', 64, 'blocks.0.hook_resid_post', k=8)
    emb = llama.model.embed_tokens(toks).detach().requires_grad_()
    L = lambda: llama(inputs_embeds=emb).logits[:, -1].logsumexp(-1).sum()
    g0, = torch.autograd.grad(L(), emb)
    with splice(llama, s, 'error') as st:
        out = L(); g1, gf = torch.autograd.grad(out, (emb, st['blocks.0.hook_resid_post']))
    torch.testing.assert_close(g1, g0)
    x = run_with_cache(llama, toks, names=['blocks.0.hook_resid_post'])['blocks.0.hook_resid_post'].detach().requires_grad_()
    with hooks(llama, [('blocks.0.hook_resid_post', lambda a, h: x)]):
        gx, = torch.autograd.grad(llama(inputs_embeds=emb).logits[:, -1].logsumexp(-1).sum(), x)
    torch.testing.assert_close(gf, gx @ s.W_dec.detach().T, atol=1e-6, rtol=1e-5)

def test_splice_errors(llama):
    s = _sae('topk', 64, 'blocks.0.hook_resid_post', k=4)
    with pytest.raises(ValueError, match="valid: 'replace', 'error', 'read'"): splice_hooks(s, 'ablate')
    with pytest.raises(ValueError, match="use mode='error'"): splice_hooks(s, 'read', features={0: 1.})
    with pytest.raises(ValueError, match='hook_name is empty'): splice_hooks(make_sae('topk', 64, 32, k=4))
    wrong = _sae('topk', 32, 'blocks.0.hook_resid_post', k=4)
    with pytest.raises(ValueError, match='d_in=32'):
        with splice(llama, wrong), torch.no_grad(): llama(_toks(llama))
    assert_no_hooks(llama)

# --- evaluate_sae against float64 ------------------------------------------------------------------

def _reference(model, sae, toks, skip_bos=True):
    "Every metric recomputed in float64 with plain PyTorch hooks on a float64 copy of the model"
    m, s = copy.deepcopy(model).double(), copy.deepcopy(sae).double()
    hin, hout = sae_hook_names(sae)
    l = int(hout.split('.')[1]); lay = m.model.layers[l]
    b = int(skip_bos)
    tc = hin != hout
    mod_out = lay.mlp if tc else lay
    got = {}
    hs = [mod_out.register_forward_hook(lambda mod, a, o: got.__setitem__('y', o[0] if isinstance(o, tuple) else o))]
    if tc: hs.append(lay.post_attention_layernorm.register_forward_hook(lambda mod, a, o: got.__setitem__('x', o)))
    with torch.no_grad(): clean = m(toks).logits
    for h in hs: h.remove()
    y = got['y'][:, b:].reshape(-1, 64); x = got['x'][:, b:].reshape(-1, 64) if tc else y
    f = s.encode(x); yh = s(x)
    err = (y - yh).pow(2).sum()
    r = dict(l0=(f > 0).sum(-1).double().mean().item(), fvu=(err / (y - y.mean(0)).pow(2).sum()).item(),
             mse=(err / y.numel()).item(), cosine=torch.nn.functional.cosine_similarity(y, yh, dim=-1).mean().item())
    dens = (f > 0).double().mean(0)
    r |= dict(dead_frac=(dens == 0).double().mean().item(), dense_frac=(dens > 0.1).double().mean().item())
    mu = y.mean(0)
    def run(edit):
        def hook(mod, a, o):
            o0 = o[0] if isinstance(o, tuple) else o
            new = o0.clone(); new[:, b:] = edit(new[:, b:], got.get('xs'))
            return (new,) + tuple(o[1:]) if isinstance(o, tuple) else new
        hs = [mod_out.register_forward_hook(hook)]
        if tc: hs.append(lay.post_attention_layernorm.register_forward_hook(lambda mod, a, o: got.__setitem__('xs', o[:, b:])))
        try:
            with torch.no_grad(): return m(toks).logits
        finally:
            for h in hs: h.remove()
    lps = dict(clean=clean, spliced=run(lambda o, xs: s(xs if tc else o)), zero=run(lambda o, xs: torch.zeros_like(o)),
               mean=run(lambda o, xs: mu.expand_as(o)))
    lp = {k: v.log_softmax(-1) for k, v in lps.items()}
    ce = {k: -v[:, b:-1].gather(-1, toks[:, b + 1:, None])[..., 0].mean().item() for k, v in lp.items()}
    kl = (lp['clean'].exp() * (lp['clean'] - lp['spliced'])).sum(-1)[:, b:].mean().item()
    r |= dict(ce_clean=ce['clean'], ce_spliced=ce['spliced'], ce_zero=ce['zero'], ce_mean=ce['mean'], kl=kl,
              ce_recovered=(ce['zero'] - ce['spliced']) / (ce['zero'] - ce['clean']),
              ce_recovered_mean=(ce['mean'] - ce['spliced']) / (ce['mean'] - ce['clean']))
    return r, dens

@pytest.mark.parametrize('kind', ['resid', 'transcoder'])
def test_evaluate_sae_matches_float64(llama, kind):
    toks = _toks(llama, b=5, p=12, seed=2)
    if kind == 'resid':
        s = _sae('topk', 64, 'blocks.1.hook_resid_post', k=6)
        xs = run_with_cache(llama, toks, names=['blocks.1.hook_resid_post'])['blocks.1.hook_resid_post'][:, 1:]
    else:
        s = _sae('transcoder', 64, 'blocks.0.ln2.hook_normalized', k=6, skip=True)
        xs = run_with_cache(llama, toks, names=['blocks.0.hook_mlp_out'])['blocks.0.hook_mlp_out'][:, 1:]
    init_b_dec(s, xs, 'mean')          # a centred SAE: FVU near 1, not wildly above
    m = evaluate_sae(llama, s, toks, batch_size=2, progress=False)
    ref, dens = _reference(llama, s, toks)
    for k, v in ref.items():
        assert abs(getattr(m, k) - v) <= 1e-4 * max(1., abs(v)), (k, getattr(m, k), v)
    torch.testing.assert_close(m.density.double(), dens, atol=1e-6, rtol=0)
    assert abs(m.ce_error - m.ce_clean) < 1e-6 and abs(m.kl_error) < 1e-7
    assert m.n_tokens == 5 * 11
    assert m.l0 > 1 and m.dead_frac < 1 and m.kl > 0
    h = m._repr_html_()
    assert 'background:white' in h and 'data:image/png;base64' in h and 'BOS excluded' in h
    assert set(m.to_dict()) >= set(ref)

def test_evaluate_sae_on_a_corpus_restores_training_mode(llama):
    s = _sae('batchtopk', 64, 'blocks.0.hook_resid_post', k=4).train()
    texts = ["The quick brown fox jumps over the lazy dog. " * 8, "Sphinx of black quartz, judge my vow. " * 8]
    m = evaluate_sae(llama, s, texts, seq_len=16, n_windows=6, batch_size=4, progress=False)
    assert m.n_tokens == 6 * 15 and s.training
    with pytest.raises(ValueError, match='shorter than one window'): evaluate_sae(llama, s, ['ab'], seq_len=16, progress=False)
    with pytest.raises(ValueError, match=r'integer tensor \[batch pos\]'): evaluate_sae(llama, s, torch.zeros(4), progress=False)
