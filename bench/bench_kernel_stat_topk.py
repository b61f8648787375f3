"""Bench `headscope.kernels.stat_threshold`: the Triton kernel vs the torch reference vs an exact `torch.topk` (+ scatter).

GPU only (CUDA): `python bench/bench_kernel_stat_topk.py`. `--cpu-smoke` runs the correctness part on small CPU
tensors in the Triton interpreter instead (no timings). Imports only torch, triton, numpy and headscope.kernels.

For each size (n 4096 x d 16384 and n 32768 x d 4608, fp32 and bf16, k 32) it first checks the kernel against the
reference on the full tensors (θ relative error, fraction of elements whose keep decision differs, values) and
prints that; then it times with `triton.testing.do_bench` (median ms):
- forward: stat_topk (Triton), stat_topk_reference (torch), torch.topk(x, k) + scatter into a dense zero tensor;
- backward: the Triton `dx = g·1[x>θ]` kernel vs the same in torch (`torch.where`).
GB/s counts the bytes any forward must move, 1 read + 1 write of n·d elements (+ θ), whichever path the kernel takes
(a row in one tile is read once; a row in several tiles is read twice, the second time mostly from L2); backward
2 reads + 1 write. The floor is those bytes at ~4.3 TB/s (H200 copy bandwidth).
"""
import os, sys, argparse
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--cpu-smoke", action="store_true", help="correctness only, small CPU tensors, Triton interpreter")
ap.add_argument("--k", type=int, default=32)
ap.add_argument("--sweep", action="store_true", help="also time the forward kernel over tile sizes and warps (GPU)")
args = ap.parse_args()
if args.cpu_smoke: os.environ["TRITON_INTERPRET"] = "1"      # before any kernel module is imported

import torch
if not args.cpu_smoke and not torch.cuda.is_available():
    sys.exit("bench_kernel_stat_topk needs a CUDA GPU (or run it with --cpu-smoke for a correctness check on CPU)")
import headscope.kernels as K
if not K.HAS_TRITON: sys.exit("bench_kernel_stat_topk needs triton (`pip install triton`)")
import triton
from headscope.kernels.stat_threshold import stat_topk_reference, stat_topk_triton, _launch_bwd, _launch_fwd

BW = 4.3e12   # B/s, measured H200 copy bandwidth
DEV = "cpu" if args.cpu_smoke else "cuda"
SIZES = [(8, 300), (4, 4608), (3, 16384 + 77)] if args.cpu_smoke else [(4096, 16384), (32768, 4608)]
DTYPES = [torch.float32, torch.bfloat16]

def topk_dense(x, k):
    "Exact top-k as a dense tensor (zeros elsewhere): what a TopK SAE computes before its ReLU"
    v, i = x.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(x).scatter_(-1, i, v)

def check(x, k):
    "Kernel vs reference on the full tensor: θ rel. error, keep decisions that differ, value error on agreeing ones"
    out = {}
    for soft in (False, True):
        v, t = stat_topk_triton(x, k, soft)
        rv, rt = stat_topk_reference(x, k, soft)
        same = (v != 0) == (rv != 0)
        out[soft] = dict(theta_rel=((t - rt).abs() / rt.abs().clamp_min(1e-30)).max().item(),
                         flips=1 - same.float().mean().item(),
                         val_err=(v.float() - rv.float())[same].abs().max().item() if same.any() else 0.)
    kept = (stat_topk_triton(x, k)[0] != 0).sum(-1).float()
    ex = topk_dense(x, k) != 0
    recall = ((stat_topk_triton(x, k)[0] != 0) & ex).sum(-1).float().mean().item() / k
    return out, kept.mean().item(), recall

def ms(fn): return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

