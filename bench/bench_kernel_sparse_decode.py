"""Bench `headscope.kernels.sae_decode` (Triton gather decode) against embedding_bag and the dense decode.

    python bench/bench_kernel_sparse_decode.py              # on a CUDA GPU (H100/H200), ~1 min
    python bench/bench_kernel_sparse_decode.py --cpu-smoke  # correctness only, small, Triton interpreter on CPU

Size of the issue: n 4096 tokens, d 2048, d_sae 32768, k 64, W_dec fp32 and bf16 (W_dec is 268 MB in fp32, 4.5x
the 60 MB L2), plus a SmolLM2-sized SAE (d 576, d_sae 4608, k 32) and the ragged (BatchTopK) layout. Each row
prints the median time (triton.testing.do_bench), the achieved GB/s counting the gathered rows once per use
(n·k·d·bytes + vals/idx + output), the floor at 4.3 TB/s for (a) every row read once (W_dec + output: the best
case) and (b) every gather from HBM, and the speed-up over embedding_bag and the dense `acts @ W_dec`.
Imports only torch, triton, numpy and headscope.kernels.
"""
import argparse, os, sys

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--cpu-smoke", action="store_true", help="check correctness on small CPU tensors under TRITON_INTERPRET=1")
ap.add_argument("--no-sweep", action="store_true", help="skip the tile-size sweep")
args = ap.parse_args()
if args.cpu_smoke: os.environ["TRITON_INTERPRET"] = "1"   # before any @triton.jit is defined

import torch
import headscope.kernels as K
from headscope.kernels.sae_decode import sparse_decode_reference
HBM = 4.3e12   # H200 measured copy bandwidth, bytes/s

