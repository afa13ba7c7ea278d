"""Gated DeltaNet's short convolution in Triton: nirvana.causal_conv for sequences that start at position 0.

  y[b, t, c] = sum_j w[c, j] x[b, t - K + 1 + j, c]      (x = 0 before t = 0; depthwise, K taps)

The plain twin runs cuDNN's depthwise conv2d, whose backward is about ten times its forward. Here one program
takes BLOCK_T time steps x BLOCK_C channels of one sequence: forward, K shifted loads of x (the overlap comes
from cache) and K multiply-adds in float32; backward, dx from K shifted loads of dy and each tap's dw summed
over the program's time steps into a float32 partial sum per program (summed by PyTorch). Block sizes: BLOCK_T
x BLOCK_C = 64 x 128, 4 warps (16 x 16 under the CPU interpreter). A call with a history (decoding through the
cache) runs on the history and x together. test_kernels_fused.py compares the two.
"""

import torch
import triton
import triton.language as tl

from kernels.common import INTERPRET


@triton.jit
def _causal_conv_fwd(X, W, Y, T, C, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    base = tl.program_id(2).to(tl.int64) * T * C
    t_ok, c_ok = t < T, c < C
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(K):
        source = t - (K - 1) + j
        mask = (t_ok & (source >= 0))[:, None] & c_ok[None, :]
        x = tl.load(X + base + source[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + c * K + j, mask=c_ok, other=0.0).to(tl.float32)
        acc += x * w[None, :]
    tl.store(
        Y + base + t[:, None] * C + c[None, :], acc.to(Y.dtype.element_ty), mask=t_ok[:, None] & c_ok[None, :]
    )


@triton.jit
def _causal_conv_bwd(
    X, W, DY, DX, DW_PART, T, C, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    sequence = tl.program_id(2)
    base = sequence.to(tl.int64) * T * C
    part = sequence * tl.num_programs(0) + tl.program_id(0)  # this program's dw slot
    t_ok, c_ok = t < T, c < C
    here = t_ok[:, None] & c_ok[None, :]
    dy = tl.load(DY + base + t[:, None] * C + c[None, :], mask=here, other=0.0).to(tl.float32)
    dx = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(K):
        w = tl.load(W + c * K + j, mask=c_ok, other=0.0).to(tl.float32)
        later = t + (K - 1) - j  # y[later] used x[t] with tap j
        dy_later = tl.load(
            DY + base + later[:, None] * C + c[None, :], mask=(later < T)[:, None] & c_ok[None, :], other=0.0
        ).to(tl.float32)
        dx += dy_later * w[None, :]
        source = t - (K - 1) + j  # y[t] used x[source]
        x = tl.load(
            X + base + source[:, None] * C + c[None, :], mask=here & (source >= 0)[:, None], other=0.0
        ).to(tl.float32)
        tl.store(DW_PART + part * C * K + c * K + j, tl.sum(dy * x, axis=0), mask=c_ok)
    tl.store(DX + base + t[:, None] * C + c[None, :], dx.to(DX.dtype.element_ty), mask=here)


def _launch(T, C, B):
    BLOCK_T, BLOCK_C = (16, 16) if INTERPRET else (64, 128)
    return (triton.cdiv(T, BLOCK_T), triton.cdiv(C, BLOCK_C), B), dict(
        BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, num_warps=4
    )


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        B, T, C = x.shape
        K = weight.shape[-1]
        x = x.contiguous()
        weight_flat = weight.reshape(C, K).contiguous()
        y = torch.empty_like(x)
        grid, config = _launch(T, C, B)
        if x.numel():
            _causal_conv_fwd[grid](x, weight_flat, y, T, C, K=K, **config)
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
        dw_part = torch.zeros(grid[0] * B, C, K, dtype=torch.float32, device=x.device)
        if x.numel():
            _causal_conv_bwd[grid](x, weight_flat, dy.contiguous(), dx, dw_part, T, C, K=K, **config)
        return dx, dw_part.sum(0).view(ctx.weight_shape).to(ctx.weight_dtype)


@torch.compiler.disable  # under torch.compile it runs as it is, between two graphs (as the other kernels do)
def causal_conv(x, weight, history=None):
    """nirvana.causal_conv: x (B, T, C), weight (C, 1, K), history (B, K - 1, C) or None -> y (B, T, C) in x's
    dtype, by the Triton kernels (the taps in float32). With a history (decoding through the cache) the kernels
    run on [history; x] and the history's own outputs are dropped."""
    if history is not None:
        return causal_conv(torch.cat([history.to(x.dtype), x], dim=1), weight)[:, history.shape[1] :]
    if x.dim() != 3 or weight.shape[0] != x.shape[-1] or weight.dim() != 3 or weight.shape[1] != 1:
        raise ValueError(
            f"x (B, T, C) and weight (C, 1, K) expected, got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    return _CausalConv.apply(x, weight)
