"""The model's RMSNorms in Triton, one pass forward and one backward: nirvana.rms_norm (the pre-norms of every
block and the final norm) and nirvana.gated_rms_norm (Gated DeltaNet's output norm).

  rms_norm:        y = RMSNorm(x) * w                 per row of D values (D = d_model)
  gated_rms_norm:  y = (RMSNorm(x) * w) * SiLU(gate)  per row of D values (D = one head's Dv)

RMSNorm runs in float32. The plain PyTorch twins run four to six elementwise kernels forward and save x in
float32 plus the normed x (and the SiLU) for backward; here one program normalises BLOCK_ROWS rows, applies
the weight (and the gate) and writes y plus one float32 rstd per row, and backward needs only x (the gate), w
and rstd. Backward: one program per BLOCK_ROWS rows recomputes the normed x (and SiLU), writes dx (and
dgate) and a float32 partial sum of dw per program (summed by PyTorch). BLOCK_D = D rounded up to a power of
two; BLOCK_ROWS = 4096 // BLOCK_D, between 1 and 16 (at most 8 under the interpreter), so a program holds about
4k values of each tensor it reads. test_kernels_fused.py compares both with their twins.
"""

import torch
import triton
import triton.language as tl

from kernels.common import INTERPRET, load_rows, store_rows


@triton.jit
def _rms_norm_fwd(
    X, G, W, Y, RSTD, n_rows, D, eps, HAS_GATE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < n_rows, cols < D
    x = load_rows(X, rows, cols, D, row_ok, col_ok).to(tl.float32)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # (BLOCK_ROWS,)
    y = x * rstd[:, None] * w[None, :]
    if HAS_GATE:
        g = load_rows(G, rows, cols, D, row_ok, col_ok).to(tl.float32)
        y = y * (g * tl.sigmoid(g))
    store_rows(Y, y, rows, cols, D, row_ok, col_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd(
    X,
    G,
    W,
    RSTD,
    DY,
    DX,
    DG,
    DW_PART,
    n_rows,
    D,
    HAS_GATE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < n_rows, cols < D
    x = load_rows(X, rows, cols, D, row_ok, col_ok).to(tl.float32)
    dy = load_rows(DY, rows, cols, D, row_ok, col_ok).to(tl.float32)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    x_hat = x * rstd[:, None]
    dnormed = dy  # the gradient of RMSNorm(x) * w
    if HAS_GATE:
        g = load_rows(G, rows, cols, D, row_ok, col_ok).to(tl.float32)
        sigmoid = tl.sigmoid(g)
        dg = dy * x_hat * w[None, :] * sigmoid * (1.0 + g * (1.0 - sigmoid))  # d SiLU(g) / dg
        store_rows(DG, dg, rows, cols, D, row_ok, col_ok)
        dnormed = dy * g * sigmoid
    dx_hat = dnormed * w[None, :]
    dx = rstd[:, None] * (dx_hat - x_hat * (tl.sum(dx_hat * x_hat, axis=1) / D)[:, None])
    store_rows(DX, dx, rows, cols, D, row_ok, col_ok)
    tl.store(DW_PART + pid * D + cols, tl.sum(dnormed * x_hat, axis=0), mask=col_ok)


def _block_sizes(D):
    BLOCK_D = triton.next_power_of_2(D)
    return max(1, min(8 if INTERPRET else 16, 4096 // BLOCK_D)), BLOCK_D


class _RMSNorm(torch.autograd.Function):
    """y = RMSNorm(x) w (* SiLU(gate)) in out_dtype; gate None for the plain norm."""

    @staticmethod
    def forward(ctx, x, gate, weight, eps, out_dtype):
        shape, D = x.shape, x.shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        gate2 = None if gate is None else gate.reshape(-1, D).contiguous()
        n_rows = x2.shape[0]
        y = torch.empty(n_rows, D, dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        BLOCK_ROWS, BLOCK_D = _block_sizes(D)
        if n_rows:
            _rms_norm_fwd[(triton.cdiv(n_rows, BLOCK_ROWS),)](
                x2,
                x2 if gate2 is None else gate2,  # not read without a gate
                weight,
                y,
                rstd,
                n_rows,
                D,
                eps,
                HAS_GATE=gate2 is not None,
                BLOCK_ROWS=BLOCK_ROWS,
                BLOCK_D=BLOCK_D,
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
        dx = torch.empty_like(x2)
        dgate = None if gate2 is None else torch.empty_like(gate2)
        dw_part = torch.zeros(grid[0], D, dtype=torch.float32, device=x2.device)
        if n_rows:
            _rms_norm_bwd[grid](
                x2,
                x2 if gate2 is None else gate2,
                weight,
                rstd,
                dy.reshape(-1, D).contiguous(),
                dx,
                dx if dgate is None else dgate,  # not written without a gate
                dw_part,
                n_rows,
                D,
                HAS_GATE=gate2 is not None,
                BLOCK_ROWS=BLOCK_ROWS,
                BLOCK_D=BLOCK_D,
            )
        dgate = None if dgate is None else dgate.view(ctx.shape)
        return dx.view(ctx.shape), dgate, dw_part.sum(0).to(weight.dtype), None, None


def _check(x, weight, gate=None):
    if weight.shape != x.shape[-1:] or (gate is not None and gate.shape != x.shape):
        given = f"{tuple(x.shape)}" + ("" if gate is None else f", {tuple(gate.shape)}")
        raise ValueError(
            f"x{'' if gate is None else ' and gate'} (..., D) and weight (D,) expected, got {given} "
            f"and {tuple(weight.shape)}"
        )


@torch.compiler.disable  # under torch.compile it runs as it is, between two graphs (as the other kernels do)
def rms_norm(x, weight, eps):
    """nirvana.rms_norm: x (..., D), weight (D,) -> y in the autocast dtype under autocast, else x's dtype."""
    _check(x, weight)
    device_type = x.device.type
    out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    return _RMSNorm.apply(x, None, weight, eps, out_dtype)


@torch.compiler.disable
def gated_rms_norm(x, gate, weight, eps):
    """nirvana.gated_rms_norm: x, gate (..., D) (x any float dtype, gate the output dtype), weight (D,)."""
    _check(x, weight, gate)
    return _RMSNorm.apply(x, gate, weight, eps, gate.dtype)
