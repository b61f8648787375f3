#!/usr/bin/env python
"""Checkpoint parity with SAELens (PyPI `sae-lens`, read from v6.54.12): both directions, every architecture.

SAELens lives in its own venv (it pulls transformer-lens and its own transformers):

    python -m venv /tmp/slv && /tmp/slv/bin/pip install torch==2.13.0 && /tmp/slv/bin/pip install sae-lens
    .venv/bin/python bench/sae_saelens_parity.py --saelens-python /tmp/slv/bin/python

(a) headscope writes standard/topk/batchtopk/jumprelu with `save_sae`; SAELens `SAE.load_from_disk` reads them
    (batchtopk comes back as SAELens' JumpReLUSAE) and encodes/decodes the same inputs.
(b) SAELens writes StandardSAE/TopKSAE/JumpReLUSAE with `save_model`; headscope `load_sae` reads them.
Prints, per case, whether the encodings are bit-identical and the largest difference."""
import argparse, subprocess, sys, tempfile, textwrap
from pathlib import Path
import torch
from headscope.sae.core import make_sae, save_sae, load_sae

ARCHS = ['standard', 'topk', 'batchtopk', 'jumprelu']

SL_READ = textwrap.dedent('''
    import sys, torch, warnings; warnings.filterwarnings('ignore')
    from sae_lens import SAE
    d = sys.argv[1]; x = torch.load(f'{d}/x.pt')
    for a in %r:
        s = SAE.load_from_disk(f'{d}/{a}'); f, r = torch.load(f'{d}/{a}.out.pt')
        with torch.no_grad(): g = s.encode(x); rr = s.decode(g)
        print(f'(a) {a:9s} -> SAELens {type(s).__name__:12s} encode identical={torch.equal(g, f)} '
              f'max|d|={(g - f).abs().max().item():.2e} recon max|d|={(rr - r).abs().max().item():.2e} nnz={int((f != 0).sum())}')
''') % ARCHS

SL_WRITE = textwrap.dedent('''
    import sys, torch, warnings; warnings.filterwarnings('ignore')
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig, JumpReLUSAE, JumpReLUSAEConfig
    d = sys.argv[1]; torch.manual_seed(1); x = torch.load(f'{d}/x.pt')
    for n, cls, cfg in [('standard', StandardSAE, StandardSAEConfig(d_in=16, d_sae=48)),
                        ('topk', TopKSAE, TopKSAEConfig(d_in=16, d_sae=48, k=5)),
                        ('jumprelu', JumpReLUSAE, JumpReLUSAEConfig(d_in=16, d_sae=48))]:
        s = cls(cfg)
        with torch.no_grad():
            for p in s.parameters(): p.normal_(0, 0.3)
            if n == 'jumprelu': s.threshold.abs_()
        s.save_model(f'{d}/sl_{n}')
        with torch.no_grad(): torch.save(s.encode(x), f'{d}/sl_{n}.pt')
''')

def main(py):
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        x = torch.randn(64, 16); torch.save(x, f'{d}/x.pt')
        for a in ARCHS:
            s = make_sae(a, 16, 48, seed=0, k=4, hook_name='blocks.2.hook_resid_post', model_name='SmolLM2-135M')
            with torch.no_grad():
                s.b_enc.normal_(0, 0.3); s.b_dec.normal_(); s.W_enc.add_(torch.randn_like(s.W_enc) * 0.1)
                if a == 'jumprelu': s.threshold.uniform_(0, 0.3)
            if a == 'batchtopk': s.loss(x)   # a learned threshold
            s.eval(); save_sae(s, f'{d}/{a}')
            with torch.no_grad(): torch.save((s.encode(x), s(x)), f'{d}/{a}.out.pt')
        print(subprocess.run([py, '-c', SL_READ, d], capture_output=True, text=True, check=True).stdout, end='')
        subprocess.run([py, '-c', SL_WRITE, d], capture_output=True, text=True, check=True)
        for n in ['standard', 'topk', 'jumprelu']:
            s, f = load_sae(f'{d}/sl_{n}'), torch.load(f'{d}/sl_{n}.pt')
            with torch.no_grad(): g = s.encode(x)
            print(f'(b) SAELens {n:9s} -> headscope {type(s).__name__:12s} encode identical={torch.equal(g, f)} '
                  f'max|d|={(g - f).abs().max().item():.2e}')

if __name__ == '__main__':
    ap = argparse.ArgumentParser(); ap.add_argument('--saelens-python', default='/tmp/slv/bin/python')
    main(ap.parse_args().saelens_python)
