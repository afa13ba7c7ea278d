"""The Trigger's CL-OGD step for a few tokens without gradients (decoding), in three small Triton launches.

nirvana.trigger_step computes it with autograd; the fused kernel (kernels/trigger.py) gives each program a
block of tokens and loops over the K bank blocks: at one token per sequence (N = batch size) a handful of
programs run the whole loop. Here each token's bank is split over S = K / KB programs (KB bank blocks each),
so N * S programs read the bank once per pass, and the gradient of eq.(4) is written out (no autograd). Per
token, with A_k = W_k k~ + b_k and Q_k = W_k q~ + b_k (d_t each):
  z = sum_k p_k A_k;  y = LN(z);  f = k~ + y                                          eq.(6), eq.(3)
  dL/df = 2 (f - v~);  dL/dz = rstd (dL/df - mean(dL/df) - y mean(dL/df y))           LN's backward
  dL/dp_k = <A_k, dL/dz>;  p = p_prev - eta dL/dp;  c = q~ + LN(sum_k p_k Q_k)        eq.(4), (5), (2)
Kernels:
  _partial_fast_weight   one program = one token, KB bank blocks: its part of z (BLOCK_D,).
  _update_fast_weights   one program = one token, KB bank blocks: z from the S parts, y and dL/dz (every
                         program of a token recomputes them), then for its blocks dL/dp, the new p and its
                         part of sum_k p_k Q_k.
  _read_out              one program = one token: c = q~ + LN of the summed parts.
Blocks: BLOCK_D = d_t rounded up to a power of two (>= 16), pad columns masked; KB bank blocks per program
(_bank_blocks_per_program: a (KB, BLOCK_D, BLOCK_D) tile of the bank, 8192 values); BLOCK_S = S rounded up.
Float32 arithmetic whatever the inputs' dtype. trigger_step sends calls that need no gradient and have at most
DECODE_TOKENS tokens here, all others to the fused kernel. test_kernels_fused.py compares this path with
nirvana.trigger_step.
"""

import torch
import triton
import triton.language as tl

import kernels
from kernels.common import INTERPRET, block_size
from kernels.trigger import LN_EPS
from kernels.trigger import _check_inputs as check_trigger_inputs

DECODE_TOKENS = 256  # at most this many tokens per call take this path (N * S programs)


@triton.jit
def _bank_tile(weight_ptr, bias_ptr, blocks, cols, K, D: tl.constexpr):
    """W (KB, BLOCK_D, BLOCK_D) and b (KB, BLOCK_D) of the bank blocks `blocks` (KB,) in float32, zero outside
    K x D x D."""
    block_ok = blocks < K
    col_ok = cols < D
    rows = blocks[:, None, None] * D * D + cols[None, :, None] * D + cols[None, None, :]  # (KB, i, j)
    tile_ok = block_ok[:, None, None] & col_ok[None, :, None] & col_ok[None, None, :]
    weight = tl.load(weight_ptr + rows, mask=tile_ok, other=0.0).to(tl.float32)
    bias = tl.load(
        bias_ptr + blocks[:, None] * D + cols[None, :], mask=block_ok[:, None] & col_ok[None, :], other=0.0
    )
    return weight, bias.to(tl.float32)


@triton.jit
def _applied(weight, bias, x):
    """W_k x + b_k for each block of the tile: (KB, BLOCK_D)."""
    return tl.sum(weight * x[None, None, :], 2) + bias


@triton.jit
def _layer_norm(z, col_ok, D: tl.constexpr):
    """LayerNorm without affine over the first D entries of z (BLOCK_D,): y (zero in pad entries), 1/sigma."""
    mean = tl.sum(z, 0) / D
    centred = tl.where(col_ok, z - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / D + LN_EPS)
    return centred * rstd, rstd


@triton.jit
def _load_row(ptr, n, row_stride, cols, col_ok):
    return tl.load(ptr + n * row_stride + cols, mask=col_ok, other=0.0).to(tl.float32)