def main():
    k = args.k
    print(f"stat_topk bench on {torch.cuda.get_device_name() if DEV == 'cuda' else 'CPU (Triton interpreter, correctness only)'}; "
          f"k={k}; torch {torch.__version__}, triton {triton.__version__}")
    rows = []
    for (n, d) in SIZES:
        for dt in DTYPES:
            g = torch.Generator(device=DEV).manual_seed(0)
            x = torch.randn(n, d, device=DEV, generator=g).to(dt)
            res, kept, recall = check(x, k)
            el = x.element_size()
            print(f"\n[{n} x {d} {str(dt)[6:]}] {n * d * el / 1e6:.0f} MB; correctness vs reference: "
                  + "; ".join(f"{'soft' if s else 'hard'}: θ rel err {r['theta_rel']:.1e}, keep flips {r['flips']:.1e}, "
                              f"value err {r['val_err']:.1e}" for s, r in res.items())
                  + f"; Gaussian rows: kept {kept:.1f} per row (k={k}), recall@k {recall:.3f}")
            bad = [s for s, r in res.items() if r["theta_rel"] > 1e-4 or r["flips"] > 1e-4]
            if bad: print(f"  !! the kernel disagrees with the reference ({'soft' if bad[0] else 'hard'}): not timing this size"); continue
            if DEV == "cpu": continue
            b_fwd = 2 * n * d * el + 4 * n
            b_bwd = 3 * n * d * el + 4 * n
            t_tri = ms(lambda: stat_topk_triton(x, k))
            t_tri_soft = ms(lambda: stat_topk_triton(x, k, True))
            t_ref = ms(lambda: stat_topk_reference(x, k))
            t_topk = ms(lambda: topk_dense(x, k))
            gy = torch.randn_like(x)
            theta = stat_topk_triton(x, k)[1]
            t_bwd = ms(lambda: _launch_bwd(gy, x, theta))
            t_bwd_ref = ms(lambda: torch.where(x > theta[:, None], gy, torch.zeros((), device=DEV, dtype=x.dtype)))
            floor_f, floor_b = b_fwd / BW * 1e3, b_bwd / BW * 1e3
            for name, t, b, fl in [("stat_topk triton (hard)", t_tri, b_fwd, floor_f), ("stat_topk triton (soft)", t_tri_soft, b_fwd, floor_f),
                                   ("stat_topk torch reference", t_ref, b_fwd, floor_f), ("torch.topk + scatter (exact)", t_topk, b_fwd, floor_f),
                                   ("backward triton", t_bwd, b_bwd, floor_b), ("backward torch.where", t_bwd_ref, b_bwd, floor_b)]:
                rows.append((f"{n}x{d}", str(dt)[6:], name, t, b / t / 1e6, fl, t / fl, t / (t_tri if "backward" not in name else t_bwd)))
    if rows:
        print(f"\n{'size':>11} {'dtype':>8} {'op':<30} {'ms':>8} {'GB/s':>7} {'floor ms':>9} {'x floor':>8} {'x triton':>9}")
        for r in rows: print(f"{r[0]:>11} {r[1]:>8} {r[2]:<30} {r[3]:8.3f} {r[4]:7.0f} {r[5]:9.3f} {r[6]:8.2f} {r[7]:9.2f}")
        print("\nGB/s and the floor count the bytes any implementation must move (forward 1 read + 1 write, backward "
              "2 reads + 1 write) for every row, so torch rows show the rate they would need to match.")
    if args.sweep and DEV == "cuda": sweep(k)
    print("peer kernels: none on pip implements a statistical top-k (Spark Transformer's code is not packaged): skipped")

def sweep(k):
    "Forward kernel time over (BLOCK_N, BLOCK_D, num_warps): the defaults should be near the best"
    print(f"\nsweep (forward, hard, median ms; see `_tiles` in kernels/stat_threshold.py for the default)")
    for (n, d) in SIZES:
        for dt in DTYPES:
            x = torch.randn(n, d, device=DEV).to(dt)
            res = []
            for bd in (1024, 2048, 4096, 8192, 16384, 32768):
                if bd > 2 * triton.next_power_of_2(d): continue
                for w in (4, 8, 16):
                    for bn in (1, 2):
                        if bn * bd > 32768 or (bd >= 16384 and w < 8): continue
                        try: t = ms(lambda: _launch_fwd(x, k, False, block_n=bn, block_d=bd, max_block_d=bd, num_warps=w))
                        except Exception as e: print(f"  {bn} {bd} {w}: {type(e).__name__}"); continue
                        res.append((t, bn, bd, w))
            res.sort()
            print(f"  {n}x{d} {str(dt)[6:]}: default {ms(lambda: _launch_fwd(x, k, False)):.3f}; best "
                  + ", ".join(f"{t:.3f} (BN={bn} BD={bd} w={w})" for t, bn, bd, w in res[:5]))

if __name__ == "__main__": main()
