"""Gated DeltaNet's short convolution and its SiLU in Triton: nirvana.causal_conv_silu for sequences that
start at position 0.

  z[b, t, c] = sum_j w[c, j] x[b, t - K + 1 + j, c]      (x = 0 before t = 0; depthwise, K taps)
  y = SiLU(z)

The plain twin runs cuDNN's depthwise conv2d, whose backward is about ten times its forward, and keeps z for
SiLU's backward. Here one program takes BLOCK_T time steps x BLOCK_C channels of one sequence: forward, K
shifted loads of x (the overlap comes from cache), K multiply-adds in float32 and the SiLU; only x is kept.
Backward, two launches over the same tiles: the first forms z again from x and writes dz = dy SiLU'(z) in
float32; the second forms dx from K shifted loads of dz and each tap's dw summed over the program's time steps
into a float32 partial sum per program (summed by PyTorch). Block sizes: BLOCK_T x BLOCK_C = 64 x 128, 4
warps (16 x 16 under the CPU interpreter). A prefill through the cache (nirvana.CausalConv) calls it on the
cached inputs and the new ones together; decoding one token calls causal_conv_silu_step, which convolves,
applies the SiLU and moves the cached inputs along in one launch. test_kernels_fused.py compares the
convolution with its twin, test_kernels_decode.py the step with nirvana.causal_conv_silu_step.
"""

import torch
import triton
import triton.language as tl

from kernels.common import INTERPRET


