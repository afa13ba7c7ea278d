"""The Trigger's CL-OGD step (Sec. 2.2, eqs. 2-7) fused in Triton, forward and backward.

Per token (vectors of size d_t = D, bank size K), with A_k = W_k k + b_k and Q_k = W_k q + b_k:
  z  = sum_k p_k A_k                      W(p) k + b(p), eq.(6)
  y  = LN(z), sigma = sqrt(var(z) + eps)  LayerNorm without affine, eps 1e-5
  r  = 2 (k + y - v)                      dL/df of L = ||f(k; p) - v||^2, eq.(3)
  u  = (r - mean(r) - y mean(r y)) / sigma      dL/dz (LayerNorm backward)
  g_k = <u, A_k>                          dL/dp, eqs.(4), (7)
  p' = p - eta g                          eq.(5)
  c  = q + LN(sum_k p'_k Q_k)             eq.(2)
A_k and Q_k are recomputed tile by tile from the bank (one (BLOCK_T x D) @ (D x D) product per k), so
no (D x D) matrix per token and no (K x D) tensor per token ever reaches memory.

Backward (the second-order path; derivation in _trigger_bwd's comments). With the cotangents dc, dp':
  dzq = LN_bwd(dc)                        at the read-out LayerNorm
  M_k = W_k^T dzq:  dp'_k += <M_k, q> + <b_k, dzq>  (= <Q_k, dzq>);  dq = dc + sum_k p'_k M_k
  dp = dp';  deta = -<dp', g>;  dg = -eta dp'
  unless detach_inner_grad: dg flows through g = A u into u (second order through the LayerNorm),
  r and z, giving dz_tot, dk, dv and more of dp:
    du = sum_k dg_k A_k;  dk = 2 dr + sum_k (dg_k W_k^T u + p_k N_k),  N_k = W_k^T dz_tot;
    dp_k += <N_k, k> + <b_k, dz_tot>   (= <A_k, dz_tot>)
  Every product has a loop-invariant left operand (k, q, u, dzq, dz_tot) and a bank block on the right.
  Bank: dW_k = sum_tokens (dg_k u + p_k dz_tot) k^T + p'_k dzq q^T, db_k likewise without the outer k/q;
  a separate kernel sums these over tokens, KB bank blocks per program, without forming them per token.

Kernels (one program = BLOCK_T tokens, except the bank kernel):
  _trigger_fwd       three passes over the bank (z; g; p' and zq); writes c, p' and what the backward
                     reuses (y, 1/sigma, g, yq, 1/sigma_q).
  _trigger_bwd       four passes over the bank (one when detached: M_k; then U_k, A_k, N_k); writes dq, dk,
                     dv, dp, deta and the per-token vectors the bank gradient needs (u, dz_tot, dzq, dg).
  _trigger_bwd_bank  one program = KB bank blocks and one slice of the tokens; writes the partial dW
                     (KB, D, D) and db (KB, D), which PyTorch sums over the slices.
Each loop over the bank has one left operand, held in registers by the tensor cores; tiles are reloaded
rather than kept, so that registers do not spill, and the per-bank-block results that a later loop needs
(g, dp, dg columns) go through memory, ordered by a barrier. The bank is padded on the host to BLOCK_D (a
power of two >= 16), so its tiles load unmasked; the token tensors' pad columns are masked and stay zero.

Precision: float32 inputs get float32-accurate products as three tf32 tensor-core products (hi*hi + lo*hi +
hi*lo, "tf32x3") split here: the bank once per call on the host (hi = rounded to tf32, lo = the rest), each
left operand once per program, so the tensor cores read both halves of the bank from shared memory.
bfloat16 inputs use one tf32 product. The CPU interpreter runs the same split, with exact products.
"""

import torch
import triton
import triton.language as tl

from kernels.common import INTERPRET, block_size, check_device, launch_options, load_rows, store_rows

LN_EPS = tl.constexpr(1e-5)  # torch.nn.functional.layer_norm's default, as nirvana.fast_weight_function uses


