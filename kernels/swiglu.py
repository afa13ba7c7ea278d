"""SwiGLU's output projection, nirvana.swiglu_linear, saving only its two inputs for backward.

  y = (SiLU(gate) * up) W^T      gate, up (..., F) in the compute dtype, W (d_model, F)

The plain PyTorch twin saves four (..., F) tensors for backward: gate (for SiLU), SiLU(gate) and up (for the
product) and the product (for the projection's dW): at F = 2816 that is 22 KiB per token per layer in bf16.
Here forward forms the product in one Triton kernel, projects it and keeps only gate and up; backward forms the
product again for dW, then dgate and dup in one Triton kernel. The elementwise kernels: one program per BLOCK
= 1024 values (256 under the interpreter), SiLU in float32. test_kernels_fused.py compares it with the twin.
"""

import torch
import triton
import triton.language as tl

from kernels.common import INTERPRET

BLOCK = 256 if INTERPRET else 1024


@triton.jit
def _swiglu_fwd(G, U, P, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    g = tl.load(G + offsets, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + offsets, mask=ok, other=0.0).to(tl.float32)
    tl.store(P + offsets, (g * tl.sigmoid(g) * u).to(P.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd(G, U, DP, DG, DU, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    g = tl.load(G + offsets, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + offsets, mask=ok, other=0.0).to(tl.float32)
    dp = tl.load(DP + offsets, mask=ok, other=0.0).to(tl.float32)
    sigmoid = tl.sigmoid(g)
    tl.store(DG + offsets, (dp * u * sigmoid * (1.0 + g * (1.0 - sigmoid))).to(DG.dtype.element_ty), mask=ok)
    tl.store(DU + offsets, (dp * g * sigmoid).to(DU.dtype.element_ty), mask=ok)


def _product(gate, up):
    product = torch.empty_like(gate)
    if gate.numel():
        _swiglu_fwd[(triton.cdiv(gate.numel(), BLOCK),)](gate, up, product, gate.numel(), BLOCK=BLOCK)
    return product


class _SwiGLULinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up, weight)
        return _product(gate, up) @ weight.to(gate.dtype).T  # (..., d_model)

    @staticmethod
    def backward(ctx, dy):
        gate, up, weight = ctx.saved_tensors
        F = gate.shape[-1]
        product = _product(gate, up)  # formed again rather than kept
        dweight = dy.reshape(-1, dy.shape[-1]).T.to(gate.dtype) @ product.reshape(-1, F)
        dproduct = (dy.to(gate.dtype) @ weight.to(gate.dtype)).contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        if gate.numel():
            _swiglu_bwd[(triton.cdiv(gate.numel(), BLOCK),)](
                gate, up, dproduct, dgate, dup, gate.numel(), BLOCK=BLOCK
            )
        return dgate, dup, dweight.to(weight.dtype)


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
