"""What the three kernels share: whether Triton runs in its CPU interpreter, the checks of their inputs, how a
launch configuration is written and passed, and the loads and stores of row tiles.

Launch configurations are triton.Config objects (block sizes by the name of the kernel's constexpr argument,
num_warps, num_stages), one per kernel, chosen by each kernel module's _launch_config; launch_options turns
one into the keyword arguments of kernel[grid](...).
"""

import os

import torch
import triton
import triton.language as tl

# TRITON_INTERPRET=1 (set before triton is imported) runs the kernels on CPU tensors, for the tests
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_device(name, *tensors):
    """Raises ValueError unless the tensors are on one device: a CUDA one, or the CPU if interpreted."""
    devices = {x.device for x in tensors}
    if len(devices) > 1:
        raise ValueError(f"{name}: the tensors must be on one device; got {sorted(map(str, devices))}")
    if tensors[0].device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"{name} (Triton): tensors must be on CUDA, or set TRITON_INTERPRET=1 before triton "
            f"is imported to run on the CPU (or use backend='torch'); got {tensors[0].device}"
        )


def check_qkv(name, q, k, v):
    """Raises ValueError unless q, k are (B, T, H, Dk) and v (B, T, H, Dv), of one dtype in FLOAT_DTYPES."""
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"{name}: expected q, k (B, T, H, Dk) and v (B, T, H, Dv), "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name}: q, k, v must share one dtype among float32, bfloat16, float16; "
            f"got {q.dtype}, {k.dtype}, {v.dtype}"
        )


def block_size(d):
    """The tile side that covers d columns: d rounded up to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(d))


def launch_options(config, **blocks):
    """Keyword arguments of kernel[grid](...) for a triton.Config: its block sizes, num_warps and num_stages;
    `blocks` adds or replaces block sizes decided at the call."""
    return dict(config.kwargs, **blocks, num_warps=config.num_warps, num_stages=config.num_stages)


@triton.jit
def load_rows(ptr, rows, cols, row_stride, row_ok=None, col_ok=None):
    """Tile (len(rows), len(cols)) of a matrix whose element (r, c) is at ptr + r * row_stride + c, in its
    dtype; zero in the rows where row_ok and the columns where col_ok is False (None: no mask)."""
    ptrs = ptr + rows[:, None] * row_stride + cols[None, :]
    if row_ok is not None and col_ok is not None:
        x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    elif row_ok is not None:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif col_ok is not None:
        x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def store_rows(ptr, x, rows, cols, row_stride, row_ok, col_ok=None):
    """Writes the tile x (len(rows), len(cols)) in ptr's dtype to the rows where row_ok and the columns where
    col_ok (None: every column)."""
    ptrs = ptr + rows[:, None] * row_stride + cols[None, :]
    if col_ok is not None:
        tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    else:
        tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=row_ok[:, None])