def make(n, k, d_sae, d, dtype, dev, seed=0, ragged=False):
    g = torch.Generator(device=dev).manual_seed(seed)
    W = (torch.randn(d_sae, d, device=dev, generator=g) / d ** 0.5).to(dtype)
    vals = torch.rand(n, k, device=dev, generator=g).to(dtype)
    idx = torch.randint(0, d_sae, (n, k), device=dev, generator=g)
    if not ragged: return vals, idx, W, None
    lens = torch.randint(k // 2, 3 * k // 2 + 1, (n,), device=dev, generator=g)   # BatchTopK: k per row on average
    nnz = int(lens.sum())
    vals = torch.rand(nnz, device=dev, generator=g).to(dtype)
    idx = torch.randint(0, d_sae, (nnz,), device=dev, generator=g)
    return vals, idx, W, torch.cumsum(lens, 0) - lens

def rel(a, b): return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

def check(vals, idx, W, off):
    "Relative errors of Triton vs the reference: output, grad_vals, grad_W_dec"
    out = {}
    for name, fn in (("triton", K.sparse_decode_triton), ("torch", sparse_decode_reference)):
        # embedding_bag has no bf16 per_sample_weights backward on CUDA: the reference runs in fp32 on the same numbers
        up = (lambda t: t.float()) if name == "torch" and vals.dtype == torch.bfloat16 else (lambda t: t)
        v, w = up(vals).clone().requires_grad_(), up(W).clone().requires_grad_()
        y = fn(v, idx, w, off)
        torch.manual_seed(1); gy = torch.randn(y.shape, device=y.device).to(vals.dtype).to(y.dtype)   # same numbers for both
        y.backward(gy)
        out[name] = (y.detach(), v.grad, w.grad)
    return [rel(a, b) for a, b in zip(out["triton"], out["torch"])]

def smoke():
    assert K.HAS_TRITON, "the smoke test needs triton"
    print("cpu smoke (Triton interpreter): relative error vs embedding_bag   out / grad_vals / grad_W_dec")
    for ragged in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            errs = check(*make(33, 5, 300, 130, dtype, "cpu", ragged=ragged))
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            print(f"  {'ragged' if ragged else 'fixed k':8s} {str(dtype):15s} " + "  ".join(f"{e:.2e}" for e in errs))
            assert max(errs) < tol, f"relative error {max(errs):.2e} over {tol}"
    print("ok")

def gpu():
    import triton
    from triton.testing import do_bench
    from headscope.kernels.sae_decode import _launch_fwd, _launch_bwd
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    torch.backends.cuda.matmul.allow_tf32 = False   # fp32 dense decode in true fp32, as the kernel computes
    peer = None
    try:
        from sparsify.utils import decoder_impl as peer; peer_name = "sparsify"
    except Exception:
        try: from sae.utils import decoder_impl as peer; peer_name = "EleutherAI sae"
        except Exception: print("peer kernel (EleutherAI sparsify/sae TritonDecoder): not installed, skipped")

    sizes = [("SmolLM2 SAE", 4096, 32, 4608, 576), ("issue size", 4096, 64, 32768, 2048)]
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(20): x @ x                          # warm the clocks up before the first timing
    torch.cuda.synchronize(); del x
    print("\ncorrectness at the bench sizes: relative error vs embedding_bag (out, grad_vals, grad_W_dec)")
    for label, n, k, d_sae, d in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            for ragged in (False, True):
                errs = check(*make(n, k, d_sae, d, dtype, "cuda", ragged=ragged))
                print(f"  {label:12s} {str(dtype)[6:]:9s} {'ragged' if ragged else 'fixed':6s} " + "  ".join(f"{e:.1e}" for e in errs))
                assert max(errs) < (1e-5 if dtype == torch.float32 else 2e-2), errs

    hdr = f"{'case':40s} {'ms':>8s} {'GB/s':>7s} {'floor1':>7s} {'floorH':>7s} {'vs ebag':>8s} {'vs dense':>9s}"
    for label, n, k, d_sae, d in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            b = torch.finfo(dtype).bits // 8
            vals, idx, W, _ = make(n, k, d_sae, d, dtype, "cuda")
            acts = torch.zeros(n, d_sae, device="cuda", dtype=dtype).scatter_(1, idx, vals)
            moved = n * k * d * b + n * k * (b + 8) + n * d * b                  # gathers + code + output
            f1, fH = (d_sae * d * b + n * d * b) / HBM * 1e3, moved / HBM * 1e3  # floors, ms
            print(f"\n{label}: n {n}, k {k}, d_sae {d_sae}, d {d}, W_dec {str(dtype)[6:]}; FLOP ratio dense/sparse = d_sae/k = {d_sae // k}x")
            print(hdr)
            t = {}
            t["fwd triton"] = do_bench(lambda: K.sparse_decode_triton(vals, idx, W))
            t["fwd ebag"] = do_bench(lambda: sparse_decode_reference(vals, idx, W))
            t["fwd dense"] = do_bench(lambda: acts @ W)
            if peer is not None: t[f"fwd {peer_name}"] = do_bench(lambda: peer(idx, vals, W.mT))
            v, w, a = vals.clone().requires_grad_(), W.clone().requires_grad_(), acts.clone().requires_grad_()
            gy = torch.randn(n, d, device="cuda", dtype=dtype)
            t["fwd+bwd triton"] = do_bench(lambda: K.sparse_decode_triton(v, idx, w).backward(gy), grad_to_none=[v, w])
            try: t["fwd+bwd ebag"] = do_bench(lambda: sparse_decode_reference(v, idx, w).backward(gy), grad_to_none=[v, w])
            except (NotImplementedError, RuntimeError) as e:   # bf16 on CUDA: no per_sample_weights backward
                print(f"fwd+bwd ebag: {str(e)[:70]}"); t["fwd+bwd ebag"] = float("nan")
            t["fwd+bwd dense"] = do_bench(lambda: (a @ w).backward(gy), grad_to_none=[a, w])
            for name, ms in t.items():
                if ms != ms: continue
                bwd = name.startswith("fwd+bwd")
                gbs = moved * (3 if bwd else 1) / ms / 1e6   # bwd: gathers again + atomics of the same size
                base = "fwd+bwd " if bwd else "fwd "
                print(f"{name:40s} {ms:8.3f} {gbs:7.0f} {f1 * (3 if bwd else 1):7.3f} {fH * (3 if bwd else 1):7.3f} "
                      f"{t[base + 'ebag'] / ms:7.2f}x {t[base + 'dense'] / ms:8.2f}x")
            vr, ir, Wr, offr = make(n, k, d_sae, d, dtype, "cuda", ragged=True)
            ms = do_bench(lambda: K.sparse_decode_triton(vr, ir, Wr, offr)); mr = do_bench(lambda: sparse_decode_reference(vr, ir, Wr, offr))
            print(f"{'fwd triton ragged (BatchTopK)':40s} {ms:8.3f} {moved / ms / 1e6:7.0f} {f1:7.3f} {fH:7.3f} {mr / ms:7.2f}x")
            del acts, a, v, w
            if args.no_sweep or label != "issue size": continue
            print("tile sweep (fwd ms, fwd+bwd-only-kernel ms): block_n, block_d, num_warps")
            # block_n 32 in the ragged form (the grad_W_dec pass) crashed Triton 3.6's TritonGPURemoveLayoutConversions on an H200
            for bn, bd, nw in [(16, 64, 2), (16, 128, 4), (16, 256, 4), (16, 128, 8)]:
                f = do_bench(lambda: _launch_fwd(vals, idx, W, None, bn, bd, nw))
                bk = do_bench(lambda: _launch_bwd(gy, vals, idx, W, None, True, True, bn, bd, nw))
                print(f"  {bn:3d} {bd:4d} {nw:2d}   fwd {f:7.3f}   bwd {bk:7.3f}")

if __name__ == "__main__":
    if args.cpu_smoke: smoke()
    elif not torch.cuda.is_available(): sys.exit("bench_kernel_sparse_decode needs a CUDA GPU; run with --cpu-smoke for the correctness check on CPU")
    elif not K.HAS_TRITON: sys.exit("bench_kernel_sparse_decode needs triton (pip install triton)")
    else: gpu()