@triton.jit
def _partial_fast_weight(
    k_ptr,
    p_ptr,
    weight_ptr,
    bias_ptr,
    z_part_ptr,
    k_row_stride,
    K,
    S,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KB: tl.constexpr,
):
    """One program = token n, bank blocks s KB .. s KB + KB - 1: sum over them of p_k A_k (BLOCK_D,)."""
    n = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    blocks = s * KB + tl.arange(0, KB)
    k = _load_row(k_ptr, n, k_row_stride, cols, cols < D)
    p = tl.load(p_ptr + n * K + blocks, mask=blocks < K, other=0.0).to(tl.float32)
    weight, bias = _bank_tile(weight_ptr, bias_ptr, blocks, cols, K, D)
    A = _applied(weight, bias, k)
    tl.store(z_part_ptr + (n * S + s) * BLOCK_D + cols, tl.sum(p[:, None] * A, 0))


@triton.jit
def _update_fast_weights(
    q_ptr,
    k_ptr,
    v_ptr,
    p_ptr,
    eta_ptr,
    weight_ptr,
    bias_ptr,
    z_part_ptr,
    p_new_ptr,
    zq_part_ptr,
    q_row_stride,
    k_row_stride,
    v_row_stride,
    K,
    S,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KB: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One program = token n, bank blocks s KB .. s KB + KB - 1: z (the sum of the S parts), y = LN(z) and
    dL/dz; for its blocks dL/dp_k = <A_k, dL/dz>, p_k' = p_k - eta dL/dp_k (stored), and sum p_k' Q_k."""
    n = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    parts = tl.arange(0, BLOCK_S)
    z = tl.sum(
        tl.load(
            z_part_ptr + (n * S + parts[:, None]) * BLOCK_D + cols[None, :],
            mask=(parts < S)[:, None],
            other=0.0,
        ),
        0,
    )
    y, rstd = _layer_norm(z, col_ok, D)
    k = _load_row(k_ptr, n, k_row_stride, cols, col_ok)
    v = _load_row(v_ptr, n, v_row_stride, cols, col_ok)
    df = tl.where(col_ok, 2.0 * (k + y - v), 0.0)  # dL/df, eq.(3)
    dz = tl.where(col_ok, rstd * (df - tl.sum(df, 0) / D - y * (tl.sum(df * y, 0) / D)), 0.0)
    blocks = s * KB + tl.arange(0, KB)
    block_ok = blocks < K
    weight, bias = _bank_tile(weight_ptr, bias_ptr, blocks, cols, K, D)  # read once for A_k and Q_k
    grad = tl.sum(_applied(weight, bias, k) * dz[None, :], 1)  # eq.(4)
    p = tl.load(p_ptr + n * K + blocks, mask=block_ok, other=0.0).to(tl.float32)
    p_new = p - tl.load(eta_ptr + n).to(tl.float32) * grad  # eq.(5)
    tl.store(p_new_ptr + n * K + blocks, p_new.to(p_new_ptr.dtype.element_ty), mask=block_ok)
    q = _load_row(q_ptr, n, q_row_stride, cols, col_ok)
    Q = _applied(weight, bias, q)
    tl.store(zq_part_ptr + (n * S + s) * BLOCK_D + cols, tl.sum(p_new[:, None] * Q, 0))


@triton.jit
def _read_out(
    q_ptr,
    zq_part_ptr,
    c_ptr,
    q_row_stride,
    S,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One program = token n: c = q~ + LN(sum of the S parts of sum_k p_k' Q_k), eq.(2)."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    parts = tl.arange(0, BLOCK_S)
    zq = tl.sum(
        tl.load(
            zq_part_ptr + (n * S + parts[:, None]) * BLOCK_D + cols[None, :],
            mask=(parts < S)[:, None],
            other=0.0,
        ),
        0,
    )
    c = _load_row(q_ptr, n, q_row_stride, cols, col_ok) + _layer_norm(zq, col_ok, D)[0]
    tl.store(c_ptr + n * D + cols, c.to(c_ptr.dtype.element_ty), mask=col_ok)


def _bank_blocks_per_program(K, BLOCK_D):
    """KB: bank blocks per program, a (KB, BLOCK_D, BLOCK_D) tile of 8192 values (2 at d_t = 64), at most K
    rounded up to a power of two."""
    return max(1, min(triton.next_power_of_2(K), 8192 // (BLOCK_D * BLOCK_D)))


def _rows(x, D):
    """x (..., D) as a matrix with unit column stride (a view where it can be: no copy of a column slice of
    the fused projection's output)."""
    x = x.reshape(-1, D)
    return x if x.stride(1) == 1 else x.contiguous()


def trigger_step_decode(q, k, v, p_prev, eta, bank_weight, bank_bias):
    """nirvana.trigger_step without gradients, in three launches. q, k, v (..., d_t); p_prev (..., K); eta
    (...,); bank_weight (K, d_t, d_t); bank_bias (K, d_t) -> c (..., d_t) in q's dtype, p (..., K) in the dtype
    of p_prev - eta grad (p_prev and eta broadcast over the token shape). Arithmetic in float32."""
    check_trigger_inputs(q, k, v, p_prev, eta, bank_weight, bank_bias)
    lead = q.shape[:-1]
    D, K = q.shape[-1], bank_bias.shape[0]
    N = q.numel() // D
    p_dtype = torch.promote_types(torch.promote_types(p_prev.dtype, eta.dtype), q.dtype)  # p_prev - eta grad
    q2, k2, v2 = (_rows(x, D) for x in (q, k, v))
    p_flat = p_prev.expand(*lead, K).reshape(N, K).contiguous()
    eta_flat = eta.expand(lead).reshape(N).contiguous()
    weight, bias = bank_weight.contiguous(), bank_bias.contiguous()
    BLOCK_D = block_size(D)
    KB = _bank_blocks_per_program(K, BLOCK_D)
    S = triton.cdiv(K, KB)
    BLOCK_S = triton.next_power_of_2(S)
    z_part = torch.empty(N, S, BLOCK_D, device=q.device, dtype=torch.float32)
    zq_part = torch.empty_like(z_part)
    p_new = torch.empty(N, K, device=q.device, dtype=p_dtype)
    c = torch.empty(N, D, device=q.device, dtype=q.dtype)
    if N == 0:
        return c.view(*lead, D), p_new.view(*lead, K)
    warps = dict(num_warps=1 if INTERPRET else 4)
    _partial_fast_weight[(N, S)](
        k2, p_flat, weight, bias, z_part, k2.stride(0), K, S, D=D, BLOCK_D=BLOCK_D, KB=KB, **warps
    )
    _update_fast_weights[(N, S)](
        q2,
        k2,
        v2,
        p_flat,
        eta_flat,
        weight,
        bias,
        z_part,
        p_new,
        zq_part,
        q2.stride(0),
        k2.stride(0),
        v2.stride(0),
        K,
        S,
        D=D,
        BLOCK_D=BLOCK_D,
        KB=KB,
        BLOCK_S=BLOCK_S,
        **warps,
    )
    _read_out[(N,)](q2, zq_part, c, q2.stride(0), S, D=D, BLOCK_D=BLOCK_D, BLOCK_S=BLOCK_S, **warps)
    return c.view(*lead, D), p_new.view(*lead, K)


@torch.compiler.disable  # under torch.compile it runs as it is, between two graphs (as the kernels do)
def trigger_step(q, k, v, p_prev, eta, bank_weight, bank_bias, detach_inner_grad=False):
    """kernels.trigger_step's signature: the decode kernels for a few tokens without gradients, else the
    fused kernel."""
    inputs = (q, k, v, p_prev, eta, bank_weight, bank_bias)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    if not needs_grad and q.numel() <= DECODE_TOKENS * q.shape[-1]:
        return trigger_step_decode(*inputs)
    return kernels.trigger_step(*inputs, detach_inner_grad=detach_inner_grad)
