"SAE architectures: float64 references, init, SAELens-format round trips, sparsity structure, errors"
import json, subprocess, sys
import pytest, torch
from safetensors.torch import load_file, save_file
from headscope.sae.core import SAE_ARCHS, make_sae, save_sae, load_sae, init_b_dec, geometric_median

ARCHS = ['standard', 'topk', 'batchtopk', 'jumprelu']
D_IN, D_SAE, K = 6, 24, 3

def _sae(arch, seed=0, **kw):
    sae = make_sae(arch, D_IN, D_SAE, seed=seed, k=K, hook_name='blocks.1.hook_resid_post', model_name='tiny', **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move every parameter off its init so a round trip that drops one would show
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(D_IN, generator=g))
        sae.W_dec.mul_(torch.rand(D_SAE, 1, generator=g) + 0.5)
        sae.W_enc.add_(torch.randn(D_IN, D_SAE, generator=g) * 0.1)
        if hasattr(sae, 'threshold'): sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.3)
    return sae

def _ref_encode(sae, x):
    "float64 encoding written from the papers' definitions"
    W_enc, b_enc, b_dec = (p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.b_dec))
    h = (x.double() - b_dec) @ W_enc + b_enc
    a = sae.cfg.architecture
    if a == 'standard': return h.clamp_min(0)
    if a == 'topk': return torch.where(h >= h.topk(K, -1).values[..., -1:], h, 0.).clamp_min(0)
    if a == 'batchtopk' and sae.training:
        r = h.clamp_min(0); return torch.where(r >= r.flatten().topk(K * r[..., 0].numel()).values[-1], r, 0.)
    th = sae.threshold.detach().double()
    return torch.where(h > th, h.clamp_min(0), 0.)

@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('train', [True, False])
def test_encode_decode_float64(arch, train):
    sae = _sae(arch).train(train)
    x = torch.randn(2, 5, D_IN, generator=torch.Generator().manual_seed(3))
    f = _ref_encode(sae, x)
    rec = f @ sae.W_dec.detach().double() + sae.b_dec.detach().double()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x).double(), f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x).double(), rec, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.decode(f.float()).double(), rec, atol=1e-5, rtol=1e-5)
    assert (f > 0).any() and (f == 0).any()   # the reference is not trivially all-on or all-off

@pytest.mark.parametrize('arch', ARCHS)
def test_init(arch):
    sae = make_sae(arch, D_IN, D_SAE, seed=0, k=K)
    torch.testing.assert_close(sae.W_dec.detach().norm(dim=-1), torch.full((D_SAE,), 0.1 if arch == 'standard' else 1.0))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_dec.any() and not sae.b_enc.any()
    assert not torch.equal(make_sae(arch, D_IN, D_SAE, seed=1, k=K).W_dec, sae.W_dec)

def test_geometric_median_brute_force():
    pts = torch.tensor([[0., 0.], [3., 0.], [0., 2.], [1., 1.], [8., 9.], [2., 3.]], dtype=torch.float64)
    gm = geometric_median(pts)
    g = torch.linspace(-1, 4, 501, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing='ij'), -1).reshape(-1, 2)
    cost = torch.cdist(grid, pts).sum(-1)
    assert (gm - grid[cost.argmin()]).norm() < 0.015
    assert (pts - gm).norm(dim=-1).sum() <= cost.min() + 1e-9   # at least as good as the best grid point
    assert (gm - pts.mean(0)).norm() > 0.5                       # and not the mean
    sae = make_sae('standard', 2, 4)
    torch.testing.assert_close(init_b_dec(sae, pts[None]).detach().double(), gm, atol=1e-6, rtol=0)
    torch.testing.assert_close(init_b_dec(sae, pts, how='mean').detach().double(), pts.mean(0), atol=1e-6, rtol=0)