@triton.jit
def _conv_tile(
    X, W, base, t, c, t_ok, c_ok, C, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr
):
    """z for time steps t and channels c of the sequence at offset base: (BLOCK_T, BLOCK_C) in float32."""
    z = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(K):
        source = t - (K - 1) + j
        mask = (t_ok & (source >= 0))[:, None] & c_ok[None, :]
        x = tl.load(X + base + source[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + c * K + j, mask=c_ok, other=0.0).to(tl.float32)
        z += x * w[None, :]
    return z


@triton.jit
def _causal_conv_silu_fwd(X, W, Y, T, C, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    base = tl.program_id(2).to(tl.int64) * T * C
    t_ok, c_ok = t < T, c < C
    z = _conv_tile(X, W, base, t, c, t_ok, c_ok, C, K, BLOCK_T, BLOCK_C)
    y = z * tl.sigmoid(z)
    tl.store(
        Y + base + t[:, None] * C + c[None, :], y.to(Y.dtype.element_ty), mask=t_ok[:, None] & c_ok[None, :]
    )


@triton.jit
def _silu_bwd(X, W, DY, DZ, T, C, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """dz = dy SiLU'(z) = dy s (1 + z (1 - s)), s = sigmoid(z), with z formed again from x; dz in float32."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    base = tl.program_id(2).to(tl.int64) * T * C
    t_ok, c_ok = t < T, c < C
    here = t_ok[:, None] & c_ok[None, :]
    z = _conv_tile(X, W, base, t, c, t_ok, c_ok, C, K, BLOCK_T, BLOCK_C)
    dy = tl.load(DY + base + t[:, None] * C + c[None, :], mask=here, other=0.0).to(tl.float32)
    s = tl.sigmoid(z)
    tl.store(DZ + base + t[:, None] * C + c[None, :], dy * s * (1.0 + z * (1.0 - s)), mask=here)


@triton.jit
def _causal_conv_bwd(
    X, W, DZ, DX, DW_PART, T, C, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    sequence = tl.program_id(2)
    base = sequence.to(tl.int64) * T * C
    part = sequence * tl.num_programs(0) + tl.program_id(0)  # this program's dw slot
    t_ok, c_ok = t < T, c < C
    here = t_ok[:, None] & c_ok[None, :]
    dz = tl.load(DZ + base + t[:, None] * C + c[None, :], mask=here, other=0.0)
    dx = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(K):
        w = tl.load(W + c * K + j, mask=c_ok, other=0.0).to(tl.float32)
        later = t + (K - 1) - j  # z[later] used x[t] with tap j
        dz_later = tl.load(
            DZ + base + later[:, None] * C + c[None, :], mask=(later < T)[:, None] & c_ok[None, :], other=0.0
        )
        dx += dz_later * w[None, :]
        source = t - (K - 1) + j  # z[t] used x[source]
        x = tl.load(
            X + base + source[:, None] * C + c[None, :], mask=here & (source >= 0)[:, None], other=0.0
        ).to(tl.float32)
        tl.store(DW_PART + part * C * K + c * K + j, tl.sum(dz * x, axis=0), mask=c_ok)
    tl.store(DX + base + t[:, None] * C + c[None, :], dx.to(DX.dtype.element_ty), mask=here)


def _launch(T, C, B):
    BLOCK_T, BLOCK_C = (16, 16) if INTERPRET else (64, 128)
    return (triton.cdiv(T, BLOCK_T), triton.cdiv(C, BLOCK_C), B), dict(
        BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, num_warps=4
    )


class _CausalConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        B, T, C = x.shape
        K = weight.shape[-1]
        x = x.contiguous()
        weight_flat = weight.reshape(C, K).contiguous()
        y = torch.empty_like(x)
        grid, config = _launch(T, C, B)
        if x.numel():
            _causal_conv_silu_fwd[grid](x, weight_flat, y, T, C, K=K, **config)
        ctx.save_for_backward(x, weight_flat)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight_flat = ctx.saved_tensors
        B, T, C = x.shape
        K = weight_flat.shape[1]
        grid, config = _launch(T, C, B)
        dx = torch.empty_like(x)
        dz = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # (B, T, C), freed on return
        dw_part = torch.zeros(grid[0] * B, C, K, dtype=torch.float32, device=x.device)
        if x.numel():
            _silu_bwd[grid](x, weight_flat, dy.contiguous(), dz, T, C, K=K, **config)
            _causal_conv_bwd[grid](x, weight_flat, dz, dx, dw_part, T, C, K=K, **config)
        return dx, dw_part.sum(0).view(ctx.weight_shape).to(ctx.weight_dtype)


@triton.jit
def _causal_conv_silu_step(X, TAIL, W, Y, x_row_stride, C, K: tl.constexpr, BLOCK_C: tl.constexpr):
    """Decoding, one program = sequence i_b, channels c (BLOCK_C,): with the tail's K - 1 rows (the inputs
    before x), z = sum_{j < K-1} w_j tail_j + w_{K-1} x in float32, y = SiLU(z); the tail moves up one row in
    place (each row is read before the row above it is written) and x becomes its newest row."""
    i_b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    x = tl.load(X + i_b * x_row_stride + c, mask=c_ok, other=0.0)
    z = x.to(tl.float32) * tl.load(W + c * K + (K - 1), mask=c_ok, other=0.0).to(tl.float32)
    tail = TAIL + i_b * (K - 1) * C + c
    for j in tl.static_range(K - 1):
        earlier = tl.load(tail + j * C, mask=c_ok, other=0.0)
        z += earlier.to(tl.float32) * tl.load(W + c * K + j, mask=c_ok, other=0.0).to(tl.float32)
        if j > 0:
            tl.store(tail + (j - 1) * C, earlier, mask=c_ok)
    if K > 1:
        tl.store(tail + (K - 2) * C, x.to(TAIL.dtype.element_ty), mask=c_ok)
    tl.store(Y + i_b * C + c, (z * tl.sigmoid(z)).to(Y.dtype.element_ty), mask=c_ok)


@torch.compiler.disable
def causal_conv_silu_step(x, tail, weight):
    """nirvana.causal_conv_silu_step in one launch (decoding: the twin concatenates, copies and convolves):
    x (B, C), its rows may be strided (a slice of the fused projection's output); tail (B, K - 1, C)
    contiguous, updated in place; weight (C, 1, K). Returns (B, C) in x's dtype. Blocks of 128 channels
    (16 under the CPU interpreter): B * C / 128 programs."""
    B, C = x.shape
    K = weight.shape[-1]
    if weight.shape != (C, 1, K) or tail.shape != (B, K - 1, C) or not tail.is_contiguous():
        raise ValueError(
            f"causal_conv_silu_step: expected x (B, C), tail (B, K - 1, C) contiguous and weight (C, 1, K); "
            f"got x {tuple(x.shape)}, tail {tuple(tail.shape)}, weight {tuple(weight.shape)}"
        )
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty(B, C, device=x.device, dtype=x.dtype)
    BLOCK_C = 16 if INTERPRET else 128
    _causal_conv_silu_step[(B, triton.cdiv(C, BLOCK_C))](
        x, tail, weight.contiguous(), y, x.stride(0), C, K=K, BLOCK_C=BLOCK_C, num_warps=1 if INTERPRET else 4
    )
    return y


@torch.compiler.disable  # under torch.compile it runs as it is, between two graphs (as the other kernels do)
def causal_conv_silu(x, weight):
    """nirvana.causal_conv_silu: x (B, T, C), weight (C, 1, K) -> SiLU of the convolution (B, T, C) in x's
    dtype, by the Triton kernels (the taps and the SiLU in float32)."""
    if x.dim() != 3 or weight.shape[0] != x.shape[-1] or weight.dim() != 3 or weight.shape[1] != 1:
        raise ValueError(
            f"x (B, T, C) and weight (C, 1, K) expected, got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    return _CausalConvSiLU.apply(x, weight)
