"""SwiGLU's output projection, nirvana.swiglu_linear, saving only its two inputs for backward.

  y = (SiLU(gate) * up) W^T      gate, up (..., F) in the compute dtype, W (d_model, F)

The plain PyTorch twin saves four (..., F) tensors for backward: gate (for SiLU), SiLU(gate) and up (for the
product) and the product (for the projection's dW): at F = 2816 that is 22 KiB per token per layer in bf16.
Here forward forms the product in one Triton kernel, projects it and keeps only gate and up; backward forms the
product again for dW, then dgate and dup in one Triton kernel. gate and up are read where they are, each row
at its own stride: the two halves of SwiGLU's fused projection, neither copied (nor kept twice). The elementwise kernels: one program per BLOCK
= 1024 values (256 under the interpreter), SiLU in float32. test_kernels_fused.py compares it with the twin.
"""

import torch
import triton
import triton.language as tl

from kernels.common import INTERPRET

BLOCK = 256 if INTERPRET else 1024


@triton.jit
def _load_gate_and_up(G, U, offsets, ok, F, g_row_stride, u_row_stride):
    """gate and up at the flat (rows, F) offsets, each row at its own stride (the halves of one projection)."""
    row = offsets // F
    col = offsets - row * F
    g = tl.load(G + row * g_row_stride + col, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + row * u_row_stride + col, mask=ok, other=0.0).to(tl.float32)
    return g, u


@triton.jit
def _swiglu_fwd(G, U, P, n, F, g_row_stride, u_row_stride, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    g, u = _load_gate_and_up(G, U, offsets, ok, F, g_row_stride, u_row_stride)
    tl.store(P + offsets, (g * tl.sigmoid(g) * u).to(P.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd(G, U, DP, DG, DU, n, F, g_row_stride, u_row_stride, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    g, u = _load_gate_and_up(G, U, offsets, ok, F, g_row_stride, u_row_stride)
    dp = tl.load(DP + offsets, mask=ok, other=0.0).to(tl.float32)
    sigmoid = tl.sigmoid(g)
    tl.store(DG + offsets, (dp * u * sigmoid * (1.0 + g * (1.0 - sigmoid))).to(DG.dtype.element_ty), mask=ok)
    tl.store(DU + offsets, (dp * g * sigmoid).to(DU.dtype.element_ty), mask=ok)


def _rows(x):
    """x (..., F) as (rows, F) with unit column stride: a view where the leading dimensions merge (gate and up
    split from the fused projection's (B, T, 2F) output do), else a copy."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(gate, up):
    """Grid and the arguments after the pointers that locate gate and up (rows, F)."""
    n, F = gate.numel(), gate.shape[-1]
    return (triton.cdiv(n, BLOCK),), (n, F, gate.stride(0), up.stride(0))


def _product(gate, up):  # gate, up (rows, F) -> SiLU(gate) * up (rows, F) contiguous
    product = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate.numel():
        grid, sizes = _launch(gate, up)
        _swiglu_fwd[grid](gate, up, product, *sizes, BLOCK=BLOCK)
    return product


class _SwiGLULinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight):
        shape = gate.shape
        gate, up = _rows(gate), _rows(up)  # views of the fused projection's output: read in place, not copied
        ctx.save_for_backward(gate, up, weight)
        ctx.shape = shape
        return (_product(gate, up) @ weight.to(gate.dtype).T).view(
            *shape[:-1], weight.shape[0]
        )  # (..., d_model)

    @staticmethod
    def backward(ctx, dy):
        gate, up, weight = ctx.saved_tensors
        product = _product(gate, up)  # formed again rather than kept
        dy = dy.reshape(-1, dy.shape[-1]).to(gate.dtype)
        dweight = dy.T @ product
        dproduct = (dy @ weight.to(gate.dtype)).contiguous()
        dgate, dup = torch.empty_like(product), torch.empty_like(product)
        if gate.numel():
            grid, sizes = _launch(gate, up)
            _swiglu_bwd[grid](gate, up, dproduct, dgate, dup, *sizes, BLOCK=BLOCK)
        return dgate.view(ctx.shape), dup.view(ctx.shape), dweight.to(weight.dtype)


@torch.compiler.disable  # under torch.compile it runs as it is, between two graphs (as the other kernels do)
def swiglu_linear(gate, up, weight):
    """nirvana.swiglu_linear: gate, up (..., F), weight (d_model, F) -> (..., d_model) in the compute dtype
    (autocast's under autocast, else gate's)."""
    if up.shape != gate.shape or weight.dim() != 2 or weight.shape[1] != gate.shape[-1]:
        raise ValueError(
            f"gate and up (..., F) and weight (d_model, F) expected, got {tuple(gate.shape)}, "
            f"{tuple(up.shape)} and {tuple(weight.shape)}"
        )
    device_type = gate.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        gate, up = gate.to(dtype), up.to(dtype)
    elif up.dtype != gate.dtype:
        raise ValueError(f"gate and up must have one dtype, got {gate.dtype} and {up.dtype}")
    with torch.autocast(device_type, enabled=False):
        return _SwiGLULinear.apply(gate, up, weight)
