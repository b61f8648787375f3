"Transcoders: forward and loss against float64, checkpoints, paired activations against run_with_cache"
import json
import pytest, torch
from headscope.models import tiny_model
from headscope.cache import run_with_cache
from headscope.sae.core import make_sae, save_sae, load_sae, SAE_ARCHS
from headscope.sae.transcoder import Transcoder, paired_activations, transcoder_hooks

torch.set_num_threads(1)

def _tc(k=None, skip=False, d_in=8, d_out=None, seed=0, **kw):
    tc = make_sae('transcoder', d_in, 24, k=k, skip=skip, d_out=d_out, seed=seed, hook_name='blocks.2.ln2.hook_normalized', **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tc.b_dec.normal_(generator=g); tc.b_enc.normal_(std=0.3, generator=g)
        if skip: tc.W_skip.normal_(std=0.2, generator=g)
    return tc

def _ref(tc, x):
    p = {k: v.detach().double() for k, v in tc.named_parameters()}
    h = x.double() @ p['W_enc'] + p['b_enc']
    f = h.relu() if tc.cfg.k is None else torch.where(h >= h.topk(tc.cfg.k, -1).values[:, -1:], h, 0.).clamp_min(0)
    y = f @ p['W_dec'] + p['b_dec'] + (x.double() @ p['W_skip'].T if 'W_skip' in p else 0.)
    return h, f, y

@pytest.mark.parametrize('k', [None, 5])
@pytest.mark.parametrize('skip', [False, True])
@pytest.mark.parametrize('d_out', [None, 6])
def test_forward_and_loss_match_float64(k, skip, d_out):
    tc = _tc(k, skip, d_out=d_out, l1_coeff=0.3)
    x = torch.randn(7, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randn(7, d_out or 8, generator=torch.Generator().manual_seed(2))
    h, f, yh = _ref(tc, x)
    torch.testing.assert_close(tc(x).detach(), yh.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tc.encode(x).detach(), f.float(), atol=1e-5, rtol=1e-5)
    l = tc.loss(x, y)
    mse = (yh - y.double()).pow(2).sum(-1).mean().item()
    sp = 0. if k else 0.3 * (f * tc.W_dec.detach().double().norm(dim=-1)).sum(-1).mean().item()
    assert abs(l['mse'].item() - mse) < 1e-4 * mse
    assert abs(l['sparsity'].item() - sp) < 1e-4 * max(sp, 1e-3)
    assert abs(l['l0'].item() - (f > 0).sum(-1).double().mean().item()) < 1e-5
    assert tc.W_dec.shape == (24, d_out or 8) and tc.b_dec.shape == (d_out or 8,)

def test_auxk_on_the_output_error():
    tc = _tc(k=4, k_aux=3)
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    dead = torch.arange(24) >= 16
    h, f, yh = _ref(tc, x)
    e = y.double() - yh
    hd = h[:, 16:]
    fa = torch.where(hd >= hd.topk(3, -1).values[:, -1:], hd, 0.).clamp_min(0)
    want = tc.cfg.aux_coeff * (e - fa @ tc.W_dec.detach().double()[16:]).pow(2).sum(-1).mean().item()
    assert abs(tc.loss(x, y, dead=dead)['aux'].item() - want) < 1e-4 * want
    assert tc.loss(x, y, dead=torch.zeros(24, dtype=torch.bool))['aux'].item() == 0.

def test_registry_defaults_and_errors():
    assert SAE_ARCHS['transcoder'] is Transcoder
    tc = make_sae('transcoder', 8, 16, skip=True)
    assert tc.cfg.d_out == 8 and tc.cfg.apply_b_dec_to_input is False
    assert tc.W_skip.shape == (8, 8) and tc.W_skip.abs().sum() == 0
    assert tc.hook_name_out == '' and _tc().hook_name_out == 'blocks.2.hook_mlp_out'
    with pytest.raises(TypeError, match='needs the target'): tc.loss(torch.randn(2, 8))
    with pytest.raises(ValueError, match='0 < k <= d_sae=16'): make_sae('transcoder', 8, 16, k=0)

@pytest.mark.parametrize('skip', [False, True])
def test_checkpoint_round_trip(tmp_path, skip):
    tc = _tc(k=5, skip=skip, d_out=6)
    save_sae(tc, tmp_path)
    cfg = json.loads((tmp_path/'cfg.json').read_text())
    assert cfg['architecture'] == ('skip_transcoder' if skip else 'transcoder')
    assert (cfg['d_out'], cfg['hook_name_out'], cfg['metadata']['training_architecture']) == (6, 'blocks.2.hook_mlp_out', 'transcoder')
    tc2 = load_sae(tmp_path)
    assert type(tc2) is Transcoder and tc2.cfg == tc.cfg
    assert set(tc2.state_dict()) == set(tc.state_dict())
    x = torch.randn(4, 8)
    assert torch.equal(tc2(x), tc(x).detach())

def test_old_checkpoints_without_the_new_fields_load(tmp_path):
    s = make_sae('topk', 8, 16, k=3, seed=0)
    save_sae(s, tmp_path)
    cfg = json.loads((tmp_path/'cfg.json').read_text())
    for k in ('d_out', 'skip'): cfg.pop(k)
    (tmp_path/'cfg.json').write_text(json.dumps(cfg))
    s2 = load_sae(tmp_path)
    assert s2.cfg == s.cfg and s2.cfg.d_out is None and s2.cfg.skip is False

@pytest.mark.parametrize('arch', ['llama', 'gpt2'])
def test_paired_activations_match_run_with_cache(arch):
    m = tiny_model(arch, seed=0).eval()
    toks = torch.randint(0, 250, (5, 9), generator=torch.Generator().manual_seed(0))
    X, Y = paired_activations(m, -1, toks, batch_size=2, progress=False)
    c = run_with_cache(m, toks, names=['blocks.1.ln2.hook_normalized', 'blocks.1.hook_mlp_out'])
    torch.testing.assert_close(X, c['blocks.1.ln2.hook_normalized'][:, 1:].reshape(-1, X.shape[1]))
    torch.testing.assert_close(Y, c['blocks.1.hook_mlp_out'][:, 1:].reshape(-1, Y.shape[1]))
    X0, _ = paired_activations(m, 1, toks, skip_bos=False, progress=False)
    assert X0.shape[0] == 5 * 9

def test_transcoder_hooks():
    assert transcoder_hooks(tiny_model('olmo2'), 0) == ('blocks.0.hook_resid_mid', 'blocks.0.hook_mlp_out')
    with pytest.raises(IndexError, match='layers 0..1'): transcoder_hooks(tiny_model('llama'), 5)
