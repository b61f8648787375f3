"SAE trainer: DDP (2 gloo processes) against one process, exact resume, checkpoint format"
import os, subprocess, sys, shutil
from pathlib import Path
import pytest, torch
from headscope.sae.core import make_sae, load_sae
from headscope.sae.train import train_sae, latest_checkpoint, lr_at

sys.path.insert(0, str(Path(__file__).parent))
from _ddp_train_sae import setup, KW

@pytest.fixture(scope='module')
def ddp_result(tmp_path_factory):
    "One `torchrun --nproc_per_node 2` launch (gloo, CPU) trains a TopK and a standard SAE"
    torchrun = shutil.which('torchrun') or str(Path(sys.executable).parent / 'torchrun')
    out = tmp_path_factory.mktemp('ddp') / 'ddp.pt'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([torchrun, '--nproc_per_node', '2', '--master_port', str(29500 + os.getpid() % 1000),
                        str(Path(__file__).parent / '_ddp_train_sae.py'), str(out)],
                       capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=True)

@pytest.mark.parametrize('arch', ['topk', 'standard'])
def test_ddp_two_gloo_processes_match_one(arch, ddp_result):
    ddp = ddp_result[arch]
    X, sae = setup(arch)
    log = train_sae(sae, X, **KW)
    for k, v in sae.state_dict().items(): torch.testing.assert_close(ddp['state'][k], v, atol=1e-6, rtol=1e-5, msg=k)
    assert torch.equal(ddp['tsf'], sae.tokens_since_fired)
    assert max(h['dead_frac'] for h in log.history) > 0         # the dead-latent path was exercised
    for a, b in zip(ddp['history'], log.history): assert a['l0'] == pytest.approx(b['l0'], abs=1e-4)

def _toy(n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g) @ torch.randn(10, 10, generator=g)

@pytest.mark.parametrize('arch', ['topk', 'batchtopk', 'jumprelu', 'standard'])
def test_exact_resume_after_max_steps(arch, tmp_path):
    X = _toy()
    def run(d, **kw):
        s = make_sae(arch, 10, 30, k=3, seed=1, dead_tokens=200, l1_coeff=1e-2)
        train_sae(s, X, n_tokens=100 * 11, batch_size=100, lr=5e-3, lr_warmup=2, l1_warmup=3, checkpoint_dir=d,
                  progress=False, resample_every=4, **kw)
        return s
    ref = run(tmp_path / 'a')
    run(tmp_path / 'b', max_steps=5)
    assert latest_checkpoint(tmp_path / 'b').name == 'step_5'
    res = run(tmp_path / 'b')
    for (k, v), w in zip(ref.state_dict().items(), res.state_dict().values()): assert torch.equal(v, w), k
    assert torch.equal(ref.tokens_since_fired, res.tokens_since_fired)
    st = torch.load(tmp_path / 'b' / 'step_11' / 'trainer.pt', weights_only=True)
    assert st['step'] == 11 and set(st) >= {'optimizer', 'rng', 'tokens_since_fired', 'history', 'data_rows'}
    back = load_sae(tmp_path / 'b' / 'step_11')
    assert torch.equal(back.W_dec, ref.W_dec.detach())

def test_unit_norm_and_parallel_gradient_removed():
    X = _toy()
    s = make_sae('topk', 10, 30, k=3, seed=0)
    train_sae(s, X, n_tokens=400, batch_size=100, lr=1e-2, progress=False)
    torch.testing.assert_close(s.W_dec.detach().norm(dim=-1), torch.ones(30), atol=1e-6, rtol=0)
    s = make_sae('standard', 10, 30, seed=0)                   # free decoder norms (weighted L1)
    train_sae(s, X, n_tokens=400, batch_size=100, lr=1e-2, progress=False)
    assert (s.W_dec.detach().norm(dim=-1) - 1).abs().max() > 1e-3

def test_lr_schedule():
    assert [lr_at(s, 5, 1., warmup=0, decay=0.4) for s in range(5)] == [1., 1., 1., 1., .5]
    assert lr_at(0, 100, 2., warmup=4) == 0.5

def test_errors():
    X = _toy()
    with pytest.raises(TypeError, match='data must be a Tensor'): train_sae(make_sae('topk', 10, 30, k=3), 5, 100)
    with pytest.raises(ValueError, match='as many rows'): train_sae(make_sae('topk', 10, 30, k=3), (X, X[:5]), 100)

@pytest.mark.parametrize('width', [32, 96])
def test_wrong_width_refused_not_regrouped(width):
    "A d_in=64 SAE fed 32- or 96-wide rows: refused with both widths, from a tensor and from a stream"
    X = torch.randn(200, width)
    for data in (X, [X[:100], X[100:]]):
        s = make_sae('topk', 64, 32, k=4, seed=0); w0 = s.W_dec.detach().clone()
        with pytest.raises(ValueError, match=f"rows {width} wide.*but this SAE reads d_in=64"): train_sae(s, data, 256, batch_size=64, progress=False)
        assert torch.equal(s.W_dec, w0)                                     # refused before any step

def test_refuses_nonfinite_and_bad_sizes():
    X = torch.randn(200, 10)
    with pytest.raises(ValueError, match='1 NaN/inf values'): train_sae(make_sae('topk', 10, 30, k=3), X.index_put((torch.tensor([5]), torch.tensor([2])), torch.tensor(float('nan'))), 100, progress=False)
    with pytest.raises(ValueError, match='NaN/inf values at step 0'): train_sae(make_sae('topk', 10, 30, k=3), [torch.full((100, 10), float('inf'))], 100, batch_size=50, progress=False)
    s = make_sae('topk', 10, 30, k=3)
    with torch.no_grad(): s.W_enc[0, 0] = float('inf')
    with pytest.raises(ValueError, match=r"\['W_enc'\] hold NaN or inf"): train_sae(s, X, 100, progress=False)
    for kw, msg in ((dict(batch_size=0), 'batch_size must be a positive int'), (dict(n_tokens=0), 'n_tokens must be a positive int'),
                    (dict(log_every=0), 'log_every must be a positive int')):
        with pytest.raises(ValueError, match=msg): train_sae(make_sae('topk', 10, 30, k=3), X, **{'n_tokens': 100, **kw}, progress=False)

def test_resume_skips_damaged_checkpoint_and_refuses_changes(tmp_path):
    X = _toy()
    def run(arch='topk', k=3, d_in=10, data=X, **kw):
        s = make_sae(arch, d_in, 30, k=k, seed=1)
        return s, train_sae(s, data, n_tokens=100 * 6, batch_size=100, lr=5e-3, checkpoint_dir=tmp_path / 'c', checkpoint_every=2,
                            progress=False, **kw)
    ref, _ = run(max_steps=4)                                              # step_2 and step_4
    bad = tmp_path / 'c' / 'step_4' / 'trainer.pt'
    bad.write_bytes(bad.read_bytes()[:64])
    with pytest.warns(UserWarning, match=f"cannot read {bad}"): s, log = run()
    assert log.resumed_from == 2 and latest_checkpoint(tmp_path / 'c').name == 'step_6'
    for kw, what in ((dict(k=4), "k 3 → 4"), (dict(arch='batchtopk'), "architecture 'topk' → 'batchtopk'"),
                     (dict(d_in=12, data=torch.randn(500, 12)), "d_in 10 → 12"), (dict(data=X + 1), "data '1024 rows × 10")):
        with pytest.raises(ValueError, match="changed \\(saved → now\\):.*" + what.replace('(', '\\(')): run(**kw)
    assert not list((tmp_path / 'c').glob('*.tmp'))                        # written atomically: no temp folder left
