"""Causal sliding-window attention in Triton, flash style (FlashAttention-2 tiling, online softmax).

Query i attends to keys j with i - window < j <= i (a window of W keys, itself included). Each program
visits only the key blocks that intersect its window, so the cost is O(T * window), linear in T.

Layout: q, k (B, T, H, Dk), v (B, T, H, Dv) as the model produces them, read in place (no transposes).
Kernels:
  _swa_fwd        one program = BLOCK_M queries of one (batch, head); loops over the key blocks
                  (BLOCK_N keys) of the window; writes o (BLOCK_M, Dv) and each row's log2-sum-exp lse.
  _swa_bwd_delta  delta_i = rowsum(o_i * do_i), once per query row, for both kinds of backward program.
  _swa_bwd        the dk/dv and dq programs in one launch: the first KEY_BLOCKS programs of each
                  (batch, head) take BLOCK_N1 keys each, loop over the query blocks (BLOCK_M1 queries)
                  that see them (j <= i < j + W) and write dk, dv; the rest take BLOCK_M2 queries each,
                  loop like the forward and write dq.
Softmax runs in base 2: s2 = (q.k) * scale * log2(e), p = exp2(s2 - lse2). The forward and dq loops run in
three ranges: the blocks that cross the window's edge or the diagonal apply the mask, the blocks between
skip it and load their tiles without bounds checks. The dk/dv loop is one loop that masks (a branch) only
on those edge blocks: split in three, its two accumulators made the compiler serialize the tensor-core
products. lse and delta are stored (B, H, t_pad), t_pad a multiple of every block with zero pad rows, so
that loop loads them unmasked.
Block sizes: _launch_config; BLOCK_DK, BLOCK_DV = the head sizes rounded up to a power of two (>= 16).
Precision: products of float32 inputs are float32-accurate (tf32x3), 16-bit inputs multiply natively; the
accumulators and the softmax statistics are float32.
"""

import torch
import triton
import triton.language as tl

from kernels.common import (
    INTERPRET,
    block_size,
    check_device,
    check_qkv,
    launch_options,
    load_rows,
    store_rows,
)

LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr):
    """a @ b with float32 accumulation; PRECISION "upcast" computes in float32 (the CPU interpreter
    multiplies bfloat16 operands wrongly)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _window_mask(offs_m, offs_n, T, WINDOW):
    # (BLOCK_M, BLOCK_N) True where key j is visible to query i: i - W < j <= i, j < T
    i = offs_m[:, None]
    j = offs_n[None, :]
    return (j <= i) & (j > i - WINDOW) & (j < T)


@triton.jit
def _key_blocks(start_m, T, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks seen by queries [start_m, start_m + BLOCK_M), as three consecutive ranges
    [lo, mid_lo) needs the mask, [mid_lo, mid_hi) is fully visible, [mid_hi, hi) needs the mask."""
    lo = (tl.maximum(start_m - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(start_m + BLOCK_M, T)
    full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - WINDOW, 0), BLOCK_N) * BLOCK_N  # j > i - W for all i
    full_hi = ((start_m + 1) // BLOCK_N) * BLOCK_N  # j <= i for all i
    mid_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    mid_hi = tl.minimum(tl.maximum(full_hi, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _query_blocks(start_n, T, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query blocks that see keys [start_n, start_n + BLOCK_N) (j <= i < j + W), as three ranges like
    _key_blocks; the middle one also stays inside T (pad query rows need the mask)."""
    lo = (start_n // BLOCK_M) * BLOCK_M
    hi = tl.minimum(start_n + BLOCK_N + WINDOW - 1, T)
    full_lo = tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M  # i >= j for all j
    full_hi = (tl.minimum(start_n + WINDOW, T) // BLOCK_M) * BLOCK_M  # i < j + W for all j
    mid_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    mid_hi = tl.minimum(tl.maximum(full_hi, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _rows(block, bh, T, H, DK: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr):
    """Row block `block` of (batch, head) bh: rows [start, start + BLOCK), and the offsets of element
    (b, 0, h, 0) in q/k (B, T, H, Dk) and in v/o (B, T, H, Dv)."""
    start = block * BLOCK
    b = (bh // H).to(tl.int64)
    h = bh % H
    return start, bh, start + tl.arange(0, BLOCK), b * T * H * DK + h * DK, b * T * H * DV + h * DV


@triton.jit
def _block_program(T, H, DK: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr):
    """What a program of the (row block, batch x head) grid works on (see _rows)."""
    return _rows(tl.program_id(0), tl.program_id(1), T, H, DK, DV, BLOCK)


@triton.jit
def _load_tile(
    X, base, offs_t, T, row_stride, D: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr
):
    """Rows offs_t of one (batch, head) of a (B, T, H, D) tensor -> (len(offs_t), BLOCK_D), zero outside.
    CHECK_ROWS False: the caller knows every row is < T (the mask-free middle ranges), so only pad columns
    (D not a power of two) are masked."""
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = None
    col_ok = None
    if CHECK_ROWS:
        row_ok = offs_t < T
        col_ok = offs_d < D
    elif BLOCK_D != D:
        col_ok = offs_d < D
    return load_rows(X + base, offs_t, offs_d, row_stride, row_ok, col_ok)


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    K,
    V,
    base_qk,
    base_v,
    offs_m,
    lo,
    hi,
    scale_log2,
    T,
    H,
    WINDOW,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Online softmax over key blocks [lo, hi) for the queries offs_m; updates acc, l_i, m_i."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, base_qk, offs_n, T, H * DK, DK, BLOCK_DK, MASKED)
        s = _mm(q, tl.trans(k), PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
        if MASKED:
            s = tl.where(_window_mask(offs_m, offs_n, T, WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V, base_v, offs_n, T, H * DV, DV, BLOCK_DV, MASKED)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["T", "H", "WINDOW"])
def _swa_fwd(
    Q,
    K,
    V,
    O,
    LSE,
    scale_log2,
    T,
    H,
    WINDOW,
    T_PAD,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program: queries [start_m, start_m + BLOCK_M) of one (batch, head); o (BLOCK_M, Dv)."""
    start_m, bh, offs_m, base_qk, base_v = _block_program(T, H, DK, DV, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q, base_qk, offs_m, T, H * DK, DK, BLOCK_DK, True)
    # running max and sum of the online softmax; a finite start keeps fully masked pad rows NaN-free
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _key_blocks(start_m, T, WINDOW, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        K,
        V,
        base_qk,
        base_v,
        offs_m,
        lo,
        mid_lo,
        scale_log2,
        T,
        H,
        WINDOW,
        DK,
        DV,
        BLOCK_DK,
        BLOCK_DV,
        BLOCK_N,
        PRECISION,
        True,
    )
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        K,
        V,
        base_qk,
        base_v,
        offs_m,
        mid_lo,
        mid_hi,
        scale_log2,
        T,
        H,
        WINDOW,
        DK,
        DV,
        BLOCK_DK,
        BLOCK_DV,
        BLOCK_N,
        PRECISION,
        False,
    )
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        K,
        V,
        base_qk,
        base_v,
        offs_m,
        mid_hi,
        hi,
        scale_log2,
        T,
        H,
        WINDOW,
        DK,
        DV,
        BLOCK_DK,
        BLOCK_DV,
        BLOCK_N,
        PRECISION,
        True,
    )
    l_i = tl.where(l_i > 0.0, l_i, 1.0)  # pad rows past T may see no key
    o = acc / l_i[:, None]
    store_rows(O + base_v, o, offs_m, offs_dv, H * DV, offs_m < T, offs_dv < DV)
    tl.store(LSE + bh.to(tl.int64) * T_PAD + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)


@triton.jit(do_not_specialize=["T", "H"])
def _swa_bwd_delta(
    O, DO, DELTA, T, H, T_PAD, DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr
):
    """One program: BLOCK_M rows of one (batch, head); delta_i = sum_d o_id do_id (B, H, T) float32, the
    softmax backward's row correction, computed once here for both backward kernels."""
    _, bh, offs_m, _, base_v = _block_program(T, H, DV, DV, BLOCK_M)
    o = _load_tile(O, base_v, offs_m, T, H * DV, DV, BLOCK_DV, True).to(tl.float32)
    do = _load_tile(DO, base_v, offs_m, T, H * DV, DV, BLOCK_DV, True).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * T_PAD + offs_m, tl.sum(o * do, 1), mask=offs_m < T_PAD)  # pad rows: 0


@triton.jit
def _dkdv_inner(
    dk,
    dv,
    k,
    v,
    Q,
    DO,
    LSE,
    DELTA,
    base_qk,
    base_v,
    bh,
    offs_n,
    lo,
    mid_lo,
    mid_hi,
    hi,
    scale_log2,
    T,
    H,
    WINDOW,
    T_PAD,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dk, dv of the keys offs_n over query blocks [lo, hi), the mask applied outside [mid_lo, mid_hi); works on
    transposed scores (keys x queries)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = tl.multiple_of(start_m, BLOCK_M) + tl.arange(0, BLOCK_M)
        q = _load_tile(Q, base_qk, offs_m, T, H * DK, DK, BLOCK_DK, True)
        do = _load_tile(DO, base_v, offs_m, T, H * DV, DV, BLOCK_DV, True)
        # rows < T_PAD (a multiple of every block): no mask, so these loads stay few and vectorized
        lse = tl.load(LSE + bh.to(tl.int64) * T_PAD + offs_m)
        delta = tl.load(DELTA + bh.to(tl.int64) * T_PAD + offs_m)
        p_t = tl.math.exp2(_mm(k, tl.trans(q), PRECISION) * scale_log2 - lse[None, :])  # (BLOCK_N, BLOCK_M)
        if (start_m < mid_lo) | (start_m >= mid_hi):
            p_t = tl.where(tl.trans(_window_mask(offs_m, offs_n, T, WINDOW)), p_t, 0.0)
        dv += _mm(p_t.to(do.dtype), do, PRECISION)
        ds_t = p_t * (_mm(v, tl.trans(do), PRECISION) - delta[None, :])  # dS^T = P^T (dP^T - delta)
        dk += _mm(ds_t.to(q.dtype), q, PRECISION)
    return dk, dv


@triton.jit
def _dkdv_block(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK_OUT,
    DV_OUT,
    scale,
    scale_log2,
    T,
    H,
    WINDOW,
    T_PAD,
    block,
    bh,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Keys [block * BLOCK_N, (block + 1) * BLOCK_N) of (batch, head) bh: dk (BLOCK_N, Dk), dv (BLOCK_N, Dv)."""
    start_n, bh, offs_n, base_qk, base_v = _rows(block, bh, T, H, DK, DV, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(K, base_qk, offs_n, T, H * DK, DK, BLOCK_DK, True)
    v = _load_tile(V, base_v, offs_n, T, H * DV, DV, BLOCK_DV, True)
    dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _query_blocks(start_n, T, WINDOW, BLOCK_M, BLOCK_N)
    dk, dv = _dkdv_inner(
        dk,
        dv,
        k,
        v,
        Q,
        DO,
        LSE,
        DELTA,
        base_qk,
        base_v,
        bh,
        offs_n,
        lo,
        mid_lo,
        mid_hi,
        hi,
        scale_log2,
        T,
        H,
        WINDOW,
        T_PAD,
        DK,
        DV,
        BLOCK_DK,
        BLOCK_DV,
        BLOCK_M,
        PRECISION,
    )
    dk = dk * scale
    store_rows(DK_OUT + base_qk, dk, offs_n, offs_dk, H * DK, offs_n < T, offs_dk < DK)
    store_rows(DV_OUT + base_v, dv, offs_n, offs_dv, H * DV, offs_n < T, offs_dv < DV)


@triton.jit
def _dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    K,
    V,
    base_qk,
    base_v,
    offs_m,
    lo,
    hi,
    scale_log2,
    T,
    H,
    WINDOW,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    MASKED: tl.constexpr,
):
    """dq of the queries offs_m over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, base_qk, offs_n, T, H * DK, DK, BLOCK_DK, MASKED)
        v = _load_tile(V, base_v, offs_n, T, H * DV, DV, BLOCK_DV, MASKED)
        p = tl.math.exp2(_mm(q, tl.trans(k), PRECISION) * scale_log2 - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if MASKED:
            p = tl.where(_window_mask(offs_m, offs_n, T, WINDOW), p, 0.0)
        ds = p * (_mm(do, tl.trans(v), PRECISION) - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, PRECISION)
    return dq


@triton.jit
def _dq_block(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ_OUT,
    scale,
    scale_log2,
    T,
    H,
    WINDOW,
    T_PAD,
    block,
    bh,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Queries [block * BLOCK_M, (block + 1) * BLOCK_M) of (batch, head) bh: dq (BLOCK_M, Dk)."""
    start_m, bh, offs_m, base_qk, base_v = _rows(block, bh, T, H, DK, DV, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    q = _load_tile(Q, base_qk, offs_m, T, H * DK, DK, BLOCK_DK, True)
    do = _load_tile(DO, base_v, offs_m, T, H * DV, DV, BLOCK_DV, True)
    lse = tl.load(LSE + bh.to(tl.int64) * T_PAD + offs_m)
    delta = tl.load(DELTA + bh.to(tl.int64) * T_PAD + offs_m)
    dq = tl.zeros([BLOCK_M, BLOCK_DK], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _key_blocks(start_m, T, WINDOW, BLOCK_M, BLOCK_N)
    dq = _dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        K,
        V,
        base_qk,
        base_v,
        offs_m,
        lo,
        mid_lo,
        scale_log2,
        T,
        H,
        WINDOW,
        DK,
        DV,
        BLOCK_DK,
        BLOCK_DV,
        BLOCK_N,
        PRECISION,
        True,
    )
    dq = _dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        K,
        V,
        base_qk,
        base_v,
        offs_m,
        mid_lo,
        mid_hi,
        scale_log2,
        T,
        H,
        WINDOW,
        DK,
        DV,
        BLOCK_DK,
        BLOCK_DV,
        BLOCK_N,
        PRECISION,
        False,
    )
    dq = _dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        K,
        V,
        base_qk,
        base_v,
        offs_m,
        mid_hi,
        hi,
        scale_log2,
        T,
        H,
        WINDOW,
        DK,
        DV,
        BLOCK_DK,
        BLOCK_DV,
        BLOCK_N,
        PRECISION,
        True,
    )
    dq = dq * scale
    store_rows(DQ_OUT + base_qk, dq, offs_m, offs_dk, H * DK, offs_m < T, offs_dk < DK)


@triton.jit(do_not_specialize=["T", "H", "WINDOW", "KEY_BLOCKS"])
def _swa_bwd(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ_OUT,
    DK_OUT,
    DV_OUT,
    scale,
    scale_log2,
    T,
    H,
    WINDOW,
    T_PAD,
    KEY_BLOCKS,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M1: tl.constexpr,
    BLOCK_N1: tl.constexpr,
    BLOCK_M2: tl.constexpr,
    BLOCK_N2: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The backward in one launch: programs [0, KEY_BLOCKS) of axis 0 compute dk, dv (_dkdv_block, BLOCK_M1
    queries x BLOCK_N1 keys), the rest dq (_dq_block, BLOCK_M2 x BLOCK_N2)."""
    pid = tl.program_id(0)
    if pid < KEY_BLOCKS:
        _dkdv_block(
            Q,
            K,
            V,
            DO,
            LSE,
            DELTA,
            DK_OUT,
            DV_OUT,
            scale,
            scale_log2,
            T,
            H,
            WINDOW,
            T_PAD,
            pid,
            tl.program_id(1),
            DK,
            DV,
            BLOCK_DK,
            BLOCK_DV,
            BLOCK_M1,
            BLOCK_N1,
            PRECISION,
        )
    else:
        _dq_block(
            Q,
            K,
            V,
            DO,
            LSE,
            DELTA,
            DQ_OUT,
            scale,
            scale_log2,
            T,
            H,
            WINDOW,
            T_PAD,
            pid - KEY_BLOCKS,
            tl.program_id(1),
            DK,
            DV,
            BLOCK_DK,
            BLOCK_DV,
            BLOCK_M2,
            BLOCK_N2,
            PRECISION,
        )


def _launch_config(dtype, dk, dv):
    """triton.Config per kernel: fwd (BLOCK_M queries x BLOCK_N keys); bwd, one launch of the dk/dv programs
    (BLOCK_M1 queries x BLOCK_N1 keys) and the dq programs (BLOCK_M2 x BLOCK_N2), so one warp and stage count;
    delta (BLOCK_M rows). bf16/fp16 with head sizes <= 128: the tiles timed fastest on an H100 at D = 128
    (bench.py); float32 or larger heads: smaller tiles; float32 with padded Dk + Dv > 256: smaller still,
    within an H100's 227 KB of shared memory up to Dk 256 + Dv 512; 16 x 16 under the CPU interpreter."""
    if INTERPRET:
        return dict(
            fwd=triton.Config(dict(BLOCK_M=16, BLOCK_N=16), num_warps=1, num_stages=1),
            bwd=triton.Config(
                dict(BLOCK_M1=16, BLOCK_N1=16, BLOCK_M2=16, BLOCK_N2=16), num_warps=1, num_stages=1
            ),
            delta=triton.Config(dict(BLOCK_M=16)),
        )
    if dtype == torch.float32 and block_size(dk) + block_size(dv) > 256:
        return dict(
            fwd=triton.Config(dict(BLOCK_M=32, BLOCK_N=16), num_warps=4, num_stages=1),
            bwd=triton.Config(
                dict(BLOCK_M1=16, BLOCK_N1=16, BLOCK_M2=16, BLOCK_N2=16), num_warps=4, num_stages=1
            ),
            delta=triton.Config(dict(BLOCK_M=16)),
        )
    if max(dk, dv) > 128 or dtype == torch.float32:
        return dict(
            fwd=triton.Config(dict(BLOCK_M=64, BLOCK_N=32), num_warps=4, num_stages=2),
            bwd=triton.Config(
                dict(BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32), num_warps=4, num_stages=2
            ),
            delta=triton.Config(dict(BLOCK_M=32)),
        )
    return dict(
        fwd=triton.Config(dict(BLOCK_M=128, BLOCK_N=64), num_warps=8, num_stages=3),
        bwd=triton.Config(
            dict(BLOCK_M1=64, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=64), num_warps=8, num_stages=3
        ),
        delta=triton.Config(dict(BLOCK_M=64)),
    )


def _padded_rows(T, config):
    """Length of the (B, H, t_pad) row statistics lse and delta: T rounded up to a multiple of every block, so the
    backward loads them without bounds checks (pad rows hold 0)."""
    largest = max(block for kernel in config.values() for block in kernel.kwargs.values())
    return triton.cdiv(T, largest) * largest


def _dims(dk, dv, dtype):
    return dict(
        DK=dk,
        DV=dv,
        BLOCK_DK=block_size(dk),
        BLOCK_DV=block_size(dv),
        PRECISION="upcast" if INTERPRET else ("tf32x3" if dtype == torch.float32 else "tf32"),
    )


class _SlidingWindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, scale):
        B, T, H, dk = q.shape
        dv = v.shape[-1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o = torch.empty_like(v)
        config = _launch_config(q.dtype, dk, dv)
        t_pad = _padded_rows(T, config)
        lse = torch.empty(B, H, t_pad, device=q.device, dtype=torch.float32)
        grid = (triton.cdiv(T, config["fwd"].kwargs["BLOCK_M"]), B * H)
        _swa_fwd[grid](
            q,
            k,
            v,
            o,
            lse,
            scale * LOG2E,
            T,
            H,
            window,
            t_pad,
            **_dims(dk, dv, q.dtype),
            **launch_options(config["fwd"]),
        )
        if t_pad > T:
            lse[:, :, T:] = 0.0  # pad rows (zero q and do rows in the backward) need finite values
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.window, ctx.scale = window, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        B, T, H, dk = q.shape
        dv = v.shape[-1]
        do = do.contiguous()
        dq, dk_, dv_ = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        config = _launch_config(q.dtype, dk, dv)
        dims = _dims(dk, dv, q.dtype)
        t_pad = lse.shape[-1]
        delta = torch.empty_like(lse)  # (B, H, t_pad) rowsum(o * do)
        _swa_bwd_delta[(triton.cdiv(t_pad, config["delta"].kwargs["BLOCK_M"]), B * H)](
            o, do, delta, T, H, t_pad, DV=dv, BLOCK_DV=dims["BLOCK_DV"], **launch_options(config["delta"])
        )
        args = (ctx.scale, ctx.scale * LOG2E, T, H, ctx.window, t_pad)
        blocks = config["bwd"].kwargs
        key_blocks, query_blocks = triton.cdiv(T, blocks["BLOCK_N1"]), triton.cdiv(T, blocks["BLOCK_M2"])
        _swa_bwd[(key_blocks + query_blocks, B * H)](
            q, k, v, do, lse, delta, dq, dk_, dv_, *args, key_blocks, **dims, **launch_options(config["bwd"])
        )
        return dq, dk_, dv_, None, None


def sliding_window_attention(q, k, v, window, scale=None):
    """Causal sliding-window attention. q, k (B,T,H,Dk), v (B,T,H,Dv) -> (B,T,H,Dv).

    Query i attends to keys j with i - window < j <= i; scale defaults to Dk**-0.5. Positions (RoPE) are the
    caller's: the model rotates q and k before calling it.
    """
    check_qkv("sliding_window_attention", q, k, v)
    if int(window) != window or window < 1:
        raise ValueError(f"sliding_window_attention: window must be a positive integer, got {window}")
    check_device("sliding_window_attention", q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _SlidingWindowAttention.apply(q, k, v, int(window), float(scale))
