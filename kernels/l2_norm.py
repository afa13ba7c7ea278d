"""Gated DeltaNet's L2 norm of q and k in Triton, one pass forward and one backward: nirvana.l2_normalize.

  y = x / max(||x||, eps)       per row of D values (D = one head's Dk), eps 1e-12 as F.normalize's

The norm runs in float32 and y is rounded once to the output dtype. The plain twin (F.normalize of a float32
copy of x) keeps that copy for backward, 4 bytes per value; here backward needs only y, which the delta rule
keeps of q and k anyway, and one float32 ||x|| per row:

  dx = (dy - y <dy, y>) / ||x||     (dx = dy / eps where ||x|| < eps: the clamped norm is a constant)

One program normalises BLOCK_ROWS rows, forward and backward. BLOCK_D = D rounded up to a power of two;
BLOCK_ROWS = 4096 // BLOCK_D, between 1 and 16 (at most 8 under the interpreter). test_kernels_fused.py
compares both with the twin.
"""

import torch
import triton
import triton.language as tl

from kernels.common import INTERPRET, load_rows, store_rows

EPS = tl.constexpr(1e-12)  # F.normalize's default


@triton.jit
def _l2_norm_fwd(X, Y, NORM, n_rows, D, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < n_rows, cols < D
    x = load_rows(X, rows, cols, D, row_ok, col_ok).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=1))  # (BLOCK_ROWS,)
    store_rows(Y, x / tl.maximum(norm, EPS)[:, None], rows, cols, D, row_ok, col_ok)
    tl.store(NORM + rows, norm, mask=row_ok)


@triton.jit
def _l2_norm_bwd(Y, NORM, DY, DX, n_rows, D, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < n_rows, cols < D
    y = load_rows(Y, rows, cols, D, row_ok, col_ok).to(tl.float32)
    dy = load_rows(DY, rows, cols, D, row_ok, col_ok).to(tl.float32)
    norm = tl.load(NORM + rows, mask=row_ok, other=1.0)
    projection = tl.where(norm >= EPS, tl.sum(dy * y, axis=1), 0.0)  # no gradient through a clamped norm
    dx = (dy - y * projection[:, None]) / tl.maximum(norm, EPS)[:, None]
    store_rows(DX, dx, rows, cols, D, row_ok, col_ok)


def _launch(n_rows, D):
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_ROWS = max(1, min(8 if INTERPRET else 16, 4096 // BLOCK_D))
    return (triton.cdiv(n_rows, BLOCK_ROWS),), dict(BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=BLOCK_D)


class _L2Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_dtype):
        shape, D = x.shape, x.shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        n_rows = x2.shape[0]
        y = torch.empty(n_rows, D, dtype=out_dtype, device=x.device)
        norm = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        grid, blocks = _launch(n_rows, D)
        if n_rows:
            _l2_norm_fwd[grid](x2, y, norm, n_rows, D, **blocks)
        ctx.save_for_backward(y, norm)
        ctx.shape, ctx.x_dtype = shape, x.dtype
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        y, norm = ctx.saved_tensors
        n_rows, D = y.shape
        dx = torch.empty(n_rows, D, dtype=ctx.x_dtype, device=y.device)
        grid, blocks = _launch(n_rows, D)
        if n_rows:
            _l2_norm_bwd[grid](y, norm, dy.reshape(-1, D).contiguous(), dx, n_rows, D, **blocks)
        return dx.view(ctx.shape), None


@torch.compiler.disable  # under torch.compile it runs as it is, between two graphs (as the other kernels do)
def l2_normalize(x, dtype):
    """nirvana.l2_normalize: x (..., D) -> x / max(||x||, 1e-12) over the last dimension in `dtype`, the norm in
    float32; keeps the output and one float32 norm per row for backward."""
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x (..., D) with D >= 1 expected, got {tuple(x.shape)}")
    return _L2Normalize.apply(x, dtype)
