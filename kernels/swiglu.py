"""SwiGLU's output projection, nirvana.swiglu_linear, saving only its input for backward.

  y = (SiLU(gate) * up) W^T      gate_up = [gate, up] (..., 2F) in the compute dtype, W (d_model, F)

The plain PyTorch twin saves gate (for SiLU), SiLU(gate) and up (for the product) and the product (for the
projection's dW): at F = 2816 that is 22 KiB per token per layer in bf16. Here forward forms the product in one
Triton kernel, projects it and keeps only gate_up; backward forms the product again for dW, then the gradients
of gate and up in one Triton kernel, written side by side into one (..., 2F) tensor as the GEMM before wants
them. gate and up are read in place from gate_up's rows: nothing is copied out of it and no gradient is
concatenated. The elementwise kernels: one program per BLOCK = 1024 product values (256 under the
interpreter), SiLU in float32. test_kernels_fused.py compares it with the twin.
"""

import torch
import triton
import triton.language as tl

from kernels.common import INTERPRET

BLOCK = 256 if INTERPRET else 1024


@triton.jit
def _swiglu_fwd(GU, P, n, F, BLOCK: tl.constexpr):
    """One program = BLOCK of the n = N F values of the product P (N, F) = SiLU(gate) * up, gate and up read
    from the rows of GU (N, 2F)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    gate_at = offsets + (offsets // F) * F  # row * 2F + column
    g = tl.load(GU + gate_at, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(GU + gate_at + F, mask=ok, other=0.0).to(tl.float32)
    tl.store(P + offsets, (g * tl.sigmoid(g) * u).to(P.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd(GU, DP, DGU, n, F, BLOCK: tl.constexpr):
    """One program = BLOCK of the n = N F values of dP (N, F): the gradients of gate and up, written at their
    places in DGU (N, 2F)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    gate_at = offsets + (offsets // F) * F
    g = tl.load(GU + gate_at, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(GU + gate_at + F, mask=ok, other=0.0).to(tl.float32)
    dp = tl.load(DP + offsets, mask=ok, other=0.0).to(tl.float32)
    sigmoid = tl.sigmoid(g)
    dgate = dp * u * sigmoid * (1.0 + g * (1.0 - sigmoid))
    tl.store(DGU + gate_at, dgate.to(DGU.dtype.element_ty), mask=ok)
    tl.store(DGU + gate_at + F, (dp * g * sigmoid).to(DGU.dtype.element_ty), mask=ok)


def _product(gate_up):  # (N, 2F) contiguous -> (N, F)
    N, F = gate_up.shape[0], gate_up.shape[1] // 2
    product = gate_up.new_empty(N, F)
    if product.numel():
        _swiglu_fwd[(triton.cdiv(product.numel(), BLOCK),)](gate_up, product, product.numel(), F, BLOCK=BLOCK)
    return product


class _SwiGLULinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, weight):
        lead, width = gate_up.shape[:-1], gate_up.shape[-1]
        rows = gate_up.reshape(-1, width).contiguous()  # a view of the GEMM's output: no copy
        ctx.save_for_backward(rows, weight)
        ctx.shape = gate_up.shape
        return (_product(rows) @ weight.to(rows.dtype).T).view(*lead, weight.shape[0])  # (..., d_model)

    @staticmethod
    def backward(ctx, dy):
        rows, weight = ctx.saved_tensors
        product = _product(rows)  # formed again rather than kept
        dy = dy.reshape(-1, dy.shape[-1]).to(rows.dtype)
        dweight = dy.T @ product
        dproduct = (dy @ weight.to(rows.dtype)).contiguous()
        dgate_up = torch.empty_like(rows)
        if dproduct.numel():
            _swiglu_bwd[(triton.cdiv(dproduct.numel(), BLOCK),)](
                rows, dproduct, dgate_up, dproduct.numel(), dproduct.shape[1], BLOCK=BLOCK
            )
        return dgate_up.view(ctx.shape), dweight.to(weight.dtype)


@torch.compiler.disable  # under torch.compile it runs as it is, between two graphs (as the other kernels do)
def swiglu_linear(gate_up, weight):
    """nirvana.swiglu_linear: gate_up (..., 2F) = [gate, up], weight (d_model, F) -> (..., d_model) in the
    compute dtype (autocast's under autocast, else gate_up's)."""
    if weight.dim() != 2 or gate_up.shape[-1] != 2 * weight.shape[1]:
        raise ValueError(
            f"gate_up (..., 2F) and weight (d_model, F) expected, got {tuple(gate_up.shape)} and "
            f"{tuple(weight.shape)}"
        )
    device_type = gate_up.device.type
    if torch.is_autocast_enabled(device_type):
        gate_up = gate_up.to(torch.get_autocast_dtype(device_type))
    with torch.autocast(device_type, enabled=False):
        return _SwiGLULinear.apply(gate_up, weight)
