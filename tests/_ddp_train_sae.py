"Run by tests/test_sae_train.py under `torchrun --nproc_per_node 2`: trains a small SAE with gloo DDP, rank 0 saves the weights"
import sys, torch, torch.distributed as dist
from headscope.sae.core import make_sae
from headscope.sae.train import train_sae

def setup(arch):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 12, generator=g) @ torch.randn(12, 12, generator=g) + 1.
    sae = make_sae(arch, 12, 40, k=3, seed=0, dead_tokens=128, l1_coeff=1e-2)
    with torch.no_grad(): sae.b_enc[:8] = -20.     # latents that start dead: AuxK / resampling and the counters matter
    return X, sae

KW = dict(n_tokens=64 * 12, batch_size=64, lr=3e-3, lr_warmup=2, progress=False, log_every=1, resample_every=5)

if __name__ == '__main__':
    out = sys.argv[1]
    dist.init_process_group('gloo')
    res = {}
    for arch in ('topk', 'standard'):
        X, sae = setup(arch)
        log = train_sae(sae, X, **KW)
        res[arch] = dict(state={k: v.clone() for k, v in sae.state_dict().items()}, tsf=sae.tokens_since_fired.clone(), history=log.history)
    if dist.get_rank() == 0: torch.save(res, out)
    dist.barrier()                   # neither rank tears gloo down while the other still talks to it (SIGABRT under load)
    dist.destroy_process_group()