@pytest.mark.parametrize('arch', ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    sae = _sae(arch)
    if arch == 'batchtopk': sae.loss(torch.randn(16, D_IN))   # give it a learned threshold
    sae.eval()
    save_sae(sae, tmp_path)
    cfg = json.loads((tmp_path/'cfg.json').read_text())
    for k in ('architecture', 'd_in', 'd_sae', 'dtype', 'device', 'apply_b_dec_to_input',
              'normalize_activations', 'reshape_activations', 'metadata'):
        assert k in cfg, k
    assert cfg['metadata']['hook_name'] == 'blocks.1.hook_resid_post' and cfg['metadata']['model_name'] == 'tiny'
    assert cfg['architecture'] == {'batchtopk': 'jumprelu'}.get(arch, arch)
    assert cfg['metadata']['training_architecture'] == arch
    if arch == 'topk': assert cfg['k'] == K
    w = load_file(str(tmp_path/'sae_weights.safetensors'))
    want = {'W_enc': (D_IN, D_SAE), 'b_enc': (D_SAE,), 'W_dec': (D_SAE, D_IN), 'b_dec': (D_IN,)}
    if arch in ('batchtopk', 'jumprelu'): want['threshold'] = (D_SAE,)
    assert {k: tuple(v.shape) for k, v in w.items()} == want
    back = load_sae(tmp_path)
    assert type(back) is type(sae) and not back.training
    x = torch.randn(7, D_IN)
    with torch.no_grad(): assert torch.equal(back.encode(x), sae.encode(x)) and torch.equal(back(x), sae(x))
    if arch == 'batchtopk': assert sae.threshold.min() > 0

def test_load_saelens_written_cfg(tmp_path):
    "A folder as SAELens 6 writes it for a standard SAE (no headscope keys) loads"
    sae = _sae('standard')
    save_file({k: v.detach().contiguous() for k, v in sae.state_dict().items()}, str(tmp_path/'sae_weights.safetensors'))
    cfg = dict(d_in=D_IN, d_sae=D_SAE, dtype='float32', device='cpu', apply_b_dec_to_input=True, normalize_activations='none',
               reshape_activations='none', architecture='standard',
               metadata=dict(sae_lens_version='6.5.0', hook_name='blocks.0.hook_resid_pre', model_name='gpt2'))
    (tmp_path/'cfg.json').write_text(json.dumps(cfg))
    back = load_sae(tmp_path)
    assert back.cfg.hook_name == 'blocks.0.hook_resid_pre' and back.cfg.architecture == 'standard'
    x = torch.randn(3, D_IN)
    with torch.no_grad(): assert torch.equal(back.encode(x), sae.encode(x))

def test_topk_exactly_k():
    sae = _sae('topk')
    with torch.no_grad(): sae.b_enc.fill_(20.)
    f = sae.encode(torch.randn(4, 9, D_IN))
    assert ((f != 0).sum(-1) == K).all()

def test_batchtopk_k_times_batch():
    sae = _sae('batchtopk')
    with torch.no_grad(): sae.b_enc.fill_(20.)
    f = sae.train().encode(torch.randn(4, 9, D_IN))
    assert (f != 0).sum() == K * 36
    l = sae.loss(torch.randn(4, 9, D_IN))
    assert l['l0'].item() == pytest.approx(K)

def test_auxk():
    sae = _sae('topk', k_aux=4)
    x = torch.randn(8, D_IN)
    assert sae.loss(x)['aux'].item() == 0.                                    # fresh: nothing dead
    assert sae.loss(x, dead=torch.zeros(D_SAE, dtype=torch.bool))['aux'].item() == 0.
    l = sae.loss(x, dead=torch.ones(D_SAE, dtype=torch.bool))
    assert l['aux'].item() > 0
    l['aux'].backward()
    assert sae.W_dec.grad.abs().sum() > 0

def test_jumprelu_threshold_gets_gradient():
    sae = _sae('jumprelu', bandwidth=0.2)
    x = torch.randn(64, D_IN)
    l = sae.loss(x)
    l['total'].backward()
    assert sae.threshold.grad is not None and sae.threshold.grad.abs().sum() > 0
    sae.zero_grad(); sae.loss(x)['sparsity'].backward()
    assert (sae.threshold.grad <= 0).all() and (sae.threshold.grad < 0).any()  # raising θ lowers L0

def test_standard_sparsity_weighted_by_decoder_norm():
    sae = _sae('standard', l1_coeff=0.3)
    x = torch.randn(5, D_IN)
    f = _ref_encode(sae, x)
    ref = 0.3 * (f * sae.W_dec.detach().double().norm(dim=-1)).sum(-1).mean()
    assert sae.loss(x)['sparsity'].item() == pytest.approx(ref.item(), rel=1e-5)

def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown SAE architecture 'gated'; valid: \['batchtopk', 'jumprelu', 'standard', 'topk'"):
        make_sae('gated', 4, 8)
    with pytest.raises(ValueError, match="needs 0 < k"): make_sae('topk', 4, 8)
    with pytest.raises(TypeError, match="Unknown SAE config fields"): make_sae('standard', 4, 8, kay=2)
    with pytest.raises(ValueError, match="d_in=6"): _sae('standard').encode(torch.randn(2, 5))
    with pytest.raises(ValueError, match="valid: 'mean', 'median'"): init_b_dec(_sae('standard'), torch.randn(3, D_IN), how='max')
    save_sae(_sae('jumprelu'), tmp_path)
    cfg = json.loads((tmp_path/'cfg.json').read_text())
    cfg['d_sae'] = 25; (tmp_path/'cfg.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"has shape .* in the weights, but cfg.json \(d_in=6, d_sae=25\)"): load_sae(tmp_path)
    cfg['d_sae'] = D_SAE; cfg['architecture'] = cfg['metadata']['training_architecture'] = 'gated'
    (tmp_path/'cfg.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="valid:"): load_sae(tmp_path)
    cfg['architecture'] = cfg['metadata']['training_architecture'] = 'jumprelu'; (tmp_path/'cfg.json').write_text(json.dumps(cfg))
    w = load_file(str(tmp_path/'sae_weights.safetensors')); w.pop('threshold')
    save_file(w, str(tmp_path/'sae_weights.safetensors'))
    with pytest.raises(KeyError, match="lacks \\['threshold'\\]"): load_sae(tmp_path)
    with pytest.raises(FileNotFoundError): load_sae(tmp_path/'none')

@pytest.mark.parametrize('key,val', [('normalize_activations', 'expected_average_only_in'),
                                     ('rescale_acts_by_decoder_norm', True), ('reshape_activations', 'hook_z')])
def test_refuses_unimplemented_saelens_options(tmp_path, key, val):
    save_sae(_sae('topk'), tmp_path)
    cfg = json.loads((tmp_path/'cfg.json').read_text()); cfg[key] = val
    (tmp_path/'cfg.json').write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match=key): load_sae(tmp_path)

def test_core_alone_registers_every_arch():
    "Importing only headscope.sae.core is enough: make_sae imports the architecture modules itself"
    code = ("import sys; import headscope.sae.core as c; assert 'headscope.sae.topk' not in sys.modules; "
            "s = c.make_sae('batchtopk', 4, 8, k=2); print(sorted(c.SAE_ARCHS))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['batchtopk', 'jumprelu', 'standard', 'topk', 'transcoder']"

# --- sparse TopK decode (helper A) ---
@pytest.mark.parametrize('shape', [(1,), (5,), (2, 7), (3, 1, 4)])
@pytest.mark.parametrize('k', [1, 3, 8])
def test_decode_sparse_matches_dense_float64(shape, k):
    g = torch.Generator().manual_seed(k)
    sae = make_sae('topk', 9, 17, k=k, seed=k, dtype='float64')
    with torch.no_grad(): sae.b_dec.copy_(torch.randn(9, generator=g, dtype=torch.float64))
    vals = torch.randn(*shape, k, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 17, (*shape, k), generator=g)
    out = sae.decode_sparse(vals, idx)
    W, b = sae.W_dec.detach().clone().requires_grad_(), sae.b_dec.detach().clone().requires_grad_()
    v2 = vals.detach().clone().requires_grad_()
    ref = (v2[..., None] * W[idx]).sum(-2) + b          # independent: explicit gather, [... k d_in]
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out * up).sum(), (vals, sae.W_dec, sae.b_dec))
    want = torch.autograd.grad((ref * up).sum(), (v2, W, b))
    assert out.shape == (*shape, 9)
    for a, w in zip((out, *got), (ref, *want)): torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-12)

@pytest.mark.parametrize('arch', ['topk', 'batchtopk'])
def test_sparse_training_loss_matches_dense(arch):
    sae = make_sae(arch, 6, 20, k=3, seed=0, dtype='float64', dead_tokens=1)
    x = torch.randn(11, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h = sae.pre(x).detach()
    acts = sae.train().act(h)                              # dense activation, written independently of the sparse path
    recon = acts @ sae.W_dec.detach() + sae.b_dec.detach()
    l = sae.loss(x, dead=torch.zeros(20, dtype=torch.bool))
    torch.testing.assert_close(l['mse'].item(), (recon - x).pow(2).sum(-1).mean().item(), rtol=1e-12, atol=0)
    assert l['l0'].item() == pytest.approx((acts > 0).sum().item() / 11)

def test_auxk_scale_and_decoder_bias():
    sae = make_sae('topk', 6, 20, k=3, seed=0, dtype='float64', k_aux=4)
    with torch.no_grad(): sae.b_dec.normal_()
    x = torch.randn(7, 6, dtype=torch.float64)
    dead = torch.zeros(20, dtype=torch.bool); dead[[2, 5]] = True  # 2 dead < k_aux = 4: scale 1/2, k_aux -> 2
    l = sae.loss(x, dead=dead)
    Wd, bd = sae.W_dec.detach(), sae.b_dec.detach()
    h = sae.pre(x).detach()
    f = torch.where(h >= h.topk(3, -1).values[:, -1:], h, 0.).clamp_min(0)
    e = x - (f @ Wd + bd)
    e_hat = h[:, [2, 5]] @ Wd[[2, 5]] + bd                 # both dead latents kept, no ReLU, bias included
    want = sae.cfg.aux_coeff * 0.5 * (e - e_hat).pow(2).sum(-1).mean()
    torch.testing.assert_close(l['aux'], want, rtol=1e-10, atol=0)

# --- bad inputs: one table, each row a call and the message that says what was wrong and what is valid ---
def _folder(cfg_text=None, weights=None):
    "A saved standard SAE in a fresh folder, its cfg.json replaced by `cfg_text` or its weights by `weights` bytes"
    import tempfile
    d = save_sae(_sae('standard'), tempfile.mkdtemp())
    if cfg_text is not None: (d/'cfg.json').write_text(cfg_text)
    if weights is not None: (d/'sae_weights.safetensors').write_bytes(weights(d/'sae_weights.safetensors'))
    return d

def _cfg(**changes):
    c = json.loads((_folder()/'cfg.json').read_text())
    for k, v in changes.items():
        if v is None: c.pop(k, None); c['metadata'].pop('training_architecture', None)
        else: c[k] = v
    return json.dumps(c)

BAD_INPUTS = [
    (lambda: make_sae('standard', -4, 8), "d_in must be an int >= 1; got -4."),
    (lambda: make_sae('standard', 4, '8'), "d_sae must be an int >= 1; got '8'."),
    (lambda: make_sae('standard', 4, 0), "d_sae must be an int >= 1; got 0."),
    (lambda: make_sae('standard', 4, 8, dtype='float33'), "dtype='float33'; valid: ['float32', 'float64', 'float16', 'bfloat16']"),
    (lambda: make_sae('topk', 4, 8, k=0), "topk needs 0 < k <= d_sae=8; got k=0"),
    (lambda: make_sae('topk', 4, 8, k=9), "topk needs 0 < k <= d_sae=8; got k=9"),
    (lambda: make_sae('batchtopk', 4, 8, k='2'), "k must be None or an int >= 0; got '2'."),
    (lambda: _sae('standard').loss(torch.randn(3, 4)), "The data has rows 4 wide, but this SAE reads d_in=6."),
    (lambda: load_sae(_folder('{"architecture": "standard", "d_in": 6, "d_s')), "cfg.json is not valid JSON"),
    (lambda: load_sae(_folder('architecture = standard')), "cfg.json is not valid JSON"),
    (lambda: load_sae(_folder('[6, 24]')), "cfg.json is not an SAE config: it needs a JSON object with d_in, d_sae and architecture."),
    (lambda: load_sae(_folder(_cfg(architecture=None))), "cfg.json names no architecture; add \"architecture\": one of"),
    (lambda: load_sae(_folder(_cfg(d_sae='24'))), "cfg.json: d_sae must be an int >= 1; got '24'."),
    (lambda: load_sae(_folder(weights=lambda p: p.read_bytes()[:40])), "sae_weights.safetensors cannot be read"),
]

@pytest.mark.parametrize('call,msg', BAD_INPUTS, ids=[m[:40] for _, m in BAD_INPUTS])
def test_bad_inputs_sae(call, msg):
    with pytest.raises(ValueError) as e: call()
    assert msg in str(e.value), str(e.value)
    if 'cfg.json' in msg or 'safetensors' in msg:                                # the file is named by its path
        import tempfile; assert tempfile.gettempdir() in str(e.value)