@triton.jit
def _layer_norm(z, col_ok, D: tl.constexpr):
    """Row-wise LayerNorm without affine over the first D columns. z (BLOCK_T, BLOCK_D) -> y, 1/sigma."""
    mean = tl.sum(z, 1) / D
    zc = tl.where(col_ok[None, :], z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, 1) / D + LN_EPS)
    return zc * rstd[:, None], rstd


@triton.jit
def _layer_norm_bwd(dy, y, rstd, col_ok, D: tl.constexpr):
    """LayerNorm backward (no affine): (dy - mean(dy) - y mean(dy y)) / sigma, zero in pad columns."""
    mean_dy = tl.sum(dy, 1) / D
    mean_dyy = tl.sum(dy * y, 1) / D
    return tl.where(col_ok[None, :], (dy - mean_dy[:, None] - y * mean_dyy[:, None]) * rstd[:, None], 0.0)


@triton.jit
def _split(x, SPLIT: tl.constexpr):
    """x = hi + lo, hi = x rounded to tf32 (10 mantissa bits, to nearest), lo the float32 rest (x, x if not SPLIT)."""
    if SPLIT:
        hi = ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
        return hi, x - hi
    else:
        return x, x


@triton.jit
def _mm(a_hi, a_lo, b_hi, b_lo, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b: three tf32 products when SPLIT (the small terms first), else one at PRECISION."""
    if SPLIT:
        acc = tl.dot(a_lo, b_hi, input_precision="tf32")
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
        return tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    else:
        return tl.dot(a_hi, b_hi, input_precision=PRECISION)


@triton.jit
def _bank_mm(
    a_hi, a_lo, BH, BL, kb, offs_d, SPLIT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr
):
    """a (BLOCK_T, BLOCK_D) @ M_kb^T for the padded bank M (K, BLOCK_D, BLOCK_D) given as hi (BH) and lo (BL):
    out[t, n] = sum_c a[t, c] M[kb, n, c]. The tile is read row-major and transposed, so the reduced index c
    is contiguous (K-major, as tf32 tensor-core products need)."""
    tile = kb * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :]
    b_hi = tl.trans(tl.load(BH + tile))
    if SPLIT:
        b_lo = tl.trans(tl.load(BL + tile))
    else:
        b_lo = b_hi
    return _mm(a_hi, a_lo, b_hi, b_lo, SPLIT, PRECISION)


@triton.jit
def _load_col(X, offs_t, row_ok, kb, K: tl.constexpr):
    """Column kb of a (N, K) tensor for the program's tokens, as float32."""
    return tl.load(X + offs_t * K + kb, mask=row_ok, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["N"])
def _trigger_fwd(
    Qx,
    Kx,
    Vx,
    P,
    ETA,
    WH,
    WL,
    BB,
    C,
    PNEW,
    Y,
    RSTD,
    G,
    YQ,
    RSTDQ,
    N,
    D: tl.constexpr,
    K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program: tokens [start, start + BLOCK_T); c (BLOCK_T, D), p' (BLOCK_T, K).
    WH, WL: the bank (K, BLOCK_D, BLOCK_D) as W[k, i, j] (hi and lo halves); BB (K, BLOCK_D).
    Each loop over the bank has one left operand (held in registers by the tensor cores, as hi and lo), and
    tiles are reloaded where needed rather than kept, so that registers never spill."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_t < N
    col_ok = offs_d < D
    k = load_rows(Kx, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32)  # (BLOCK_T, BLOCK_D)
    k_hi, k_lo = _split(k, SPLIT)
    # pass 1: z = sum_k p_k (W_k k + b_k)
    z = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for kb in range(K):
        b = tl.load(BB + kb * BLOCK_D + offs_d)
        a = _bank_mm(k_hi, k_lo, WH, WL, kb, offs_d, SPLIT, PRECISION, BLOCK_D) + b[None, :]  # A_k
        z += _load_col(P, offs_t, row_ok, kb, K)[:, None] * a
    y, rstd = _layer_norm(z, col_ok, D)
    store_rows(Y, y, offs_t, offs_d, D, row_ok, col_ok)
    tl.store(RSTD + offs_t, rstd, mask=row_ok)
    # dL/df, eq.(3)
    r = 2.0 * (
        load_rows(Kx, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32)
        + y
        - load_rows(Vx, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32)
    )
    u = _layer_norm_bwd(r, y, rstd, col_ok, D)  # dL/dz
    # pass 2: g_k = <u, A_k> (eq. 7)
    for kb in range(K):
        b = tl.load(BB + kb * BLOCK_D + offs_d)
        a = _bank_mm(k_hi, k_lo, WH, WL, kb, offs_d, SPLIT, PRECISION, BLOCK_D) + b[None, :]
        tl.store(G + offs_t * K + kb, tl.sum(u * a, 1), mask=row_ok)
    # pass 3: p'_k = p_k - eta g_k (eq. 5), zq = sum_k p'_k (W_k q + b_k); it reads back the g columns that
    # pass 2 stored (other threads' stores: the barrier orders them)
    tl.debug_barrier()
    eta = tl.load(ETA + offs_t, mask=row_ok, other=0.0).to(tl.float32)
    q_hi, q_lo = _split(load_rows(Qx, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32), SPLIT)
    zq = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for kb in range(K):
        b = tl.load(BB + kb * BLOCK_D + offs_d)
        p_new_k = _load_col(P, offs_t, row_ok, kb, K) - eta * _load_col(G, offs_t, row_ok, kb, K)
        zq += p_new_k[:, None] * (
            _bank_mm(q_hi, q_lo, WH, WL, kb, offs_d, SPLIT, PRECISION, BLOCK_D) + b[None, :]
        )
        tl.store(PNEW + offs_t * K + kb, p_new_k.to(PNEW.dtype.element_ty), mask=row_ok)
    yq, rstdq = _layer_norm(zq, col_ok, D)
    store_rows(YQ, yq, offs_t, offs_d, D, row_ok, col_ok)
    tl.store(RSTDQ + offs_t, rstdq, mask=row_ok)
    c = load_rows(Qx, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32) + yq
    store_rows(C, c, offs_t, offs_d, D, row_ok, col_ok)


@triton.jit(do_not_specialize=["N"])
def _trigger_bwd(
    Qx,
    Kx,
    Vx,
    P,
    ETA,
    WH,
    WL,
    WTH,
    WTL,
    BB,
    Y,
    RSTD,
    G,
    YQ,
    RSTDQ,
    DC,
    DPNEW,
    DQ,
    DK,
    DV,
    DP,
    DETA,
    U,
    DZT,
    DZQ,
    DG,
    N,
    D: tl.constexpr,
    K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    DETACH: tl.constexpr,
):
    """One program: tokens [start, start + BLOCK_T); gradients of q, k, v (BLOCK_T, D), p (BLOCK_T, K), eta.
    WH, WL: the padded bank W[k, i, j]; WTH, WTL: its transpose W[k, j, i] (hi and lo halves). One left
    operand per loop over the bank, as in _trigger_fwd; later passes read back the dp and dg columns that
    pass 1 stored (other threads' stores: the barriers order them)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_t < N
    col_ok = offs_d < D
    dc = load_rows(DC, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32)
    # through c = q + LN(zq)
    dzq = _layer_norm_bwd(
        dc,
        load_rows(YQ, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32),
        tl.load(RSTDQ + offs_t, mask=row_ok, other=1.0),
        col_ok,
        D,
    )
    store_rows(DZQ, dzq, offs_t, offs_d, D, row_ok, col_ok)
    dzq_hi, dzq_lo = _split(dzq, SPLIT)
    q = load_rows(Qx, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32)
    eta = tl.load(ETA + offs_t, mask=row_ok, other=0.0).to(tl.float32)
    # pass 1: the read-out c = f(q; p') and the step p' = p - eta g. M_k = dzq @ W_k (W_k^T dzq per token)
    # gives dp'_k = <Q_k, dzq> = <M_k, q> + <b_k, dzq> and dq = dc + sum_k p'_k M_k.
    dq = dc
    deta = tl.zeros([BLOCK_T], dtype=tl.float32)
    for kb in range(K):
        b = tl.load(BB + kb * BLOCK_D + offs_d)
        g_k = _load_col(G, offs_t, row_ok, kb, K)
        m = _bank_mm(dzq_hi, dzq_lo, WTH, WTL, kb, offs_d, SPLIT, PRECISION, BLOCK_D)  # M_k
        dp_new_k = tl.sum(m * q + dzq * b[None, :], 1) + _load_col(DPNEW, offs_t, row_ok, kb, K)
        dq += (_load_col(P, offs_t, row_ok, kb, K) - eta * g_k)[:, None] * m
        deta -= dp_new_k * g_k
        tl.store(DP + offs_t * K + kb, dp_new_k.to(DP.dtype.element_ty), mask=row_ok)
        if not DETACH:
            tl.store(DG + offs_t * K + kb, -eta * dp_new_k, mask=row_ok)
    store_rows(DQ, dq, offs_t, offs_d, D, row_ok, col_ok)
    tl.store(DETA + offs_t, deta.to(DETA.dtype.element_ty), mask=row_ok)
    if not DETACH:
        # dg = -eta dp' flows through g_k = <u, A_k> into A_k and u (second order through the LayerNorm)
        tl.debug_barrier()
        y = load_rows(Y, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32)
        rstd = tl.load(RSTD + offs_t, mask=row_ok, other=1.0)
        u = _layer_norm_bwd(
            2.0
            * (
                load_rows(Kx, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32)
                + y
                - load_rows(Vx, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32)
            ),
            y,
            rstd,
            col_ok,
            D,
        )
        store_rows(U, u, offs_t, offs_d, D, row_ok, col_ok)
        # pass 2: dk's part sum_k dg_k W_k^T u (U_k = u @ W_k)
        u_hi, u_lo = _split(u, SPLIT)
        dk = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for kb in range(K):
            dk += _load_col(DG, offs_t, row_ok, kb, K)[:, None] * _bank_mm(
                u_hi, u_lo, WTH, WTL, kb, offs_d, SPLIT, PRECISION, BLOCK_D
            )
        # pass 3: du = sum_k dg_k A_k (A_k = W_k k + b_k)
        k_hi, k_lo = _split(load_rows(Kx, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32), SPLIT)
        du = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for kb in range(K):
            b = tl.load(BB + kb * BLOCK_D + offs_d)
            du += _load_col(DG, offs_t, row_ok, kb, K)[:, None] * (
                _bank_mm(k_hi, k_lo, WH, WL, kb, offs_d, SPLIT, PRECISION, BLOCK_D) + b[None, :]
            )
        # u = J r with J = (I - 11^T/D - y y^T/D) / sigma symmetric, J and sigma functions of z
        y = load_rows(Y, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32)
        r = 2.0 * (
            load_rows(Kx, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32)
            + y
            - load_rows(Vx, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32)
        )
        dr = _layer_norm_bwd(du, y, rstd, col_ok, D)  # J du
        mean_yr = tl.sum(y * r, 1) / D
        mean_duy = tl.sum(du * y, 1) / D
        dy = -rstd[:, None] * (du * mean_yr[:, None] + r * mean_duy[:, None])  # through y inside J
        dy += 2.0 * dr  # r = 2 (k + y - v)
        u = load_rows(U, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32)
        dsigma = -rstd * tl.sum(du * u, 1)  # u ~ 1/sigma
        dzt = _layer_norm_bwd(dy, y, rstd, col_ok, D) + tl.where(
            col_ok[None, :], dsigma[:, None] * y / D, 0.0
        )
        store_rows(DZT, dzt, offs_t, offs_d, D, row_ok, col_ok)
        store_rows(DV, -2.0 * dr, offs_t, offs_d, D, row_ok, col_ok)
        dk += 2.0 * dr
        # pass 4: z = sum_k p_k A_k; with N_k = dz_tot @ W_k: dp_k += <A_k, dz_tot> = <N_k, k> + <b_k, dz_tot>,
        # dk += p_k N_k
        dzt_hi, dzt_lo = _split(dzt, SPLIT)
        k = load_rows(Kx, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32)
        for kb in range(K):
            b = tl.load(BB + kb * BLOCK_D + offs_d)
            n = _bank_mm(dzt_hi, dzt_lo, WTH, WTL, kb, offs_d, SPLIT, PRECISION, BLOCK_D)  # N_k
            dp_k = _load_col(DP, offs_t, row_ok, kb, K) + tl.sum(n * k + dzt * b[None, :], 1)
            tl.store(DP + offs_t * K + kb, dp_k.to(DP.dtype.element_ty), mask=row_ok)
            dk += _load_col(P, offs_t, row_ok, kb, K)[:, None] * n
        store_rows(DK, dk, offs_t, offs_d, D, row_ok, col_ok)


@triton.jit(do_not_specialize=["N", "TOKENS_PER_SLICE"])
def _trigger_bwd_bank(
    Qx,
    Kx,
    P,
    G,
    ETA,
    U,
    DZT,
    DZQ,
    DG,
    DW_PART,
    DB_PART,
    N,
    TOKENS_PER_SLICE,
    D: tl.constexpr,
    K: tl.constexpr,
    KB: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    DETACH: tl.constexpr,
):
    """One program: bank blocks [k0, k0 + KB), tokens of one slice; partial dW (KB, BLOCK_D, BLOCK_D) and
    db (KB, BLOCK_D), padded.

    dW_k = sum_t (dg_k u + p_k dz_tot)(t) k(t)^T + p'_k dzq(t) q(t)^T; db_k = the same sums without k, q.
    The KB blocks are stacked into one product: rows k * BLOCK_D + i of the (KB * BLOCK_D, BLOCK_D) result.
    """
    k0 = tl.program_id(0) * KB
    part = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    offs_kb = k0 + tl.arange(0, KB)
    col_ok = offs_d < D
    dw = tl.zeros([KB * BLOCK_D, BLOCK_D], dtype=tl.float32)
    db = tl.zeros([KB, BLOCK_D], dtype=tl.float32)
    start = part * TOKENS_PER_SLICE
    end = tl.minimum(start + TOKENS_PER_SLICE, N)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        row_ok = offs_t < end
        cols = offs_t[:, None] * K + offs_kb[None, :]  # (BLOCK_T, KB)
        eta = tl.load(ETA + offs_t, mask=row_ok, other=0.0).to(tl.float32)
        p = tl.load(P + cols, mask=row_ok[:, None], other=0.0).to(tl.float32)
        p_new = p - eta[:, None] * tl.load(G + cols, mask=row_ok[:, None], other=0.0)
        dzq = load_rows(DZQ, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32)
        d_a = p_new[:, :, None] * dzq[:, None, :]  # (BLOCK_T, KB, BLOCK_D)
        b_hi, b_lo = _split(load_rows(Qx, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32), SPLIT)
        a_hi, a_lo = _split(tl.trans(tl.reshape(d_a, [BLOCK_T, KB * BLOCK_D])), SPLIT)
        dw += _mm(a_hi, a_lo, b_hi, b_lo, SPLIT, PRECISION)
        db += tl.sum(d_a, 0)
        if not DETACH:
            dg = tl.load(DG + cols, mask=row_ok[:, None], other=0.0)
            u = load_rows(U, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32)
            dzt = load_rows(DZT, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32)
            d_a = dg[:, :, None] * u[:, None, :] + p[:, :, None] * dzt[:, None, :]
            b_hi, b_lo = _split(load_rows(Kx, offs_t, offs_d, D, row_ok, col_ok).to(tl.float32), SPLIT)
            a_hi, a_lo = _split(tl.trans(tl.reshape(d_a, [BLOCK_T, KB * BLOCK_D])), SPLIT)
            dw += _mm(a_hi, a_lo, b_hi, b_lo, SPLIT, PRECISION)
            db += tl.sum(d_a, 0)
    rows = (part.to(tl.int64) * K + k0) * BLOCK_D + tl.arange(0, KB * BLOCK_D)
    tl.store(DW_PART + rows[:, None] * BLOCK_D + offs_d[None, :], dw)
    tl.store(DB_PART + (part.to(tl.int64) * K + offs_kb[:, None]) * BLOCK_D + offs_d[None, :], db)


def _launch_config():
    """triton.Config per kernel: BLOCK_T tokens per program, warps and stages; the bank kernel's KB bank
    blocks per program (1 where K is not a multiple of it) and BANK_SLICES token slices (partial sums added
    in PyTorch)."""
    if INTERPRET:
        return dict(
            fwd=triton.Config(dict(BLOCK_T=16), num_warps=1, num_stages=1),
            bwd=triton.Config(dict(BLOCK_T=16), num_warps=1, num_stages=1),
            bank=triton.Config(dict(BLOCK_T=16, KB=2), num_warps=1, num_stages=1),
        )
    return dict(
        fwd=triton.Config(dict(BLOCK_T=64), num_warps=4, num_stages=2),
        bwd=triton.Config(dict(BLOCK_T=64), num_warps=4, num_stages=2),
        bank=triton.Config(dict(BLOCK_T=64, KB=2), num_warps=8, num_stages=3),
    )


BANK_SLICES = 2 if INTERPRET else 8


def _precision(q):
    """Kernel arguments of the products: the three-way tf32 split for float32 inputs (float32-accurate
    products), one tf32 product for bfloat16 inputs; the interpreter runs the split with exact products."""
    return dict(SPLIT=q.dtype == torch.float32, PRECISION="ieee" if INTERPRET else "tf32")


def _padded_bank(bank_weight, bank_bias, block_d, split):
    """The bank as float32 (K, block_d, block_d), zero-padded, split into tf32 hi and float32 lo halves (lo is hi
    when not split); and the bias (K, block_d). The backward takes the transposed halves from these (padding
    and splitting act element by element, so they commute with the transpose)."""
    D = bank_weight.shape[-1]
    w = torch.nn.functional.pad(bank_weight.float(), (0, block_d - D, 0, block_d - D)).contiguous()
    if split:
        hi = ((w.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)
        lo = w - hi
    else:
        hi = lo = w
    bias = torch.nn.functional.pad(bank_bias.float(), (0, block_d - D)).contiguous()
    return hi, lo, bias


class _TriggerStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, p, eta, bank_weight, bank_bias, detach):
        N, D = q.shape
        K = p.shape[-1]
        block_d = block_size(D)
        config = _launch_config()["fwd"]
        f32 = dict(device=q.device, dtype=torch.float32)
        c, p_new = torch.empty_like(q), torch.empty_like(p)
        y, yq, g = torch.empty(N, D, **f32), torch.empty(N, D, **f32), torch.empty(N, K, **f32)
        rstd, rstdq = torch.empty(N, **f32), torch.empty(N, **f32)
        wh, wl, bias = _padded_bank(bank_weight, bank_bias, block_d, q.dtype == torch.float32)
        _trigger_fwd[(triton.cdiv(N, config.kwargs["BLOCK_T"]),)](
            q,
            k,
            v,
            p,
            eta,
            wh,
            wl,
            bias,
            c,
            p_new,
            y,
            rstd,
            g,
            yq,
            rstdq,
            N,
            D=D,
            K=K,
            BLOCK_D=block_d,
            **_precision(q),
            **launch_options(config),
        )
        ctx.save_for_backward(q, k, v, p, eta, wh, wl, bias, y, rstd, g, yq, rstdq)
        ctx.detach, ctx.bank_dtypes = detach, (bank_weight.dtype, bank_bias.dtype)
        return c, p_new

    @staticmethod
    def backward(ctx, dc, dp_new):
        q, k, v, p, eta, wh, wl, bias, y, rstd, g, yq, rstdq = ctx.saved_tensors
        N, D = q.shape
        K = p.shape[-1]
        block_d, precision = block_size(D), _precision(q)
        config = _launch_config()
        dc = dc.contiguous() if dc is not None else torch.zeros_like(q)
        dp_new = dp_new.contiguous() if dp_new is not None else torch.zeros_like(p)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dp, deta = torch.empty_like(p), torch.empty_like(eta)
        f32 = dict(device=q.device, dtype=torch.float32)
        u, dzt, dzq, dg = (
            torch.empty(N, D, **f32),
            torch.empty(N, D, **f32),
            torch.empty(N, D, **f32),
            torch.empty(N, K, **f32),
        )
        wth = wh.transpose(1, 2).contiguous()
        wtl = wl.transpose(1, 2).contiguous() if precision["SPLIT"] else wth
        _trigger_bwd[(triton.cdiv(N, config["bwd"].kwargs["BLOCK_T"]),)](
            q,
            k,
            v,
            p,
            eta,
            wh,
            wl,
            wth,
            wtl,
            bias,
            y,
            rstd,
            g,
            yq,
            rstdq,
            dc,
            dp_new,
            dq,
            dk,
            dv,
            dp,
            deta,
            u,
            dzt,
            dzq,
            dg,
            N,
            D=D,
            K=K,
            BLOCK_D=block_d,
            DETACH=ctx.detach,
            **precision,
            **launch_options(config["bwd"]),
        )
        # bank gradient: K / KB groups of bank blocks x token slices, the slices summed here
        block_t = config["bank"].kwargs["BLOCK_T"]
        kb = min(config["bank"].kwargs["KB"], K)
        kb = kb if K % kb == 0 else 1
        slices = max(1, min(triton.cdiv(N, block_t), BANK_SLICES))
        tokens_per_slice = block_t * triton.cdiv(triton.cdiv(N, block_t), slices)
        slices = triton.cdiv(N, tokens_per_slice)
        dw_part = torch.empty(slices, K, block_d, block_d, **f32)
        db_part = torch.empty(slices, K, block_d, **f32)
        _trigger_bwd_bank[(K // kb, slices)](
            q,
            k,
            p,
            g,
            eta,
            u,
            dzt,
            dzq,
            dg,
            dw_part,
            db_part,
            N,
            tokens_per_slice,
            D=D,
            K=K,
            BLOCK_D=block_d,
            DETACH=ctx.detach,
            **precision,
            **launch_options(config["bank"], KB=kb),
        )
        dw = dw_part.sum(0)[:, :D, :D].to(ctx.bank_dtypes[0])
        db = db_part.sum(0)[:, :D].to(ctx.bank_dtypes[1])
        if ctx.detach:  # the inner gradient is a constant: k and v only reach c and p' through it
            dk, dv = None, None
        return dq, dk, dv, dp, deta, dw, db, None


def _check_inputs(q, k, v, p_prev, eta, bank_weight, bank_bias):
    K, D = bank_bias.shape
    if q.shape[-1] != D or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"trigger_step: q, k, v must share one shape (..., d_t={D}); "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if bank_weight.shape != (K, D, D):
        raise ValueError(
            f"trigger_step: bank_weight must be (K, d_t, d_t) = {(K, D, D)}, got {tuple(bank_weight.shape)}"
        )
    if p_prev.shape[-1] != K:
        raise ValueError(f"trigger_step: p_prev must end in K={K}, got {tuple(p_prev.shape)}")
    if eta.dim() > q.dim() - 1:
        raise ValueError(f"trigger_step: eta must be (N...,) = {tuple(q.shape[:-1])}, got {tuple(eta.shape)}")
    check_device("trigger_step", q, k, v, p_prev, eta, bank_weight, bank_bias)


def trigger_step(q, k, v, p_prev, eta, bank_weight, bank_bias, detach_inner_grad=False):
    """One CL-OGD step of the Trigger, fused. q, k, v (N..., d_t); p_prev (N..., K), eta (N...,),
    bank_weight (K, d_t, d_t), bank_bias (K, d_t). Returns c (N..., d_t), p_new (N..., K).

    p_prev and eta broadcast to the token shape (e.g. the all-ones p of the first post-prelude layer).
    With detach_inner_grad the inner gradient is a constant of the backward.
    """
    _check_inputs(q, k, v, p_prev, eta, bank_weight, bank_bias)
    lead = q.shape[:-1]
    D, K = q.shape[-1], bank_bias.shape[0]
    p_flat = p_prev.expand(*lead, K).reshape(-1, K).contiguous()
    eta_flat = eta.expand(lead).reshape(-1).contiguous()
    c, p_new = _TriggerStep.apply(
        q.reshape(-1, D).contiguous(),
        k.reshape(-1, D).contiguous(),
        v.reshape(-1, D).contiguous(),
        p_flat,
        eta_flat,
        bank_weight.contiguous(),
        bank_bias.contiguous(),
        bool(detach_inner_grad),
    )
    return c.view(*lead, D), p_new.view(*lead, K)
