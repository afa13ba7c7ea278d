"""Triton kernels for the gated delta rule (Gated DeltaNet, Yang et al. 2025), forward and backward.

The recurrence, per sequence and head (S is a Dk x Dv float32 state):

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        o_t = S_t^T (scale q_t)

Chunked form (chunk C = 64; inside a chunk G_t = g_1 + ... + g_t, Gamma_t = exp(G_t); S = state at the
chunk start; the WY/UT transform of the Gated DeltaNet paper):

    A     = diag(beta) (K K^T * exp(G_t - G_i))_{i<t}          (C, C) strictly lower triangular
    Tinv  = (I + A)^-1                                          (C, C) on 16 x 16 tiles, see _wy_invert_kernel
    W     = Tinv diag(beta Gamma) K,   U = Tinv diag(beta) V    (C, Dk), (C, Dv)
    Vnew  = U - W S                                             (C, Dv) the "new values" of the chunk
    O     = diag(Gamma) Qs S + (Qs K^T * exp(G_t - G_i))_{i<=t} Vnew       Qs = scale Q
    S'    = Gamma_C S + (diag(exp(G_C - G)) K)^T Vnew

Forward, four kernels in reading order: the inversion and the WY preparation (both parallel over chunks),
the state pass (the only sequential one: along each sequence's chunks it writes the chunk-start states and
Vnew), the output (parallel over chunks). The one-token decode kernel follows. Backward, recomputing the
forward's intermediates except Tinv: WY preparation and state pass again, the reverse state pass (gradients
of the chunk-end states, dVnew with its intra-chunk part), then two per-chunk gradient kernels: everything
that needs the states and their gradients, one program per Dk block (dq, dW = -dVnew S^T, parts of dk and dg;
run again over each sequence's first and last chunk, see SEQUENCE_ENDS); then the WY backward (Tinv, dW -> dk,
dv, dbeta, dg). Each kernel's docstring gives what one program computes and its blocks; block sizes and
warps: _launch_config.

Layout: (B, T, H, D), i.e. head after time. Packed sequences: B == 1 with cu_seqlens (N+1 offsets); a batch
of B equal-length sequences is run as B packed sequences of length T. Supported: Dk and Dv powers of two in
[16, 256]; q, k, v in float32, bfloat16 or float16; g <= 0 (log-decay) and beta of any float dtype.

Precision: arithmetic and the state in float32. Float32 inputs: exact float32 products, every intermediate
stored in float32. 16-bit inputs: products of two 16-bit tensors (Q, K, stored states, dO) run natively on
the tensor cores, the others in tf32; the chunk-start states are stored in the inputs' dtype (each sequence's
first and last chunk take their gradients from the float32 h0 and dht, SEQUENCE_ENDS); Tinv, W, U and Vnew
are stored in float16 when Dk >= 64 (_intermediate_dtype: tf32's mantissa at half the bytes, where bfloat16's
was not accurate enough; they stay below 65504 while |v| does) and dW in bfloat16 (_gradient_dtype), the
other gradients in float32. On the CPU the kernels run only under TRITON_INTERPRET=1, which upcasts every
product.
"""

import functools

import torch
import triton
import triton.language as tl

from kernels.common import INTERPRET, check_device, check_qkv, launch_options, load_rows, store_rows

CHUNK = 64  # tokens per chunk (C)
SUB = 16  # side of the tiles of A and Tinv in _wy_invert_kernel (C = 4 SUB)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


# ----------------------------------------------------------------------------------------------------
# Helpers shared by the kernels. The kernels see each (TT, H, D) tensor as a (TT * H, D) matrix: the row of
# token t in head i_h is t * H + i_h (load_rows, store_rows).


@triton.jit
def _dot(a, b, PREC: tl.constexpr, NATIVE: tl.constexpr):
    """a @ b with float32 accumulation. Two operands of one 16-bit dtype multiply natively when NATIVE (their
    products are exact); anything else is taken to float32 and multiplied with input precision PREC."""
    if NATIVE and a.dtype == b.dtype and a.dtype != tl.float32:
        return tl.dot(a, b)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def _product(a, b, LOW: tl.constexpr, PREC: tl.constexpr, NATIVE: tl.constexpr):
    """a @ b of two forward-pass quantities (no gradients) with float32 accumulation, at the precision of the
    stored intermediates LOW: float16 rounds both operands to float16 (tf32's 10-bit mantissa at half the bytes
    and twice the tensor-core rate; natively when NATIVE), float32 multiplies at PREC."""
    if LOW == tl.float16:
        if NATIVE:
            return tl.dot(a.to(tl.float16), b.to(tl.float16))
        return tl.dot(
            a.to(tl.float16).to(tl.float32), b.to(tl.float16).to(tl.float32), input_precision="ieee"
        )
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def _chunk_rows(chunk_start_ptr, chunk_end_ptr, i_c, C: tl.constexpr):
    """Token rows (C,) of chunk i_c, their validity (rows past the sequence's end are padding) and the index
    of the chunk's last valid row."""
    start = tl.load(chunk_start_ptr + i_c).to(tl.int64)
    end = tl.load(chunk_end_ptr + i_c).to(tl.int64)
    rows = start + tl.arange(0, C)
    return rows, rows < end, tl.minimum(start + C, end) - 1


@triton.jit
def _load_chunk_decay(gcum_ptr, rows, valid, last, i_h, H: tl.constexpr):
    """G (C,) of a chunk, padded rows set to G_C; and G_C (the last valid row's G)."""
    G_last = tl.load(gcum_ptr + last * H + i_h)
    G = tl.load(gcum_ptr + rows * H + i_h, mask=valid, other=0.0)
    return tl.where(valid, G, G_last), G_last


