"""`scale_rows(x, s) = x * s[:, None]`: the smallest op that exercises the kernel/reference dispatch.

One file per op, as in Liger-Kernel and the Triton tutorials: the torch reference (the
specification), the `@triton.jit` kernel, its launcher and the autograd wrapper. The Triton
parts exist only when triton imports. Both paths compute in fp32 and return `x`'s dtype.
"""
import torch
from torch import Tensor
from . import has_triton, pick

__all__ = ["scale_rows", "scale_rows_reference"]

def _check(x, s):
    if x.ndim != 2 or s.ndim != 1 or s.shape[0] != x.shape[0]:
        raise ValueError(f"scale_rows wants x [N, D] and s [N], got x {tuple(x.shape)} and s {tuple(s.shape)}")

def scale_rows_reference(x:Tensor,  # [N D]
                         s:Tensor,  # [N] one scale per row
                        )->Tensor:  # [N D] x * s[:, None], in x's dtype
    "Pure-torch reference: every row of `x` times its scale, computed in fp32"
    _check(x, s)
    return (x.float() * s.float()[:, None]).to(x.dtype)

def scale_rows(x:Tensor,                # [N D]
               s:Tensor,                # [N] one scale per row
               force:str|None=None,     # None (automatic), 'triton' or 'torch'
              )->Tensor:                # [N D]
    "`x * s[:, None]`: Triton on CUDA, the torch reference elsewhere (see `headscope.kernels.pick`)"
    return pick("scale_rows", x, s, force=force)(x, s)

if has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _scale_rows_kernel(x_ptr, s_ptr, out_ptr, N, D,
                           stride_xn, stride_xd, stride_s, stride_on, stride_od,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # one program per [BLOCK_N, BLOCK_D] tile; masks cover the ragged edges
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = (rn[:, None] < N) & (rd[None, :] < D)
        x = tl.load(x_ptr + rn[:, None] * stride_xn + rd[None, :] * stride_xd, mask=mask, other=0.0)
        s = tl.load(s_ptr + rn * stride_s, mask=rn < N, other=0.0)
        # upcast: bf16 arithmetic is wrong under the interpreter, and fp32 matches the reference
        y = x.to(tl.float32) * s.to(tl.float32)[:, None]
        tl.store(out_ptr + rn[:, None] * stride_on + rd[None, :] * stride_od, y.to(out_ptr.dtype.element_ty), mask=mask)

    def _pow2_at_least_16(n): return n >= 16 and (n & (n - 1)) == 0

    def _launch(x:Tensor, s:Tensor, block_n:int=16, block_d:int|None=None)->Tensor:
        "Launch `_scale_rows_kernel` on a 2D grid of tiles; tile sizes must be powers of two >= 16"
        _check(x, s)
        N, D = x.shape
        if block_d is None: block_d = min(max(triton.next_power_of_2(D), 16), 1024)  # few, large tiles
        # tiles under 16 run in the interpreter but do not compile for a GPU: refuse them everywhere
        assert _pow2_at_least_16(block_n) and _pow2_at_least_16(block_d), f"BLOCK sizes must be powers of two >= 16, got {block_n}, {block_d}"
        out = torch.empty_like(x)
        if out.numel() == 0: return out
        grid = (triton.cdiv(N, block_n), triton.cdiv(D, block_d))
        _scale_rows_kernel[grid](x, s, out, N, D, x.stride(0), x.stride(1), s.stride(0), out.stride(0), out.stride(1),
                                 BLOCK_N=block_n, BLOCK_D=block_d)
        return out

    class _ScaleRows(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, s):
            ctx.save_for_backward(x, s)
            return _launch(x, s)

        @staticmethod
        def backward(ctx, g):
            x, s = ctx.saved_tensors
            gx = _launch(g, s) if ctx.needs_input_grad[0] else None                      # d(x*s)/dx = s
            gs = (g.float() * x.float()).sum(1).to(s.dtype) if ctx.needs_input_grad[1] else None  # d/ds = sum_d g*x
            return gx, gs

    def scale_rows_triton(x:Tensor,  # [N D] on CUDA, or on CPU under TRITON_INTERPRET=1
                          s:Tensor,  # [N]
                         )->Tensor:  # [N D]
        "Triton version of `scale_rows_reference`, same signature, differentiable"
        return _ScaleRows.apply(x, s)

    __all__ += ["scale_rows_triton"]
