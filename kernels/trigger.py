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
  dp'_k += <Q_k, dzq>;  dq = dc + sum_k p'_k W_k^T dzq
  dp = dp';  deta = -<dp', g>;  dg = -eta dp'
  unless detach_inner_grad: dg flows through g = A u into u (second order through the LayerNorm),
  r and z, giving dz_tot, dk, dv and more of dp.
  Bank: dW_k = sum_tokens (dg_k u + p_k dz_tot) k^T + p'_k dzq q^T, db_k likewise without the outer k/q;
  a separate kernel sums these over tokens per bank block, without forming them per token.

Kernels:
  _trigger_fwd  one program = BLOCK_T tokens; two passes over the K bank blocks; writes c, p' and what the
                backward reuses (y, 1/sigma, g, yq, 1/sigma_q).
  _trigger_bwd  one program = BLOCK_T tokens; two passes over the bank; writes dq, dk, dv, dp, deta and
                the per-token vectors the bank gradient needs (u, dz_tot, dzq, dg).
  _trigger_bwd_bank  one program = one bank block k and one slice of the tokens; writes the partial
                dW_k (D x D) and db_k (D,); the slices (up to 16) are summed in PyTorch.
Block sizes: BLOCK_T = 32 tokens per program on the GPU (16 under the CPU interpreter); BLOCK_D, BLOCK_K =
D, K rounded up to a power of two >= 16 (pad columns are masked). Products run as tf32x3 on the GPU.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LN_EPS = tl.constexpr(1e-5)   # torch.nn.functional.layer_norm's default, as nirvana.fast_weight_function uses


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
def _bank_block(BWT, BB, kb, offs_d, col_ok, D: tl.constexpr):
    """W_k^T (BLOCK_D, BLOCK_D), element [j, i] = W[k, i, j], from the transposed bank BWT (K, D, D),
    and b_k (BLOCK_D,), as float32."""
    w_t = tl.load(BWT + kb * D * D + offs_d[:, None] * D + offs_d[None, :],
                  mask=col_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    b = tl.load(BB + kb * D + offs_d, mask=col_ok, other=0.0).to(tl.float32)
    return w_t, b


@triton.jit
def _load_rows(X, offs_t, offs_d, row_ok, col_ok, D: tl.constexpr):
    return tl.load(X + offs_t[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & col_ok[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _store_rows(X, x, offs_t, offs_d, row_ok, col_ok, D: tl.constexpr):
    tl.store(X + offs_t[:, None] * D + offs_d[None, :], x.to(X.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["N"])
def _trigger_fwd(Qx, Kx, Vx, P, ETA, BWT, BB, C, PNEW, Y, RSTD, G, YQ, RSTDQ, N,
                 D: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_T: tl.constexpr, PRECISION: tl.constexpr):
    """One program: tokens [start, start + BLOCK_T); c (BLOCK_T, D), p' (BLOCK_T, K)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_t < N
    col_ok = offs_d < D
    k = _load_rows(Kx, offs_t, offs_d, row_ok, col_ok, D)                       # (BLOCK_T, BLOCK_D)
    eta = tl.load(ETA + offs_t, mask=row_ok, other=0.0).to(tl.float32)
    # pass 1: z = sum_k p_k (W_k k + b_k)
    z = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for kb in range(K):
        w_t, b = _bank_block(BWT, BB, kb, offs_d, col_ok, D)
        a = tl.dot(k, w_t, input_precision=PRECISION) + b[None, :]            # A_k (BLOCK_T, BLOCK_D)
        p_k = tl.load(P + offs_t * K + kb, mask=row_ok, other=0.0).to(tl.float32)
        z += p_k[:, None] * a
    y, rstd = _layer_norm(z, col_ok, D)
    r = 2.0 * (k + y - _load_rows(Vx, offs_t, offs_d, row_ok, col_ok, D))      # dL/df, eq.(3)
    u = _layer_norm_bwd(r, y, rstd, col_ok, D)                                 # dL/dz
    # pass 2: g_k = <u, A_k>, p'_k = p_k - eta g_k, zq = sum_k p'_k (W_k q + b_k)
    q = _load_rows(Qx, offs_t, offs_d, row_ok, col_ok, D)
    zq = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    g = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for kb in range(K):
        w_t, b = _bank_block(BWT, BB, kb, offs_d, col_ok, D)
        g_k = tl.sum(u * (tl.dot(k, w_t, input_precision=PRECISION) + b[None, :]), 1)   # eq.(7)
        p_k = tl.load(P + offs_t * K + kb, mask=row_ok, other=0.0).to(tl.float32)
        p_new_k = p_k - eta * g_k                                                         # eq.(5)
        zq += p_new_k[:, None] * (tl.dot(q, w_t, input_precision=PRECISION) + b[None, :])
        g = tl.where(offs_k[None, :] == kb, g_k[:, None], g)
    yq, rstdq = _layer_norm(zq, col_ok, D)
    _store_rows(C, q + yq, offs_t, offs_d, row_ok, col_ok, D)                 # eq.(2)
    k_ok = offs_k < K
    p = tl.load(P + offs_t[:, None] * K + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                other=0.0).to(tl.float32)
    _store_rows(PNEW, p - eta[:, None] * g, offs_t, offs_k, row_ok, k_ok, K)
    _store_rows(G, g, offs_t, offs_k, row_ok, k_ok, K)
    _store_rows(Y, y, offs_t, offs_d, row_ok, col_ok, D)
    _store_rows(YQ, yq, offs_t, offs_d, row_ok, col_ok, D)
    tl.store(RSTD + offs_t, rstd, mask=row_ok)
    tl.store(RSTDQ + offs_t, rstdq, mask=row_ok)


@triton.jit(do_not_specialize=["N"])
def _trigger_bwd(Qx, Kx, Vx, P, ETA, BWT, BB, Y, RSTD, G, YQ, RSTDQ, DC, DPNEW,
                 DQ, DK, DV, DP, DETA, U, DZT, DZQ, DG, N,
                 D: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_T: tl.constexpr, PRECISION: tl.constexpr, DETACH: tl.constexpr):
    """One program: tokens [start, start + BLOCK_T); gradients of q, k, v (BLOCK_T, D), p (BLOCK_T, K), eta."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_t < N
    col_ok = offs_d < D
    k_ok = offs_k < K
    q = _load_rows(Qx, offs_t, offs_d, row_ok, col_ok, D)
    k = _load_rows(Kx, offs_t, offs_d, row_ok, col_ok, D)
    y = _load_rows(Y, offs_t, offs_d, row_ok, col_ok, D)
    yq = _load_rows(YQ, offs_t, offs_d, row_ok, col_ok, D)
    rstd = tl.load(RSTD + offs_t, mask=row_ok, other=1.0)
    rstdq = tl.load(RSTDQ + offs_t, mask=row_ok, other=1.0)
    eta = tl.load(ETA + offs_t, mask=row_ok, other=0.0).to(tl.float32)
    dc = _load_rows(DC, offs_t, offs_d, row_ok, col_ok, D)
    r = 2.0 * (k + y - _load_rows(Vx, offs_t, offs_d, row_ok, col_ok, D))
    u = _layer_norm_bwd(r, y, rstd, col_ok, D)
    dzq = _layer_norm_bwd(dc, yq, rstdq, col_ok, D)                             # through c = q + LN(zq)
    # pass 1 over the bank: the read-out c = f(q; p') and the step p' = p - eta g
    dq = dc
    du = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)                         # cotangent of u
    dp = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    dg = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    deta = tl.zeros([BLOCK_T], dtype=tl.float32)
    for kb in range(K):
        w_t, b = _bank_block(BWT, BB, kb, offs_d, col_ok, D)
        p_k = tl.load(P + offs_t * K + kb, mask=row_ok, other=0.0).to(tl.float32)
        g_k = tl.load(G + offs_t * K + kb, mask=row_ok, other=0.0)
        p_new_k = p_k - eta * g_k
        aq = tl.dot(q, w_t, input_precision=PRECISION) + b[None, :]             # Q_k
        dp_new_k = tl.sum(aq * dzq, 1) + tl.load(DPNEW + offs_t * K + kb, mask=row_ok, other=0.0).to(tl.float32)
        dq += tl.dot(p_new_k[:, None] * dzq, tl.trans(w_t), input_precision=PRECISION)
        dp = tl.where(offs_k[None, :] == kb, dp_new_k[:, None], dp)
        deta -= dp_new_k * g_k
        if not DETACH:
            dg_k = -eta * dp_new_k
            du += dg_k[:, None] * (tl.dot(k, w_t, input_precision=PRECISION) + b[None, :])   # g = A u
            dg = tl.where(offs_k[None, :] == kb, dg_k[:, None], dg)
    dk = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    dzt = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    if not DETACH:
        # u = J r with J = (I - 11^T/D - y y^T/D) / sigma symmetric, J and sigma functions of z
        dr = _layer_norm_bwd(du, y, rstd, col_ok, D)                             # J du
        mean_yr = tl.sum(y * r, 1) / D
        mean_duy = tl.sum(du * y, 1) / D
        dy = -rstd[:, None] * (du * mean_yr[:, None] + r * mean_duy[:, None])    # through y inside J
        dy += 2.0 * dr                                                           # r = 2 (k + y - v)
        dsigma = -rstd * tl.sum(du * u, 1)                                       # u is proportional to 1/sigma
        dzt = _layer_norm_bwd(dy, y, rstd, col_ok, D) + tl.where(col_ok[None, :], dsigma[:, None] * y / D, 0.0)
        dk = 2.0 * dr
        dv = -2.0 * dr
        # pass 2 over the bank: z = sum_k p_k A_k and g_k = <u, A_k> both read A_k = W_k k + b_k
        for kb in range(K):
            w_t, b = _bank_block(BWT, BB, kb, offs_d, col_ok, D)
            p_k = tl.load(P + offs_t * K + kb, mask=row_ok, other=0.0).to(tl.float32)
            dg_k = tl.sum(tl.where(offs_k[None, :] == kb, dg, 0.0), 1)
            a = tl.dot(k, w_t, input_precision=PRECISION) + b[None, :]
            dp = tl.where(offs_k[None, :] == kb, dp + tl.sum(a * dzt, 1)[:, None], dp)
            dk += tl.dot(dg_k[:, None] * u + p_k[:, None] * dzt, tl.trans(w_t), input_precision=PRECISION)
    _store_rows(DQ, dq, offs_t, offs_d, row_ok, col_ok, D)
    _store_rows(DK, dk, offs_t, offs_d, row_ok, col_ok, D)
    _store_rows(DV, dv, offs_t, offs_d, row_ok, col_ok, D)
    _store_rows(DP, dp, offs_t, offs_k, row_ok, k_ok, K)
    tl.store(DETA + offs_t, deta.to(DETA.dtype.element_ty), mask=row_ok)
    _store_rows(U, u, offs_t, offs_d, row_ok, col_ok, D)
    _store_rows(DZT, dzt, offs_t, offs_d, row_ok, col_ok, D)
    _store_rows(DZQ, dzq, offs_t, offs_d, row_ok, col_ok, D)
    _store_rows(DG, dg, offs_t, offs_k, row_ok, k_ok, K)


@triton.jit(do_not_specialize=["N", "TOKENS_PER_SLICE"])
def _trigger_bwd_bank(Qx, Kx, P, PNEW, U, DZT, DZQ, DG, DW_PART, DB_PART, N, TOKENS_PER_SLICE,
                      D: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                      PRECISION: tl.constexpr, DETACH: tl.constexpr):
    """One program: bank block k, tokens of one slice; partial dW_k (D, D) and db_k (D,).

    dW_k = sum_t (dg_k u + p_k dz_tot)(t) k(t)^T + p'_k dzq(t) q(t)^T; db_k = the same sums without k, q.
    """
    kb = tl.program_id(0)
    part = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_d < D
    dw = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = part * TOKENS_PER_SLICE
    end = tl.minimum(start + TOKENS_PER_SLICE, N)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        row_ok = offs_t < end
        p_new_k = tl.load(PNEW + offs_t * K + kb, mask=row_ok, other=0.0).to(tl.float32)
        dA_q = p_new_k[:, None] * _load_rows(DZQ, offs_t, offs_d, row_ok, col_ok, D)
        dw += tl.dot(tl.trans(dA_q), _load_rows(Qx, offs_t, offs_d, row_ok, col_ok, D), input_precision=PRECISION)
        db += tl.sum(dA_q, 0)
        if not DETACH:
            p_k = tl.load(P + offs_t * K + kb, mask=row_ok, other=0.0).to(tl.float32)
            dg_k = tl.load(DG + offs_t * K + kb, mask=row_ok, other=0.0)
            dA_k = (dg_k[:, None] * _load_rows(U, offs_t, offs_d, row_ok, col_ok, D)
                    + p_k[:, None] * _load_rows(DZT, offs_t, offs_d, row_ok, col_ok, D))
            dw += tl.dot(tl.trans(dA_k), _load_rows(Kx, offs_t, offs_d, row_ok, col_ok, D), input_precision=PRECISION)
            db += tl.sum(dA_k, 0)
    base = part.to(tl.int64) * K + kb
    tl.store(DW_PART + base * D * D + offs_d[:, None] * D + offs_d[None, :], dw,
             mask=col_ok[:, None] & col_ok[None, :])
    tl.store(DB_PART + base * D + offs_d, db, mask=col_ok)


def _config(D, K):
    """Tokens per program and warps: small under the CPU interpreter."""
    dims = dict(D=D, K=K, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_K=max(16, triton.next_power_of_2(K)))
    if INTERPRET:
        return dims, 16, 1
    return dims, 32, 4   # H100, N=16384, D=K=64: fwd+bwd 2.8 ms; 64 tokens 3.8 ms; 128 exceeds shared memory


def _precision():
    # three tf32 tensor-core products per product: float32-level error (~1e-6) at tensor-core speed; the
    # inputs are read in their dtype and all arithmetic is float32. The CPU interpreter multiplies exactly.
    return "ieee" if INTERPRET else "tf32x3"


class _TriggerStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, p, eta, bank_weight, bank_bias, detach):
        N, D = q.shape
        K = p.shape[-1]
        dims, block_t, warps = _config(D, K)
        f32 = dict(device=q.device, dtype=torch.float32)
        c, p_new = torch.empty_like(q), torch.empty_like(p)
        y, yq, g = torch.empty(N, D, **f32), torch.empty(N, D, **f32), torch.empty(N, K, **f32)
        rstd, rstdq = torch.empty(N, **f32), torch.empty(N, **f32)
        bank_weight_t = bank_weight.transpose(1, 2).contiguous()                     # (K, D, D) W_k^T
        _trigger_fwd[(triton.cdiv(N, block_t),)](
            q, k, v, p, eta, bank_weight_t, bank_bias, c, p_new, y, rstd, g, yq, rstdq, N, **dims,
            BLOCK_T=block_t, PRECISION=_precision(), num_warps=warps)
        ctx.save_for_backward(q, k, v, p, eta, bank_weight, bank_bias, p_new, y, rstd, g, yq, rstdq)
        ctx.detach = detach
        return c, p_new

    @staticmethod
    def backward(ctx, dc, dp_new):
        q, k, v, p, eta, bank_weight, bank_bias, p_new, y, rstd, g, yq, rstdq = ctx.saved_tensors
        N, D = q.shape
        K = p.shape[-1]
        dims, block_t, warps = _config(D, K)
        precision = _precision()
        dc = dc.contiguous() if dc is not None else torch.zeros_like(q)
        dp_new = dp_new.contiguous() if dp_new is not None else torch.zeros_like(p)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dp, deta = torch.empty_like(p), torch.empty_like(eta)
        f32 = dict(device=q.device, dtype=torch.float32)
        u, dzt, dzq, dg = (torch.empty(N, D, **f32), torch.empty(N, D, **f32), torch.empty(N, D, **f32),
                           torch.empty(N, K, **f32))
        _trigger_bwd[(triton.cdiv(N, block_t),)](
            q, k, v, p, eta, bank_weight.transpose(1, 2).contiguous(), bank_bias, y, rstd, g, yq, rstdq, dc, dp_new,
            dq, dk, dv, dp, deta, u, dzt, dzq, dg, N, **dims,
            BLOCK_T=block_t, PRECISION=precision, DETACH=ctx.detach, num_warps=warps)
        # bank gradient: K blocks x enough token slices to fill the GPU, summed here
        slices = max(1, min(triton.cdiv(N, block_t), 1 if INTERPRET else 16))
        tokens_per_slice = block_t * triton.cdiv(triton.cdiv(N, block_t), slices)
        slices = triton.cdiv(N, tokens_per_slice)
        dw_part = torch.empty(slices, K, D, D, **f32)
        db_part = torch.empty(slices, K, D, **f32)
        _trigger_bwd_bank[(K, slices)](
            q, k, p, p_new, u, dzt, dzq, dg, dw_part, db_part, N, tokens_per_slice,
            D=D, K=K, BLOCK_D=dims["BLOCK_D"], BLOCK_T=block_t, PRECISION=precision, DETACH=ctx.detach,
            num_warps=4)
        dw = dw_part.sum(0).to(bank_weight.dtype)
        db = db_part.sum(0).to(bank_bias.dtype)
        if ctx.detach:   # the inner gradient is a constant: k and v only reach c and p' through it
            dk, dv = None, None
        return dq, dk, dv, dp, deta, dw, db, None


def _check_inputs(q, k, v, p_prev, eta, bank_weight, bank_bias):
    K, D = bank_bias.shape
    if q.shape[-1] != D or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"trigger_step: q, k, v must share one shape (..., d_t={D}); "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if bank_weight.shape != (K, D, D):
        raise ValueError(f"trigger_step: bank_weight must be (K, d_t, d_t) = {(K, D, D)}, "
                         f"got {tuple(bank_weight.shape)}")
    if p_prev.shape[-1] != K:
        raise ValueError(f"trigger_step: p_prev must end in K={K}, got {tuple(p_prev.shape)}")
    if eta.dim() > q.dim() - 1:
        raise ValueError(f"trigger_step: eta must be (N...,) = {tuple(q.shape[:-1])}, got {tuple(eta.shape)}")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("trigger_step (Triton): tensors must be on CUDA, "
                           "or set TRITON_INTERPRET=1 before importing triton to run on the CPU")


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
    c, p_new = _TriggerStep.apply(q.reshape(-1, D).contiguous(), k.reshape(-1, D).contiguous(),
                                  v.reshape(-1, D).contiguous(), p_flat, eta_flat,
                                  bank_weight.contiguous(), bank_bias.contiguous(), bool(detach_inner_grad))
    return c.view(*lead, D), p_new.view(*lead, K)
