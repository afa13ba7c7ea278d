"""Gated DeltaNet's output norm in Triton: nirvana.gated_rms_norm in one pass forward and one backward.

  y = (RMSNorm(x) * w) * SiLU(gate)      per row of D values (one head's Dv), RMSNorm in float32

The plain PyTorch twin runs six elementwise kernels forward (and saves x in float32, the normed x and the SiLU
for backward); here one program normalises BLOCK_ROWS rows, applies the weight and the gate and writes y in
the gate's dtype plus one float32 rstd per row (all backward needs besides x, gate and w). Backward: one
program per BLOCK_ROWS rows recomputes the normed x and SiLU, writes dx and dgate, and a float32 partial sum
of dw per program (summed by PyTorch). BLOCK_D = D rounded up to a power of two; BLOCK_ROWS = 16 (8 under the
interpreter). test_kernels_fused.py compares it with nirvana.gated_rms_norm.
"""

import torch
import triton
import triton.language as tl

from kernels.common import INTERPRET


@triton.jit
def _gated_rms_norm_fwd(X, G, W, Y, RSTD, n_rows, D, eps, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < n_rows, cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None] * D + cols[None, :]
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # (BLOCK_ROWS,)
    y = x * rstd[:, None] * w[None, :] * (g * tl.sigmoid(g))
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _gated_rms_norm_bwd(
    X, G, W, RSTD, DY, DX, DG, DW_PART, n_rows, D, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < n_rows, cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None] * D + cols[None, :]
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    x_hat = x * rstd[:, None]
    sigmoid = tl.sigmoid(g)
    silu = g * sigmoid
    normed = x_hat * w[None, :]
    dg = dy * normed * sigmoid * (1.0 + g * (1.0 - sigmoid))  # d SiLU(g) / dg
    dnormed = dy * silu
    dx_hat = dnormed * w[None, :]
    dx = rstd[:, None] * (dx_hat - x_hat * (tl.sum(dx_hat * x_hat, axis=1) / D)[:, None])
    tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DG + offsets, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid * D + cols, tl.sum(dnormed * x_hat, axis=0), mask=col_ok)


def _block_sizes(D):
    return (8 if INTERPRET else 16), triton.next_power_of_2(D)


class _GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, weight, eps):
        shape, D = x.shape, x.shape[-1]
        x2, gate2 = x.reshape(-1, D).contiguous(), gate.reshape(-1, D).contiguous()
        n_rows = x2.shape[0]
        y = torch.empty_like(gate2)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        BLOCK_ROWS, BLOCK_D = _block_sizes(D)
        grid = (triton.cdiv(n_rows, BLOCK_ROWS),)
        if n_rows:
            _gated_rms_norm_fwd[grid](
                x2, gate2, weight, y, rstd, n_rows, D, eps, BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=BLOCK_D
            )
        ctx.save_for_backward(x2, gate2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, gate2, weight, rstd = ctx.saved_tensors
        n_rows, D = x2.shape
        BLOCK_ROWS, BLOCK_D = _block_sizes(D)
        grid = (triton.cdiv(n_rows, BLOCK_ROWS),)
        dx, dgate = torch.empty_like(x2), torch.empty_like(gate2)
        dw_part = torch.zeros(grid[0], D, dtype=torch.float32, device=x2.device)
        if n_rows:
            _gated_rms_norm_bwd[grid](
                x2,
                gate2,
                weight,
                rstd,
                dy.reshape(-1, D).contiguous(),
                dx,
                dgate,
                dw_part,
                n_rows,
                D,
                BLOCK_ROWS=BLOCK_ROWS,
                BLOCK_D=BLOCK_D,
            )
        return dx.view(ctx.shape), dgate.view(ctx.shape), dw_part.sum(0).to(weight.dtype), None


@torch.compiler.disable  # under torch.compile it runs as it is, between two graphs (as the other kernels do)
def gated_rms_norm(x, gate, weight, eps):
    """nirvana.gated_rms_norm: x, gate (..., D) (x any float dtype, gate the output dtype), weight (D,)."""
    if x.shape != gate.shape or weight.shape != x.shape[-1:]:
        raise ValueError(
            f"x and gate (..., D) and weight (D,) expected, got {tuple(x.shape)}, {tuple(gate.shape)} "
            f"and {tuple(weight.shape)}"
        )
    return _GatedRMSNorm.apply(x, gate, weight, eps)