@triton.jit
def _sequence_program(cu_ptr, chunk_offsets_ptr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
    """What a program of the (sequence, head, BV state columns) grid of the state passes works on: sequence i_n
    (tokens bos..eos-1, chunks first_chunk..first_chunk+n_chunks-1), head i_h, state rows dk (DK,), columns
    cv (BV,), and their offsets (DK, BV) inside one (DK, DV) state."""
    i_n = tl.program_id(0)
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    first_chunk = tl.load(chunk_offsets_ptr + i_n).to(tl.int64)
    n_chunks = tl.load(chunk_offsets_ptr + i_n + 1).to(tl.int64) - first_chunk
    dk = tl.arange(0, DK)
    cv = tl.program_id(2) * BV + tl.arange(0, BV)
    return i_n, tl.program_id(1), bos, eos, first_chunk, n_chunks, dk, cv, dk[:, None] * DV + cv[None, :]


@triton.jit
def _sequence_chunk_rows(bos, eos, c, C: tl.constexpr):
    """Token rows (C,) of the sequence's chunk c, their validity and the chunk's last valid row."""
    rows = bos + c * C + tl.arange(0, C)
    return rows, rows < eos, tl.minimum(bos + c * C + C, eos) - 1


@triton.jit
def _chunk_columns_program(
    chunk_start_ptr, chunk_end_ptr, gcum_ptr, H: tl.constexpr, BV: tl.constexpr, C: tl.constexpr
):
    """What a program of the (chunk, head, BV columns) grid works on: chunk i_c, head i_h, the chunk's rows and
    their validity, G (C,) (padded rows at G_C), and its value columns cv (BV,)."""
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    rows, valid, last = _chunk_rows(chunk_start_ptr, chunk_end_ptr, i_c, C)
    G, _ = _load_chunk_decay(gcum_ptr, rows, valid, last, i_h, H)
    return i_c, i_h, rows, valid, G, tl.program_id(2) * BV + tl.arange(0, BV)


@triton.jit
def _decay_matrix(G, INCLUSIVE: tl.constexpr, C: tl.constexpr):
    """(C, C) exp(G_t - G_i) on and below the diagonal (INCLUSIVE) or strictly below it, 0 elsewhere."""
    r = tl.arange(0, C)
    if INCLUSIVE:
        keep = r[:, None] >= r[None, :]
    else:
        keep = r[:, None] > r[None, :]
    return tl.where(keep, tl.exp(tl.where(keep, G[:, None] - G[None, :], 0.0)), 0.0)


@triton.jit
def _load_block(
    k_ptr, g_ptr, beta_ptr, start, end, i_h, G_before, H: tl.constexpr, DK: tl.constexpr, SUB: tl.constexpr
):
    """The SUB token rows start..start+SUB-1 of head i_h: K (SUB, DK) in its dtype, beta (SUB,), the in-chunk
    cumulative log-decay G (SUB,) continuing G_before (G of the row before these, 0 for the first block; added in
    the order of one cumsum over the chunk), and G's last value (the next block's G_before). Rows at or past
    `end` are padding: k, beta and g read 0 (as in _chunk_rows), so G stays at the last valid value."""
    r = tl.arange(0, SUB)
    rows = start + r
    valid = rows < end
    k = load_rows(k_ptr, rows * H + i_h, tl.arange(0, DK), DK, valid)
    beta = tl.load(beta_ptr + rows * H + i_h, mask=valid, other=0.0)
    g = tl.load(g_ptr + rows * H + i_h, mask=valid, other=0.0)
    G = tl.cumsum(tl.where(r == 0, G_before + g, g), 0)
    return k, beta, G, tl.sum(tl.where(r == SUB - 1, G, 0.0), 0)


@triton.jit
def _a_tile(
    k_i,
    k_j,
    beta_i,
    G_i,
    G_j,
    DIAGONAL: tl.constexpr,
    SUB: tl.constexpr,
    PREC: tl.constexpr,
    NATIVE: tl.constexpr,
):
    """(SUB, SUB) float32 tile (i, j), j <= i, of A = diag(beta) (K K^T * exp(G_t - G_i))_{i<t}: its rows from
    row block i (k_i, beta_i, G_i), its columns from row block j (k_j, G_j). A diagonal tile (DIAGONAL, i == j)
    keeps its strictly lower part."""
    kk = _dot(k_i, tl.trans(k_j), PREC, NATIVE)  # (SUB, SUB)
    if DIAGONAL:
        decay = _decay_matrix(G_i, False, SUB)
    else:
        decay = tl.exp(G_i[:, None] - G_j[None, :])
    return beta_i[:, None] * kk * decay


@triton.jit
def _unit_lower_tile_inverse(A, SUB: tl.constexpr):
    """(I + A)^-1 (SUB, SUB) of a strictly lower triangular float32 tile A by forward substitution, SUB - 1
    unrolled steps: when step t starts, row t of the inverse X is final, and the step removes it from the rows
    below (X[i] -= A[i, t] X[t])."""
    r = tl.arange(0, SUB)
    X = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    for t in tl.static_range(SUB - 1):
        a_col = tl.sum(tl.where(r[None, :] == t, A, 0.0), 1)  # (SUB,) A[:, t]
        x_row = tl.sum(tl.where(r[:, None] == t, X, 0.0), 0)  # (SUB,) X[t, :]
        X -= a_col[:, None] * x_row[None, :]
    return X


@triton.jit
def _store_tile(
    tinv_ptr,
    x,
    i_c,
    i_h,
    bi: tl.constexpr,
    bj: tl.constexpr,
    H: tl.constexpr,
    C: tl.constexpr,
    SUB: tl.constexpr,
):
    """Writes x (SUB, SUB) as tile (bi, bj) of the chunk's row-major (C, C) Tinv, in tinv_ptr's dtype."""
    r = tl.arange(0, SUB)
    offsets = ((i_c * H + i_h) * C + bi * SUB + r[:, None]) * C + bj * SUB + r[None, :]
    tl.store(tinv_ptr + offsets, x.to(tinv_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------------------
# Forward kernels


@triton.jit
def _wy_invert_kernel(
    k_ptr,
    g_ptr,
    beta_ptr,
    chunk_start_ptr,
    chunk_end_ptr,
    tinv_ptr,
    H: tl.constexpr,
    DK: tl.constexpr,
    C: tl.constexpr,
    SUB: tl.constexpr,
    PREC: tl.constexpr,
    INVERSE_PREC: tl.constexpr,
    NATIVE: tl.constexpr,
):
    """One program = one chunk (C=64 tokens) of one head: Tinv = (I + A)^-1 (C, C), stored in tinv_ptr's dtype.

    Blocks: the chunk's four row blocks of SUB = 16 rows, K (SUB, DK) each; A and Tinv as SUB x SUB tiles
    (10 nonzero tiles of A, 16 of Tinv with the 6 above the diagonal stored as zeros). A's products follow PREC
    and NATIVE (16-bit K natively); the inversion's products run at INVERSE_PREC (float32-accurate).
    """
    tl.static_assert(C == 4 * SUB)
    i_c = tl.program_id(0).to(tl.int64)  # 64-bit offsets: n_chunks * H * C * C may pass 2**31
    i_h = tl.program_id(1)
    start = tl.load(chunk_start_ptr + i_c).to(tl.int64)
    end = tl.load(chunk_end_ptr + i_c).to(tl.int64)
    k0, beta0, G0, G_end = _load_block(k_ptr, g_ptr, beta_ptr, start, end, i_h, 0.0, H, DK, SUB)
    k1, beta1, G1, G_end = _load_block(k_ptr, g_ptr, beta_ptr, start + SUB, end, i_h, G_end, H, DK, SUB)
    k2, beta2, G2, G_end = _load_block(k_ptr, g_ptr, beta_ptr, start + 2 * SUB, end, i_h, G_end, H, DK, SUB)
    k3, beta3, G3, _ = _load_block(k_ptr, g_ptr, beta_ptr, start + 3 * SUB, end, i_h, G_end, H, DK, SUB)

    # Tiles of A (SUB, SUB): a_ij between row blocks i and j <= i
    a00 = _a_tile(k0, k0, beta0, G0, G0, True, SUB, PREC, NATIVE)
    a11 = _a_tile(k1, k1, beta1, G1, G1, True, SUB, PREC, NATIVE)
    a22 = _a_tile(k2, k2, beta2, G2, G2, True, SUB, PREC, NATIVE)
    a33 = _a_tile(k3, k3, beta3, G3, G3, True, SUB, PREC, NATIVE)
    a10 = _a_tile(k1, k0, beta1, G1, G0, False, SUB, PREC, NATIVE)
    a20 = _a_tile(k2, k0, beta2, G2, G0, False, SUB, PREC, NATIVE)
    a21 = _a_tile(k2, k1, beta2, G2, G1, False, SUB, PREC, NATIVE)
    a30 = _a_tile(k3, k0, beta3, G3, G0, False, SUB, PREC, NATIVE)
    a31 = _a_tile(k3, k1, beta3, G3, G1, False, SUB, PREC, NATIVE)
    a32 = _a_tile(k3, k2, beta3, G3, G2, False, SUB, PREC, NATIVE)

    # Tiles of the inverse (SUB, SUB): the diagonal ones, then the off-diagonal ones one diagonal at a time
    x00 = _unit_lower_tile_inverse(a00, SUB)
    x11 = _unit_lower_tile_inverse(a11, SUB)
    x22 = _unit_lower_tile_inverse(a22, SUB)
    x33 = _unit_lower_tile_inverse(a33, SUB)
    x10 = -_dot(x11, _dot(a10, x00, INVERSE_PREC, False), INVERSE_PREC, False)
    x21 = -_dot(x22, _dot(a21, x11, INVERSE_PREC, False), INVERSE_PREC, False)
    x32 = -_dot(x33, _dot(a32, x22, INVERSE_PREC, False), INVERSE_PREC, False)
    x20 = -_dot(
        x22, _dot(a20, x00, INVERSE_PREC, False) + _dot(a21, x10, INVERSE_PREC, False), INVERSE_PREC, False
    )
    x31 = -_dot(
        x33, _dot(a31, x11, INVERSE_PREC, False) + _dot(a32, x21, INVERSE_PREC, False), INVERSE_PREC, False
    )
    x30 = -_dot(
        x33,
        _dot(a30, x00, INVERSE_PREC, False)
        + _dot(a31, x10, INVERSE_PREC, False)
        + _dot(a32, x20, INVERSE_PREC, False),
        INVERSE_PREC,
        False,
    )

    zero = tl.zeros((SUB, SUB), dtype=tl.float32)
    _store_tile(tinv_ptr, x00, i_c, i_h, 0, 0, H, C, SUB)
    _store_tile(tinv_ptr, zero, i_c, i_h, 0, 1, H, C, SUB)
    _store_tile(tinv_ptr, zero, i_c, i_h, 0, 2, H, C, SUB)
    _store_tile(tinv_ptr, zero, i_c, i_h, 0, 3, H, C, SUB)
    _store_tile(tinv_ptr, x10, i_c, i_h, 1, 0, H, C, SUB)
    _store_tile(tinv_ptr, x11, i_c, i_h, 1, 1, H, C, SUB)
    _store_tile(tinv_ptr, zero, i_c, i_h, 1, 2, H, C, SUB)
    _store_tile(tinv_ptr, zero, i_c, i_h, 1, 3, H, C, SUB)
    _store_tile(tinv_ptr, x20, i_c, i_h, 2, 0, H, C, SUB)
    _store_tile(tinv_ptr, x21, i_c, i_h, 2, 1, H, C, SUB)
    _store_tile(tinv_ptr, x22, i_c, i_h, 2, 2, H, C, SUB)
    _store_tile(tinv_ptr, zero, i_c, i_h, 2, 3, H, C, SUB)
    _store_tile(tinv_ptr, x30, i_c, i_h, 3, 0, H, C, SUB)
    _store_tile(tinv_ptr, x31, i_c, i_h, 3, 1, H, C, SUB)
    _store_tile(tinv_ptr, x32, i_c, i_h, 3, 2, H, C, SUB)
    _store_tile(tinv_ptr, x33, i_c, i_h, 3, 3, H, C, SUB)


@triton.jit
def _wy_prepare_kernel(
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    chunk_start_ptr,
    chunk_end_ptr,
    tinv_ptr,
    gcum_ptr,
    w_ptr,
    u_ptr,
    H: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    C: tl.constexpr,
    PREC: tl.constexpr,
    NATIVE: tl.constexpr,
):
    """One program = one chunk (C=64 tokens) of one head. Blocks: K (C, DK), V (C, DV), Tinv (C, C).

    Writes the in-chunk cumulative log-decay G (C,) and, from the stored Tinv (_wy_invert_kernel), the WY factors
    W = Tinv diag(beta Gamma) K (C, DK) and U = Tinv diag(beta) V (C, DV) (W and U in the intermediates'
    dtype, see _product). The forward and the backward both run it, so both see the same W and U.
    """
    i_c = tl.program_id(0).to(tl.int64)  # 64-bit offsets: n_chunks * H * C * C may pass 2**31
    i_h = tl.program_id(1)
    rows, valid, _ = _chunk_rows(chunk_start_ptr, chunk_end_ptr, i_c, C)
    r = tl.arange(0, C)
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)

    k = load_rows(k_ptr, rows * H + i_h, dk, DK, valid)
    v = load_rows(v_ptr, rows * H + i_h, dv, DV, valid)
    g = tl.load(g_ptr + rows * H + i_h, mask=valid, other=0.0)
    beta = tl.load(beta_ptr + rows * H + i_h, mask=valid, other=0.0)
    G = tl.cumsum(g, 0)  # (C,) padded rows keep the last valid value since their g is 0
    tinv = tl.load(tinv_ptr + ((i_c * H + i_h) * C + r[:, None]) * C + r[None, :])
    LOW: tl.constexpr = w_ptr.dtype.element_ty
    w = _product(tinv, k.to(tl.float32) * (beta * tl.exp(G))[:, None], LOW, PREC, NATIVE)  # (C, DK)
    u = _product(tinv, v.to(tl.float32) * beta[:, None], LOW, PREC, NATIVE)  # (C, DV)

    tl.store(gcum_ptr + rows * H + i_h, G, mask=valid)
    store_rows(w_ptr, w, rows * H + i_h, dk, DK, valid)
    store_rows(u_ptr, u, rows * H + i_h, dv, DV, valid)


@triton.jit
def _state_forward_kernel(
    k_ptr,
    w_ptr,
    u_ptr,
    gcum_ptr,
    h0_ptr,
    cu_ptr,
    chunk_offsets_ptr,
    ht_ptr,
    h_ptr,
    vnew_ptr,
    H: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    PREC: tl.constexpr,
    NATIVE: tl.constexpr,
):
    """One program = one sequence, one head, BV columns of the state; walks the sequence's chunks in order.

    Blocks: state S (DK, BV) float32 in registers, K/W (C, DK), U/Vnew (C, BV). Per chunk: writes S (the
    chunk-start state) and Vnew = U - W S; then S <- Gamma_C S + (diag(exp(G_C - G)) K)^T Vnew.
    Writes the final state at the end.
    """
    i_n, i_h, bos, eos, first_chunk, n_chunks, dk, cv, state_offsets = _sequence_program(
        cu_ptr, chunk_offsets_ptr, DK, DV, BV
    )

    LOW: tl.constexpr = w_ptr.dtype.element_ty
    S = tl.load(h0_ptr + (i_n * H + i_h) * DK * DV + state_offsets)
    for c in range(n_chunks):
        rows, valid, last = _sequence_chunk_rows(bos, eos, c, C)
        tl.store(
            h_ptr + ((first_chunk + c) * H + i_h) * DK * DV + state_offsets, S.to(h_ptr.dtype.element_ty)
        )
        G, G_last = _load_chunk_decay(gcum_ptr, rows, valid, last, i_h, H)
        w = load_rows(w_ptr, rows * H + i_h, dk, DK, valid)
        u = load_rows(u_ptr, rows * H + i_h, cv, DV, valid)
        vnew = u - _product(w, S, LOW, PREC, NATIVE)  # (C, BV)
        store_rows(vnew_ptr, vnew, rows * H + i_h, cv, DV, valid)
        k = load_rows(k_ptr, rows * H + i_h, dk, DK, valid).to(tl.float32)
        k_decayed = k * tl.exp(G_last - G)[:, None]
        S = S * tl.exp(G_last) + _product(tl.trans(k_decayed), vnew, LOW, PREC, NATIVE)
    tl.store(ht_ptr + (i_n * H + i_h) * DK * DV + state_offsets, S)


@triton.jit
def _chunk_output_kernel(
    q_ptr,
    k_ptr,
    h_ptr,
    vnew_ptr,
    gcum_ptr,
    chunk_start_ptr,
    chunk_end_ptr,
    o_ptr,
    scale,
    H: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    PREC: tl.constexpr,
    NATIVE: tl.constexpr,
):
    """One program = one chunk of one head, BV output columns: O = diag(Gamma) Qs S + (Qs K^T * decay) Vnew.

    Blocks: Q/K (C, BK) walked over Dk, the chunk-start state S (BK, BV), Vnew and O (C, BV), scores (C, C).
    """
    i_c, i_h, rows, valid, G, cv = _chunk_columns_program(chunk_start_ptr, chunk_end_ptr, gcum_ptr, H, BV, C)
    state_base = (i_c * H + i_h) * DK * DV

    qk = tl.zeros((C, C), dtype=tl.float32)
    qS = tl.zeros((C, BV), dtype=tl.float32)
    for i_k in range(DK // BK):
        ck = i_k * BK + tl.arange(0, BK)
        q = load_rows(q_ptr, rows * H + i_h, ck, DK, valid)
        k = load_rows(k_ptr, rows * H + i_h, ck, DK, valid)
        S = tl.load(h_ptr + state_base + ck[:, None] * DV + cv[None, :])  # (BK, BV)
        qk += _dot(q, tl.trans(k), PREC, NATIVE)
        qS += _dot(q, S, PREC, NATIVE)
    scores = qk * _decay_matrix(G, True, C)
    vnew = load_rows(vnew_ptr, rows * H + i_h, cv, DV, valid)
    o = (qS * tl.exp(G)[:, None] + _product(scores, vnew, vnew_ptr.dtype.element_ty, PREC, NATIVE)) * scale
    store_rows(o_ptr, o, rows * H + i_h, cv, DV, valid)


@triton.jit
def _recurrent_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    h0_ptr,
    cu_ptr,
    o_ptr,
    ht_ptr,
    scale,
    H: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BV: tl.constexpr,
):
    """One program = one sequence, one head, BV columns of the state; one token at a time (the decode path).

    Blocks: state S (DK, BV) float32, q/k (DK,), v/o (BV,). Per token:
    S <- exp(g) S; S <- S + beta k (v - S^T k)^T; o = S^T (scale q). Writes o and the final state.
    """
    i_n = tl.program_id(0)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    dk = tl.arange(0, DK)
    cv = i_v * BV + tl.arange(0, BV)
    state_offsets = dk[:, None] * DV + cv[None, :]
    S = tl.load(h0_ptr + (i_n * H + i_h) * DK * DV + state_offsets)
    for t in range(bos, eos):
        q = tl.load(q_ptr + (t * H + i_h) * DK + dk).to(tl.float32) * scale
        k = tl.load(k_ptr + (t * H + i_h) * DK + dk).to(tl.float32)
        v = tl.load(v_ptr + (t * H + i_h) * DV + cv).to(tl.float32)
        g = tl.load(g_ptr + t * H + i_h)
        beta = tl.load(beta_ptr + t * H + i_h)
        S = S * tl.exp(g)
        correction = beta * (v - tl.sum(k[:, None] * S, 0))  # (BV,)
        S = S + k[:, None] * correction[None, :]
        o = tl.sum(q[:, None] * S, 0)
        tl.store(o_ptr + (t * H + i_h) * DV + cv, o.to(o_ptr.dtype.element_ty))
    tl.store(ht_ptr + (i_n * H + i_h) * DK * DV + state_offsets, S)


# ----------------------------------------------------------------------------------------------------
# Backward kernels


@triton.jit
def _state_backward_kernel(
    q_ptr,
    k_ptr,
    w_ptr,
    gcum_ptr,
    do_ptr,
    dht_ptr,
    cu_ptr,
    chunk_offsets_ptr,
    dh_ptr,
    dvnew_ptr,
    dh0_ptr,
    scale,
    H: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    PREC: tl.constexpr,
    NATIVE: tl.constexpr,
):
    """One program = one sequence, one head, BV state columns; walks the chunks backwards.

    Blocks: dS (DK, BV) float32 (gradient of the state at the current chunk's end), Q/K/W (C, DK),
    scores (C, C), dO/dVnew (C, BV). Per chunk (last first):
    dVnew = (Qs K^T * decay)^T dO + diag(exp(G_C - G)) K dS   (the intra-chunk part needs no state: it overlaps
    the chain of dS);  dS <- Gamma_C dS + (diag(Gamma) Qs)^T dO - W^T dVnew.
    Writes dS of each chunk end, dVnew (float32), and the initial-state gradient.
    """
    i_n, i_h, bos, eos, first_chunk, n_chunks, dk, cv, state_offsets = _sequence_program(
        cu_ptr, chunk_offsets_ptr, DK, DV, BV
    )

    dS = tl.load(dht_ptr + (i_n * H + i_h) * DK * DV + state_offsets)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        rows, valid, last = _sequence_chunk_rows(bos, eos, c, C)
        tl.store(
            dh_ptr + ((first_chunk + c) * H + i_h) * DK * DV + state_offsets, dS.to(dh_ptr.dtype.element_ty)
        )
        G, G_last = _load_chunk_decay(gcum_ptr, rows, valid, last, i_h, H)
        q = load_rows(q_ptr, rows * H + i_h, dk, DK, valid)
        k = load_rows(k_ptr, rows * H + i_h, dk, DK, valid)
        do = load_rows(do_ptr, rows * H + i_h, cv, DV, valid).to(tl.float32)
        scores = _dot(q, tl.trans(k), PREC, NATIVE) * _decay_matrix(G, True, C) * scale  # (C, C)
        # (C, BV)
        dvnew = tl.dot(tl.trans(scores), do, input_precision=PREC) + tl.dot(
            k.to(tl.float32) * tl.exp(G_last - G)[:, None], dS, input_precision=PREC
        )
        store_rows(dvnew_ptr, dvnew, rows * H + i_h, cv, DV, valid)
        w = load_rows(w_ptr, rows * H + i_h, dk, DK, valid).to(tl.float32)
        q_decayed = q.to(tl.float32) * (tl.exp(G) * scale)[:, None]
        dS = (
            dS * tl.exp(G_last)
            + tl.dot(tl.trans(q_decayed), do, input_precision=PREC)
            - tl.dot(tl.trans(w), dvnew, input_precision=PREC)
        )
    tl.store(dh0_ptr + (i_n * H + i_h) * DK * DV + state_offsets, dS)


@triton.jit
def _chunk_grad_qkw_kernel(
    q_ptr,
    k_ptr,
    gcum_ptr,
    h_ptr,
    dh_ptr,
    vnew_ptr,
    dvnew_ptr,
    do_ptr,
    h0_ptr,
    dht_ptr,
    cu_ptr,
    chunk_start_ptr,
    chunk_end_ptr,
    chunk_sequence_ptr,
    end_chunks_ptr,
    dq_ptr,
    dk_part_ptr,
    dw_ptr,
    dg_part_ptr,
    scale,
    TT,
    H: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    PREC: tl.constexpr,
    NATIVE: tl.constexpr,
    SEQUENCE_ENDS: tl.constexpr,
):
    """One program = one chunk of one head and BK columns of Dk: everything of the backward that needs the
    chunk-start state S or the chunk-end state gradient dS', for those columns.

    Accumulates over Dv blocks (S, dS' blocks (BK, BV); dO/Vnew/dVnew (C, BV)) the (C, BK) products dO S^T,
    Vnew dS'^T and dW = -dVnew S^T, dscores = dO Vnew^T (C, C; every Dk block computes it) and <dS', S>; then,
    with dQK = dscores * decay (the gradient of the scores Qs K^T * decay, over scale),
      dq = scale (Gamma dO S^T + dQK K),   dk part = dQK^T Qs + diag(exp(G_C - G)) Vnew dS'^T,
    and these columns' part of dG (the decays of the scores, of diag(Gamma) Qs S and of the state update;
    G_C's gradient at the chunk's last row). Writes dq, the dk part (float32), dW (_gradient_dtype) and the dG
    part into row i_k of a (DK / BK, TT, H) buffer; _chunk_grad_wy_kernel adds the rest.

    SEQUENCE_ENDS: the programs run over the chunks listed in end_chunks (each sequence's first and last) instead,
    after the run over all chunks when h0 or dht was given, and overwrite that run's results there, adding the
    products with the residuals of the states that are float32 inputs: h0 - S in a first chunk, dht - dS' in a last
    one (rounded to the stored states' dtype, i.e. to 2^-8 of a residual that is itself within 2^-8 of the state).
    With 16-bit inputs the states are stored in 16 bits, and a sequence of one chunk (T = 1 included) would take its
    dg and dbeta, B H sums of Dk Dv products that can cancel, from rounded copies of h0 and dht.
    """
    # program 0 axis: chunk-major, Dk block fastest, so that the Dk blocks of a chunk run side by side and share its
    # dO, Vnew, dVnew in L2 (one axis: a grid's second and third axes stop at 65535 chunks)
    i_k = tl.program_id(0) % (DK // BK)
    # 64-bit offsets: n_chunks * H * Dk * Dv may pass 2**31
    i_c = (tl.program_id(0) // (DK // BK)).to(tl.int64)
    i_h = tl.program_id(1)
    if SEQUENCE_ENDS:
        i_c = tl.load(end_chunks_ptr + i_c)
        i_n = tl.load(chunk_sequence_ptr + i_c)
        sequence_base = (i_n * H + i_h) * DK * DV  # of the sequence's h0 and dht
        is_first = tl.load(chunk_start_ptr + i_c) == tl.load(cu_ptr + i_n)
        is_last = tl.load(chunk_end_ptr + i_c) <= tl.load(chunk_start_ptr + i_c) + C
    rows, valid, last = _chunk_rows(chunk_start_ptr, chunk_end_ptr, i_c, C)
    G, G_last = _load_chunk_decay(gcum_ptr, rows, valid, last, i_h, H)
    gamma = tl.exp(G)
    to_end = tl.exp(G_last - G)
    state_base = (i_c * H + i_h) * DK * DV
    ck = i_k * BK + tl.arange(0, BK)

    do_St = tl.zeros((C, BK), dtype=tl.float32)
    vnew_dSt = tl.zeros((C, BK), dtype=tl.float32)
    dvnew_St = tl.zeros((C, BK), dtype=tl.float32)  # -dW
    dscores = tl.zeros((C, C), dtype=tl.float32)
    dS_dot_S = tl.zeros((BV,), dtype=tl.float32)  # <dS', S> partial sums
    for i_v in range(DV // BV):
        cv = i_v * BV + tl.arange(0, BV)
        block = ck[:, None] * DV + cv[None, :]  # (BK, BV) offsets inside one (DK, DV) state
        S = tl.load(h_ptr + state_base + block)
        dS = tl.load(dh_ptr + state_base + block)
        do = load_rows(do_ptr, rows * H + i_h, cv, DV, valid)
        vnew = load_rows(vnew_ptr, rows * H + i_h, cv, DV, valid)
        dvnew = load_rows(dvnew_ptr, rows * H + i_h, cv, DV, valid)
        do_St += _dot(do, tl.trans(S), PREC, NATIVE)
        vnew_dSt += _dot(vnew, tl.trans(dS), PREC, NATIVE)
        dvnew_St += _dot(dvnew, tl.trans(S), PREC, NATIVE)
        dscores += _dot(do, tl.trans(vnew), PREC, NATIVE)
        dS_dot_S += tl.sum(dS.to(tl.float32) * S.to(tl.float32), 0)
        if SEQUENCE_ENDS:  # the products with the residuals h0 - S (first chunk) and dht - dS' (last chunk)
            S_residual = tl.zeros((BK, BV), dtype=tl.float32)
            if is_first:
                S_residual = tl.load(h0_ptr + sequence_base + block) - S
            dS_residual = tl.zeros((BK, BV), dtype=tl.float32)
            if is_last:
                dS_residual = tl.load(dht_ptr + sequence_base + block) - dS
            do_St += _dot(do, tl.trans(S_residual.to(S.dtype)), PREC, NATIVE)
            vnew_dSt += _dot(vnew, tl.trans(dS_residual.to(S.dtype)), PREC, NATIVE)
            dvnew_St += _dot(dvnew, tl.trans(S_residual.to(S.dtype)), PREC, NATIVE)
            dS_dot_S += tl.sum(dS_residual * (S + S_residual) + dS.to(tl.float32) * S_residual, 0)
    store_rows(dw_ptr, -dvnew_St, rows * H + i_h, ck, DK, valid)
    q = load_rows(q_ptr, rows * H + i_h, ck, DK, valid)
    k = load_rows(k_ptr, rows * H + i_h, ck, DK, valid)
    qk = _dot(q, tl.trans(k), PREC, NATIVE) * scale  # (C, C) these columns' part of Qs K^T
    q = q.to(tl.float32) * scale
    k = k.to(tl.float32)
    dqk = dscores * _decay_matrix(G, True, C)
    dq = do_St * gamma[:, None] + tl.dot(dqk, k, input_precision=PREC)
    store_rows(dq_ptr, dq * scale, rows * H + i_h, ck, DK, valid)
    dk = tl.dot(tl.trans(dqk), q, input_precision=PREC) + vnew_dSt * to_end[:, None]
    store_rows(dk_part_ptr, dk, rows * H + i_h, ck, DK, valid)

    # a decay's gradient of G is dM * M: the scores' rows gain it, their columns lose it
    dqk_qk = dqk * qk
    dto_end = tl.sum(k * vnew_dSt, 1) * to_end
    dG = tl.sum(dqk_qk, 1) - tl.sum(dqk_qk, 0) + gamma * tl.sum(q * do_St, 1) - dto_end
    # G_C's gradient (from exp(G_C - G) and S' = Gamma_C S + ...) at the chunk's last row
    dG += tl.where(rows == last, tl.sum(dto_end, 0) + tl.exp(G_last) * tl.sum(dS_dot_S, 0), 0.0)
    tl.store(dg_part_ptr + (i_k * TT + rows) * H + i_h, dG, mask=valid)


@triton.jit
def _chunk_grad_wy_kernel(
    k_ptr,
    v_ptr,
    beta_ptr,
    gcum_ptr,
    tinv_ptr,
    dvnew_ptr,
    dw_ptr,
    dk_part_ptr,
    dg_part_ptr,
    chunk_start_ptr,
    chunk_end_ptr,
    dk_ptr,
    dv_ptr,
    dbeta_ptr,
    dg_ptr,
    TT,
    H: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    NK: tl.constexpr,
    C: tl.constexpr,
    PREC: tl.constexpr,
    NATIVE: tl.constexpr,
):
    """One program = one chunk of one head: the backward of the WY representation (after _chunk_grad_qkw_kernel),
    which finishes dk, dv, dbeta and dg. Blocks: (C, C) matrices; K/dW/dk (C, BK) walked twice over Dk;
    V/dVnew/dv (C, BV) walked over Dv.

    With Vnew = Tinv (diag(beta) V - B_w S), W = Tinv B_w, B_w = diag(beta Gamma) K, and dW = -dVnew S^T:
      dTinv = dVnew (diag(beta) V)^T + dW B_w^T,   dv = diag(beta) Tinv^T dVnew,   dB_w = Tinv^T dW,
      dA = -Tinv^T dTinv Tinv^T,   dP = diag(beta) dA (P = K K^T * strict decay, A = diag(beta) P),
      dk = (dk part) + diag(beta Gamma) dB_w + (dKK + dKK^T) K with dKK = dP * strict decay.
    Adds the NK dG parts of _chunk_grad_qkw_kernel to its own; writes dk, dv, dbeta and dg = the reverse
    in-chunk cumsum of dG (G_t = g_1 + ... + g_t).
    """
    i_c = tl.program_id(0).to(tl.int64)  # 64-bit offsets: n_chunks * H * C * C may pass 2**31
    i_h = tl.program_id(1)
    rows, valid, last = _chunk_rows(chunk_start_ptr, chunk_end_ptr, i_c, C)
    G, _ = _load_chunk_decay(gcum_ptr, rows, valid, last, i_h, H)
    beta = tl.load(beta_ptr + rows * H + i_h, mask=valid, other=0.0)
    gamma = tl.exp(G)
    bw_scale = beta * gamma
    r = tl.arange(0, C)
    tinv = tl.load(tinv_ptr + ((i_c * H + i_h) * C + r[:, None]) * C + r[None, :]).to(tl.float32)

    dtinv = tl.zeros((C, C), dtype=tl.float32)
    dbeta = tl.zeros((C,), dtype=tl.float32)
    for i_v in range(DV // BV):
        cv = i_v * BV + tl.arange(0, BV)
        v = load_rows(v_ptr, rows * H + i_h, cv, DV, valid).to(tl.float32)
        dvnew = load_rows(dvnew_ptr, rows * H + i_h, cv, DV, valid)
        dtinv += tl.dot(dvnew, tl.trans(v * beta[:, None]), input_precision=PREC)
        du = tl.dot(tl.trans(tinv), dvnew, input_precision=PREC)  # gradient of diag(beta) V
        dbeta += tl.sum(du * v, 1)
        store_rows(dv_ptr, du * beta[:, None], rows * H + i_h, cv, DV, valid)
    kk = tl.zeros((C, C), dtype=tl.float32)
    for i_k in range(DK // BK):
        ck = i_k * BK + tl.arange(0, BK)
        k = load_rows(k_ptr, rows * H + i_h, ck, DK, valid)
        dw = load_rows(dw_ptr, rows * H + i_h, ck, DK, valid).to(tl.float32)
        kk += _dot(k, tl.trans(k), PREC, NATIVE)
        dtinv += tl.dot(dw, tl.trans(k.to(tl.float32) * bw_scale[:, None]), input_precision=PREC)

    # dA's part on and above the diagonal never counts: P and the strict decay vanish there
    dA = -tl.dot(tl.dot(tl.trans(tinv), dtinv, input_precision=PREC), tl.trans(tinv), input_precision=PREC)
    strict_decay = _decay_matrix(G, False, C)
    P = kk * strict_decay
    dbeta += tl.sum(dA * P, 1)
    dP = dA * beta[:, None]
    dP_P = dP * P
    dG = tl.sum(dP_P, 1) - tl.sum(dP_P, 0)
    dkk = dP * strict_decay
    dkk += tl.trans(dkk)
    for i_k in range(DK // BK):
        ck = i_k * BK + tl.arange(0, BK)
        k = load_rows(k_ptr, rows * H + i_h, ck, DK, valid).to(tl.float32)
        dbw = tl.dot(
            tl.trans(tinv),
            load_rows(dw_ptr, rows * H + i_h, ck, DK, valid).to(tl.float32),
            input_precision=PREC,
        )
        dk = (
            load_rows(dk_part_ptr, rows * H + i_h, ck, DK, valid)
            + dbw * bw_scale[:, None]
            + tl.dot(dkk, k, input_precision=PREC)
        )
        store_rows(dk_ptr, dk, rows * H + i_h, ck, DK, valid)
        k_dbw = tl.sum(dbw * k, 1)
        dbeta += gamma * k_dbw
        dG += bw_scale * k_dbw
    for i_k in range(NK):
        dG += tl.load(dg_part_ptr + (i_k * TT + rows) * H + i_h, mask=valid, other=0.0)
    tl.store(dbeta_ptr + rows * H + i_h, dbeta, mask=valid)
    tl.store(dg_ptr + rows * H + i_h, tl.sum(dG, 0) - tl.cumsum(dG, 0) + dG, mask=valid)


# ----------------------------------------------------------------------------------------------------
# Host side


def _precision(dtype):
    """Kernel arguments of the dot products: PREC, for products with a float32 operand (exact float32 for
    float32 inputs, else tf32); NATIVE, whether two 16-bit operands multiply natively (not in
    the CPU interpreter, which multiplies 16-bit operands wrongly)."""
    exact = dtype == torch.float32
    return dict(PREC="ieee" if exact else "tf32", NATIVE=not INTERPRET and not exact)


def _intermediate_dtype(dtype, DK):
    """dtype of the stored Tinv, W, U and Vnew (forward-pass quantities that enter products, see _product, and
    Vnew = U - W S): float16 where the products run in tf32 and Dk >= 64 (16-bit inputs): the same
    10-bit mantissa at half the bytes; else float32."""
    return torch.float16 if _precision(dtype)["PREC"] == "tf32" and DK >= 64 else torch.float32


def _gradient_dtype(dtype):
    """dtype of the stored dW: bfloat16 for 16-bit inputs (a gradient needs float32's range), float32 for float32
    inputs. (dVnew and the partial dk stay float32: bfloat16 was not accurate enough for them at T = 1.)"""
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


def _inverse_precision(dtype):
    """INVERSE_PREC of _wy_invert_kernel, for the products inside (I + A)^-1: float32-accurate, i.e. exact, or
    three tf32 products on the GPU for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 or INTERPRET else "tf32x3"


def _launch_config(dtype, DK, DV):
    """triton.Config per kernel, each timed on an H100 at Dk = Dv = 128 in bf16 (bench.py's delta section),
    Dk = 256 at B2 T2048 H8. invert, wy: warps only (the inversion: 1, a 16-row tile is one warp's work; 4
    for float32 and Dk = 256, whose tiles need more registers); state, state_backward: BV state columns per
    program of the sequential passes (32 at Dk = 256: 16 columns at 8 warps were miscompiled); recurrent:
    the decode kernel, with the state pass's BV and warps; chunk (output), grad (dq/dk/dW), wy_grad (the WY
    backward, 1 stage: it holds several (C, C) matrices): BK x BV blocks. Dk = 256: 8 warps, 1 stage where
    registers or shared memory run short."""
    large, widest = DK > 64, DK > 128
    state_BV = min(DV, 32 if large else 64)
    state_warps = 8 if widest else 4
    return dict(
        invert=triton.Config({}, num_warps=1 if dtype != torch.float32 and DK <= 128 else 4),
        wy=triton.Config({}, num_warps=8 if widest else 4),
        state=triton.Config(dict(BV=state_BV), num_warps=state_warps, num_stages=1 if widest else 2),
        recurrent=triton.Config(dict(BV=state_BV), num_warps=state_warps),
        state_backward=triton.Config(
            dict(BV=min(DV, 32 if large else 64)), num_warps=8 if widest else 4, num_stages=1 if large else 2
        ),
        chunk=triton.Config(
            dict(BK=min(DK, 64), BV=min(DV, 128 if large else 64)), num_warps=8 if large else 4, num_stages=2
        ),
        grad=triton.Config(
            dict(BK=min(DK, 64), BV=min(DV, 32 if large else 64)), num_warps=4, num_stages=3 if large else 1
        ),
        wy_grad=triton.Config(dict(BK=min(DK, 64), BV=min(DV, 64)), num_warps=4, num_stages=1),
    )


def _chunk_index(cu_seqlens):
    """Chunk table of packed sequences cu_seqlens (N+1 offsets, int64): per chunk its first token, its sequence's
    end and its sequence; per sequence the index of its first chunk (N+1 offsets); the first and last chunks of the
    sequences (2N). Chunks never cross a sequence boundary. Reads the number of chunks back from the device (a host
    sync)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    n_chunks = (lengths + CHUNK - 1) // CHUNK
    chunk_offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64, device=cu_seqlens.device)
    chunk_offsets[1:] = torch.cumsum(n_chunks, 0)
    total = int(chunk_offsets[-1])
    seq_of_chunk = torch.repeat_interleave(
        torch.arange(len(lengths), device=cu_seqlens.device), n_chunks, output_size=total
    )
    chunk_start = (
        cu_seqlens[seq_of_chunk]
        + (torch.arange(total, device=cu_seqlens.device) - chunk_offsets[seq_of_chunk]) * CHUNK
    )
    chunk_end = cu_seqlens[seq_of_chunk + 1]
    # (a one-chunk sequence lists its chunk twice and an empty one lists some other chunk: running a chunk again at
    # SEQUENCE_ENDS gives its results again)
    end_chunks = torch.cat([chunk_offsets[:-1], chunk_offsets[1:] - 1]).clamp(0, max(total - 1, 0))
    return chunk_start.contiguous(), chunk_end.contiguous(), chunk_offsets, seq_of_chunk, end_chunks


@functools.lru_cache(maxsize=32)
def _equal_length_chunk_index(B, T, device):
    """cu_seqlens of B sequences of length T and their chunk table (_chunk_index), built once per (B, T, device):
    building the table per call took some twenty small kernels."""
    cu_seqlens = torch.arange(B + 1, dtype=torch.int64, device=device) * T
    return cu_seqlens, _chunk_index(cu_seqlens)


def _wy_prepare(k, v, g, beta, chunk_start, chunk_end, tinv=None):
    """(G (TT,H), Tinv (n_chunks,H,C,C), W (TT,H,Dk), U (TT,H,Dv)) from flattened (TT, H, D) inputs; G float32,
    Tinv, W and U in _intermediate_dtype. A given Tinv (saved by the forward) is used instead of inverting
    again."""
    TT, H, DK = k.shape
    DV = v.shape[-1]
    n_chunks = chunk_start.numel()
    low = _intermediate_dtype(k.dtype, DK)
    config = _launch_config(k.dtype, DK, DV)
    if tinv is None:
        tinv = torch.empty(n_chunks, H, CHUNK, CHUNK, dtype=low, device=k.device)
        if n_chunks > 0:
            _wy_invert_kernel[(n_chunks, H)](
                k,
                g,
                beta,
                chunk_start,
                chunk_end,
                tinv,
                H=H,
                DK=DK,
                C=CHUNK,
                SUB=SUB,
                INVERSE_PREC=_inverse_precision(k.dtype),
                **_precision(k.dtype),
                **launch_options(config["invert"]),
            )
    gcum = torch.empty(TT, H, dtype=torch.float32, device=k.device)
    w = torch.empty(TT, H, DK, dtype=low, device=k.device)
    u = torch.empty(TT, H, DV, dtype=low, device=k.device)
    if n_chunks > 0:
        _wy_prepare_kernel[(n_chunks, H)](
            k,
            v,
            g,
            beta,
            chunk_start,
            chunk_end,
            tinv,
            gcum,
            w,
            u,
            H=H,
            DK=DK,
            DV=DV,
            C=CHUNK,
            **launch_options(config["wy"]),
            **_precision(k.dtype),
        )
    return gcum, tinv, w, u


def _state_forward(k, w, u, gcum, h0, cu_seqlens, chunk_offsets, n_chunks):
    """The sequential state pass from h0 (N,H,Dk,Dv) float32 over n_chunks chunks in all. Returns (final state
    (N,H,Dk,Dv) float32, chunk-start states (n_chunks,H,Dk,Dv) in k's dtype, Vnew (TT,H,Dv) in W's dtype)."""
    TT, H, DK = k.shape
    DV = u.shape[-1]
    N = cu_seqlens.numel() - 1
    config = _launch_config(k.dtype, DK, DV)
    ht = torch.empty(N, H, DK, DV, dtype=torch.float32, device=k.device)
    h = torch.empty(n_chunks, H, DK, DV, dtype=k.dtype, device=k.device)
    vnew = torch.empty(TT, H, DV, dtype=w.dtype, device=k.device)
    _state_forward_kernel[(N, H, DV // config["state"].kwargs["BV"])](
        k,
        w,
        u,
        gcum,
        h0,
        cu_seqlens,
        chunk_offsets,
        ht,
        h,
        vnew,
        H=H,
        DK=DK,
        DV=DV,
        C=CHUNK,
        **_precision(k.dtype),
        **launch_options(config["state"]),
    )
    return ht, h, vnew


def _chunk_output(q, k, h, vnew, gcum, chunk_start, chunk_end, scale):
    """O (TT,H,Dv) in q's dtype from the chunk-start states and Vnew."""
    TT, H, DK = q.shape
    DV = vnew.shape[-1]
    config = _launch_config(k.dtype, DK, DV)
    o = torch.empty(TT, H, DV, dtype=q.dtype, device=q.device)
    n_chunks = chunk_start.numel()
    if n_chunks > 0:
        _chunk_output_kernel[(n_chunks, H, DV // config["chunk"].kwargs["BV"])](
            q,
            k,
            h,
            vnew,
            gcum,
            chunk_start,
            chunk_end,
            o,
            scale,
            H=H,
            DK=DK,
            DV=DV,
            C=CHUNK,
            **launch_options(config["chunk"]),
            **_precision(q.dtype),
        )
    return o


def _chunk_forward(q, k, v, g, beta, h0, cu_seqlens, chunk_index, scale):
    """(o (TT,H,Dv), final state (N,H,Dk,Dv), Tinv (n_chunks,H,C,C)) from flattened packed inputs and their chunk
    table (_chunk_index)."""
    chunk_start, chunk_end, chunk_offsets, _, _ = chunk_index
    gcum, tinv, w, u = _wy_prepare(k, v, g, beta, chunk_start, chunk_end)
    ht, h, vnew = _state_forward(k, w, u, gcum, h0, cu_seqlens, chunk_offsets, chunk_start.numel())
    return _chunk_output(q, k, h, vnew, gcum, chunk_start, chunk_end, scale), ht, tinv


def _chunk_backward(q, k, v, g, beta, h0, tinv, cu_seqlens, chunk_index, scale, do, dht, float32_ends):
    """All input gradients (dq, dk, dv, dg, dbeta, dh0), recomputing the forward's intermediates first, except
    Tinv and the chunk table, which the forward saved (the inversion is the costliest part of the WY
    preparation). float32_ends: whether h0 or dht may differ from their 16-bit copies (a given initial state, a
    final state with a gradient), i.e. whether the sequence ends need _chunk_grad_qkw_kernel's second run."""
    TT, H, DK = k.shape
    DV = v.shape[-1]
    N = cu_seqlens.numel() - 1
    chunk_start, chunk_end, chunk_offsets, chunk_sequence, end_chunks = chunk_index
    gcum, _, w, u = _wy_prepare(k, v, g, beta, chunk_start, chunk_end, tinv=tinv)
    _, h, vnew = _state_forward(k, w, u, gcum, h0, cu_seqlens, chunk_offsets, chunk_start.numel())
    config = _launch_config(k.dtype, DK, DV)
    precision = _precision(q.dtype)
    n_chunks = chunk_start.numel()
    dvnew = torch.empty(TT, H, DV, dtype=torch.float32, device=q.device)
    dh = torch.empty_like(h)
    dh0 = torch.empty(N, H, DK, DV, dtype=torch.float32, device=q.device)
    _state_backward_kernel[(N, H, DV // config["state_backward"].kwargs["BV"])](
        q,
        k,
        w,
        gcum,
        do,
        dht,
        cu_seqlens,
        chunk_offsets,
        dh,
        dvnew,
        dh0,
        scale,
        H=H,
        DK=DK,
        DV=DV,
        C=CHUNK,
        **precision,
        **launch_options(config["state_backward"]),
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbeta = torch.empty(TT, H, dtype=torch.float32, device=q.device)
    dg = torch.empty(TT, H, dtype=torch.float32, device=q.device)
    if n_chunks > 0:
        n_k = DK // config["grad"].kwargs["BK"]
        dk_part = torch.empty(TT, H, DK, dtype=torch.float32, device=q.device)
        dw = torch.empty(TT, H, DK, dtype=_gradient_dtype(q.dtype), device=q.device)
        dg_part = torch.empty(n_k, TT, H, dtype=torch.float32, device=q.device)
        for sequence_ends in (False, True) if float32_ends and h.dtype != torch.float32 else (False,):
            _chunk_grad_qkw_kernel[(n_k * (end_chunks.numel() if sequence_ends else n_chunks), H)](
                q,
                k,
                gcum,
                h,
                dh,
                vnew,
                dvnew,
                do,
                h0,
                dht,
                cu_seqlens,
                chunk_start,
                chunk_end,
                chunk_sequence,
                end_chunks,
                dq,
                dk_part,
                dw,
                dg_part,
                scale,
                TT,
                H=H,
                DK=DK,
                DV=DV,
                C=CHUNK,
                SEQUENCE_ENDS=sequence_ends,
                **precision,
                **launch_options(config["grad"]),
            )
        _chunk_grad_wy_kernel[(n_chunks, H)](
            k,
            v,
            beta,
            gcum,
            tinv,
            dvnew,
            dw,
            dk_part,
            dg_part,
            chunk_start,
            chunk_end,
            dk,
            dv,
            dbeta,
            dg,
            TT,
            H=H,
            DK=DK,
            DV=DV,
            NK=n_k,
            C=CHUNK,
            **precision,
            **launch_options(config["wy_grad"]),
        )
    return dq, dk, dv, dg, dbeta, dh0


class _ChunkGatedDeltaRule(torch.autograd.Function):
    """Chunked forward and backward on flattened packed inputs q, k (TT,H,Dk), v (TT,H,Dv), g, beta (TT,H),
    initial state h0 (N,H,Dk,Dv) float32 (zeros when the caller gave none: given_initial_state False)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, cu_seqlens, chunk_index, scale, given_initial_state):
        o, ht, tinv = _chunk_forward(q, k, v, g, beta, h0, cu_seqlens, chunk_index, scale)
        ctx.save_for_backward(q, k, v, g, beta, h0, tinv, cu_seqlens, *chunk_index)
        ctx.scale = scale
        ctx.given_initial_state = given_initial_state
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0, tinv, cu_seqlens, *chunk_index = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do.contiguous()
        float32_ends = ctx.given_initial_state or dht is not None
        dht = torch.zeros_like(h0) if dht is None else dht.float().contiguous()
        dq, dk, dv, dg, dbeta, dh0 = _chunk_backward(
            q, k, v, g, beta, h0, tinv, cu_seqlens, chunk_index, ctx.scale, do, dht, float32_ends
        )
        return dq, dk, dv, dg, dbeta, dh0, None, None, None, None


def _recurrent_forward(q, k, v, g, beta, h0, cu_seqlens, scale):
    """Token-by-token kernel on flattened packed inputs; returns (o (TT,H,Dv), final state (N,H,Dk,Dv))."""
    TT, H, DK = q.shape
    DV = v.shape[-1]
    N = cu_seqlens.numel() - 1
    config = _launch_config(k.dtype, DK, DV)
    o = torch.empty(TT, H, DV, dtype=q.dtype, device=q.device)
    ht = torch.empty(N, H, DK, DV, dtype=torch.float32, device=q.device)
    _recurrent_kernel[(N, H, DV // config["recurrent"].kwargs["BV"])](
        q,
        k,
        v,
        g,
        beta,
        h0,
        cu_seqlens,
        o,
        ht,
        scale,
        H=H,
        DK=DK,
        DV=DV,
        **launch_options(config["recurrent"]),
    )
    return o, ht


def _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens):
    """Raises ValueError naming the first problem with the arguments; returns N (number of sequences)."""
    name = "gated_delta_rule"
    check_qkv(name, q, k, v)
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    for argument, x in (("g", g), ("beta", beta)):
        if x.shape != q.shape[:3]:
            raise ValueError(
                f"{name}: {argument} must be (B, T, H) = {tuple(q.shape[:3])}; got {tuple(x.shape)}"
            )
    if DK not in SUPPORTED_HEAD_DIMS or DV not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{name}: head dims must be one of {SUPPORTED_HEAD_DIMS}; got Dk={DK}, Dv={DV}")
    check_device(name, q, k, v, g, beta)
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"{name}: cu_seqlens needs B == 1 (packed sequences); got B={B}")
        if (
            cu_seqlens.dim() != 1
            or cu_seqlens.numel() < 2
            or cu_seqlens.dtype not in (torch.int32, torch.int64)
        ):
            raise ValueError(f"{name}: cu_seqlens must be a 1-D int32/int64 tensor of N+1 offsets")
        if (
            int(cu_seqlens[0]) != 0
            or int(cu_seqlens[-1]) != T
            or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any())
        ):
            raise ValueError(f"{name}: cu_seqlens must rise from 0 to T={T}; got {cu_seqlens.tolist()}")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (N, H, DK, DV):
        raise ValueError(
            f"{name}: initial_state must be (N, H, Dk, Dv) = ({N}, {H}, {DK}, {DV}); "
            f"got {tuple(initial_state.shape)}"
        )
    return N


def gated_delta_rule(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """Gated delta rule, Triton. q, k (B,T,H,Dk) L2-normalised by the caller; v (B,T,H,Dv); g (B,T,H) log-decay
    (<= 0); beta (B,T,H) in (0,1); scale defaults to Dk**-0.5; initial_state (N,H,Dk,Dv) float32 or None;
    cu_seqlens (N+1,) offsets of packed sequences with B == 1 (the state never crosses a boundary).
    Returns (o (B,T,H,Dv) in q's dtype, final state (N,H,Dk,Dv) float32 or None).

    T == 1 without gradients (decoding) runs the recurrent kernel; everything else the chunked kernels,
    differentiable in q, k, v, g, beta and initial_state (the forward then keeps Tinv for the backward:
    n_chunks * H * 64 * 64 values, float16 for 16-bit inputs with Dk of 64 or 128, else float32).
    """
    N = _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    scale = DK**-0.5 if scale is None else float(scale)
    if cu_seqlens is None:
        cu_seqlens, chunk_index = _equal_length_chunk_index(B, T, q.device)
    else:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int64).contiguous()
        chunk_index = None  # built below where the chunked kernels need it
    flat = [x.reshape(B * T, H, -1).contiguous() for x in (q, k, v)]
    g_flat = g.reshape(B * T, H).float().contiguous()
    beta_flat = beta.reshape(B * T, H).float().contiguous()
    if initial_state is None:
        h0 = torch.zeros(N, H, DK, DV, dtype=torch.float32, device=q.device)
    else:
        h0 = initial_state.float().contiguous()
    inputs = (q, k, v, g, beta) + (() if initial_state is None else (initial_state,))
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    if (needs_grad or T > 1) and chunk_index is None:
        chunk_index = _chunk_index(cu_seqlens)
    if needs_grad:
        o, ht = _ChunkGatedDeltaRule.apply(
            *flat, g_flat, beta_flat, h0, cu_seqlens, chunk_index, scale, initial_state is not None
        )
    elif T == 1:
        o, ht = _recurrent_forward(*flat, g_flat, beta_flat, h0, cu_seqlens, scale)
    else:
        o, ht, _ = _chunk_forward(*flat, g_flat, beta_flat, h0, cu_seqlens, chunk_index, scale)
    o = o.reshape(B, T, H, DV)
    return o, (ht if output_final_state else None)
