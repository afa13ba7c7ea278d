"""One-token decode kernels: the gated delta rule's step and attention over the ring buffer, one token per
sequence. At decoding a call holds B tokens (the batch), so a kernel made for thousands of tokens (the chunked
delta rule, flash-style attention) runs a handful of programs and does work that one token does not need
(chunk tables, the WY transform, tiles of queries). Each kernel here does one token's work in one launch and
updates the cache in place; their plain-PyTorch twins are nirvana.gated_delta_rule_step and
nirvana.attention_step (test_kernels_decode.py compares them).

  _delta_rule_step_kernel      one program = one (sequence, head, BV value columns): the L2 norm of q and k,
                               the gates, one step of the recurrence on its (Dk, BV) block of the float32 state
                               in place, and o's BV columns.
  _attention_step_kernel       one program = one (sequence, head, range of ring slots): attends the query over
                               the slots of its range inside the window, BLOCK_N slots at a time (online
                               softmax), and writes the new key and value into their slot if it is in range.
  _attention_combine_kernel    one program = one (sequence, head): combines the ranges' partial softmaxes
                               (split over slots as in flash-decoding: B * H programs alone would leave most of
                               a GPU idle while each reads a 2048-slot window).
Head sizes need not be powers of two: blocks are the sizes rounded up (kernels.common.block_size), pad
columns masked. Arithmetic in float32; inputs of any float dtype.
"""

import torch
import triton
import triton.language as tl

from kernels.common import INTERPRET, block_size, check_device

LOG2E = 1.4426950408889634


def _check_no_gradient(name, *tensors):
    """Raises ValueError if autograd would want a gradient: these kernels have no backward (decoding runs under
    torch.no_grad(), as generate() and eval.py do)."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        raise ValueError(
            f"{name} (Triton) computes no gradients: decode under torch.no_grad(), or use backend='torch'"
        )


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) in float32, accurate where exp(x) is small (log1p written out: log(u) e / (u - 1))."""
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * e / (u - 1.0))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _delta_rule_step_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    decay_ptr,
    beta_ptr,
    A_log_ptr,
    dt_bias_ptr,
    state_ptr,
    o_ptr,
    scale,
    q_row_stride,
    k_row_stride,
    v_row_stride,
    gate_row_stride,
    H: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BV: tl.constexpr,
):
    """One program = sequence i_b, head i_h, value columns cv (BV,) of the state.

    Blocks: q, k (BLOCK_DK,), state S (BLOCK_DK, BV) float32, v, o (BV,). In float32:
      q, k <- q / ||q||, k / ||k||, rounded to the inputs' dtype (as the parallel path feeds the delta rule)
      g = -exp(A_log) softplus(Wa x + dt_bias);  beta = sigmoid(Wb x)
      S <- exp(g) S;  S <- S + k (beta (v - S^T k))^T;  o = S^T (scale q)        (eq. of Gated DeltaNet)
    S is written back in place; every program of a (sequence, head) recomputes the norms and gates.
    """
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    row = i_b * H + i_h
    dk = tl.arange(0, BLOCK_DK)
    dk_ok = dk < DK
    cv = tl.program_id(2) * BV + tl.arange(0, BV)
    cv_ok = cv < DV
    q = tl.load(q_ptr + i_b * q_row_stride + i_h * DK + dk, mask=dk_ok, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + i_b * k_row_stride + i_h * DK + dk, mask=dk_ok, other=0.0).to(tl.float32)
    q = (q / tl.maximum(tl.sqrt(tl.sum(q * q, 0)), 1e-12)).to(q_ptr.dtype.element_ty).to(tl.float32)
    k = (k / tl.maximum(tl.sqrt(tl.sum(k * k, 0)), 1e-12)).to(k_ptr.dtype.element_ty).to(tl.float32)
    decay = tl.load(decay_ptr + i_b * gate_row_stride + i_h).to(tl.float32)
    g = -tl.exp(tl.load(A_log_ptr + i_h).to(tl.float32)) * _softplus(
        decay + tl.load(dt_bias_ptr + i_h).to(tl.float32)
    )
    beta = tl.sigmoid(tl.load(beta_ptr + i_b * gate_row_stride + i_h).to(tl.float32))
    v = tl.load(v_ptr + i_b * v_row_stride + i_h * DV + cv, mask=cv_ok, other=0.0).to(tl.float32)
    state_offsets = row * DK * DV + dk[:, None] * DV + cv[None, :]
    state_ok = dk_ok[:, None] & cv_ok[None, :]
    S = tl.load(state_ptr + state_offsets, mask=state_ok, other=0.0) * tl.exp(g)
    correction = beta * (v - tl.sum(k[:, None] * S, 0))  # (BV,) beta (v - S^T k)
    S = S + k[:, None] * correction[None, :]
    o = tl.sum((q * scale)[:, None] * S, 0)
    tl.store(state_ptr + state_offsets, S, mask=state_ok)
    tl.store(o_ptr + row * DV + cv, o.to(o_ptr.dtype.element_ty), mask=cv_ok)


def _rows_of_heads(x):
    """Is x (B, H, D) laid out as the kernel reads it: heads side by side in each sequence's row, any stride
    between rows? (q, k and v split from the convolution's (B, 1, 2*H*Dk + H*Dv) output are, so decoding
    reads them in place instead of copying each.)"""
    return x.stride(2) == 1 and x.stride(1) == x.shape[2]


def _delta_rule_value_block(DV):
    """BV: value columns per program, 32 (B * H * Dv / 32 programs: 128 at B4 H8 Dv128), the whole of a
    smaller Dv."""
    return min(32, block_size(DV))


@torch.compiler.disable  # under torch.compile it runs as it is, between two graphs (as the kernels do)
def gated_delta_rule_step(q, k, v, decay, beta, A_log, dt_bias, state, scale=None):
    """nirvana.gated_delta_rule_step in one launch: q, k (B, H, Dk) before the L2 norm; v (B, H, Dv); decay,
    beta (B, H) (rows may be strided, as split from the fused projection); A_log, dt_bias (H,); state
    (B, H, Dk, Dv) float32 contiguous, updated in place. Returns o (B, H, Dv) in v's dtype."""
    B, H, DK = q.shape
    DV = v.shape[-1]
    if k.shape != q.shape or v.shape[:2] != (B, H) or decay.shape != (B, H) or beta.shape != (B, H):
        raise ValueError(
            "gated_delta_rule_step: expected q, k (B, H, Dk), v (B, H, Dv), decay and beta (B, H); got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, decay {tuple(decay.shape)}, "
            f"beta {tuple(beta.shape)}"
        )
    if state.shape != (B, H, DK, DV) or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(
            f"gated_delta_rule_step: state must be a contiguous float32 (B, H, Dk, Dv) = {(B, H, DK, DV)}; "
            f"got {tuple(state.shape)} {state.dtype}"
        )
    check_device("gated_delta_rule_step", q, k, v, decay, beta, A_log, dt_bias, state)
    _check_no_gradient("gated_delta_rule_step", q, k, v, decay, beta, A_log, dt_bias)
    if decay.stride() != beta.stride() or decay.stride(1) != 1:
        decay, beta = decay.contiguous(), beta.contiguous()
    q, k, v = (x if _rows_of_heads(x) else x.contiguous() for x in (q, k, v))
    o = torch.empty(B, H, DV, device=v.device, dtype=v.dtype)
    BV = _delta_rule_value_block(DV)
    _delta_rule_step_kernel[(B, H, triton.cdiv(DV, BV))](
        q,
        k,
        v,
        decay,
        beta,
        A_log,
        dt_bias,
        state,
        o,
        DK**-0.5 if scale is None else float(scale),
        q.stride(0),
        k.stride(0),
        v.stride(0),
        decay.stride(0),
        H=H,
        DK=DK,
        DV=DV,
        BLOCK_DK=block_size(DK),
        BV=BV,
        num_warps=1 if INTERPRET else 4,
    )
    return o


@triton.jit
def _attention_step_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_positions_ptr,
    position_ptr,
    partial_ptr,
    scale_log2,
    window,
    SLOTS,
    SPLIT_SLOTS,
    H: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program = sequence i_b, head i_h, ring slots [i_s SPLIT_SLOTS, (i_s + 1) SPLIT_SLOTS): the query at
    `position` over them; writes the split's softmax max m, sum l and unnormalised output acc (BLOCK_DV,).

    Blocks: q, the new k (BLOCK_DK,), the new v and acc (BLOCK_DV,), BLOCK_N slots per step of the loop (keys
    (BLOCK_N, BLOCK_DK), values (BLOCK_N, BLOCK_DV)). Slot j holds position slot_positions[j] (-1: empty); the
    new token's slot (position mod SLOTS) is taken as holding it, its key and value from registers in place of
    what the slot held. A slot is visible when position - window < its position <= position. Online softmax in
    base 2, float32. The program whose range holds the new slot writes the new key and value there after its
    loop (no other program reads that (sequence, head)'s slot), and that of (0, 0) the slot's position (the
    other programs read either value there and replace it). Keys, values and positions are loaded
    independently (masked by the range alone) and the values of invisible slots zeroed afterwards: key and
    value loads masked by visibility waited on the positions' load (with them, 27.8 us per layer at B 4, H 8,
    D 128, 2048 slots on an H100; now 21.5 us).
    """
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    i_s = tl.program_id(2)
    position = tl.load(position_ptr)
    slot = position % SLOTS
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    dk_ok, dv_ok = dk < DK, dv < DV
    row = i_b * H + i_h
    q = tl.load(q_ptr + row * DK + dk, mask=dk_ok, other=0.0).to(tl.float32)
    k_new = tl.load(k_ptr + row * DK + dk, mask=dk_ok, other=0.0)
    v_new = tl.load(v_ptr + row * DV + dv, mask=dv_ok, other=0.0)
    m_i = tl.full([], -1.0e30, tl.float32)  # running max of the online softmax
    l_i = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    first = i_s * SPLIT_SLOTS
    last = tl.minimum(first + SPLIT_SLOTS, SLOTS)
    for start in range(first, last, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        in_range = n < last
        cache_rows = row * SLOTS + n  # (BLOCK_N,) rows of the (B * H * SLOTS, D) caches: one contiguous block
        # keys, values and the slots' positions are loaded independently (masked by the range alone), so the
        # loads of the block's keys and values need not wait for its positions; slots found invisible are
        # zeroed below, whatever they hold
        keys = tl.load(
            k_cache_ptr + cache_rows[:, None] * DK + dk[None, :],
            mask=in_range[:, None] & dk_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        values = tl.load(
            v_cache_ptr + cache_rows[:, None] * DV + dv[None, :],
            mask=in_range[:, None] & dv_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        held = tl.load(slot_positions_ptr + n, mask=in_range, other=-1)
        is_new = n == slot
        held = tl.where(is_new, position, held)
        visible = in_range & (held >= 0) & (held <= position) & (held > position - window)
        keys = tl.where(is_new[:, None], k_new.to(tl.float32)[None, :], keys)
        s = tl.where(visible, tl.sum(keys * q[None, :], 1) * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.math.exp2(s - m_new)
        alpha = tl.math.exp2(m_i - m_new)
        values = tl.where(
            is_new[:, None], v_new.to(tl.float32)[None, :], tl.where(visible[:, None], values, 0.0)
        )
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * values, 0)
        m_i = m_new
    partial = partial_ptr + (row * tl.num_programs(2) + i_s) * (BLOCK_DV + 2)  # [m, l, acc]
    tl.store(partial, m_i)
    tl.store(partial + 1, l_i)
    tl.store(partial + 2 + dv, acc)
    if (first <= slot) & (slot < last):
        new_row = row * SLOTS + slot
        tl.store(k_cache_ptr + new_row * DK + dk, k_new.to(k_cache_ptr.dtype.element_ty), mask=dk_ok)
        tl.store(v_cache_ptr + new_row * DV + dv, v_new.to(v_cache_ptr.dtype.element_ty), mask=dv_ok)
        if (i_b == 0) & (i_h == 0):
            tl.store(slot_positions_ptr + slot, position)


@triton.jit
def _attention_combine_kernel(
    partial_ptr, o_ptr, SPLITS, DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_SPLITS: tl.constexpr
):
    """One program = one (sequence, head): o = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over its SPLITS
    partial results (M their largest m; a split that saw no visible slot has l = 0 and acc = 0)."""
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK_SPLITS)
    dv = tl.arange(0, BLOCK_DV)
    split_ok = splits < SPLITS
    partial = partial_ptr + (row * SPLITS + splits) * (BLOCK_DV + 2)  # (BLOCK_SPLITS,)
    m = tl.load(partial, mask=split_ok, other=-1.0e30)
    weight = tl.math.exp2(m - tl.max(m, 0))
    l_total = tl.sum(weight * tl.load(partial + 1, mask=split_ok, other=0.0), 0)
    acc = tl.load(partial[:, None] + 2 + dv[None, :], mask=split_ok[:, None], other=0.0)
    o = tl.sum(weight[:, None] * acc, 0) / l_total
    tl.store(o_ptr + row * DV + dv, o.to(o_ptr.dtype.element_ty), mask=dv < DV)


def _attention_blocks(B, H, DK, DV, slots):
    """BLOCK_N, the ring slots per loop step: 128 up to head size 128 (the fastest of 32, 64 and 128 on an H100
    at H 8 and 16: 21.5 and 32.9 us per 2048-slot layer against 27.8 and 50.8 with 64), 32 above, 16 under the
    CPU interpreter; and SPLITS, the programs per (sequence, head), each over an equal range of
    whole BLOCK_N blocks: enough for about 512 programs in all (16 at B4 H8), at most one per block."""
    BLOCK_N = 16 if INTERPRET else (128 if max(DK, DV) <= 128 else 32)
    blocks = triton.cdiv(slots, BLOCK_N)
    splits = max(1, min(blocks, triton.cdiv(512, B * H)))
    split_slots = triton.cdiv(blocks, splits) * BLOCK_N
    return BLOCK_N, triton.cdiv(slots, split_slots), split_slots


@torch.compiler.disable
def attention_step(q, k, v, k_cache, v_cache, slot_positions, position, window=None, scale=None):
    """nirvana.attention_step in one launch: q, k (B, H, Dk), v (B, H, Dv); k_cache (B, H, slots, Dk),
    v_cache (B, H, slots, Dv) and slot_positions (slots,) int64 contiguous, updated in place; position (1,)
    int64 on the device (a CUDA graph replays it); window None attends every filled slot. Returns
    (B, H, Dv) in v's dtype."""
    B, H, DK = q.shape
    DV = v.shape[-1]
    slots = slot_positions.shape[0]
    if (
        k.shape != q.shape
        or v.shape[:2] != (B, H)
        or k_cache.shape != (B, H, slots, DK)
        or v_cache.shape != (B, H, slots, DV)
    ):
        raise ValueError(
            "attention_step: expected q, k (B, H, Dk), v (B, H, Dv), k_cache (B, H, slots, Dk), v_cache "
            f"(B, H, slots, Dv); got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, k_cache "
            f"{tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and slot_positions.is_contiguous()):
        raise ValueError(
            "attention_step: the caches and slot_positions must be contiguous (updated in place)"
        )
    if slot_positions.dtype != torch.int64 or position.numel() != 1 or position.dtype != torch.int64:
        raise ValueError(
            f"attention_step: slot_positions and position must be int64, position one element; got "
            f"{slot_positions.dtype}, position {tuple(position.shape)} {position.dtype}"
        )
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"attention_step: window must be a positive integer or None, got {window}")
    check_device("attention_step", q, k, v, k_cache, v_cache, slot_positions, position)
    _check_no_gradient("attention_step", q, k, v)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    scale = DK**-0.5 if scale is None else float(scale)
    BLOCK_N, splits, split_slots = _attention_blocks(B, H, DK, DV, slots)
    BLOCK_DV = block_size(DV)
    partial = torch.empty(B * H * splits, BLOCK_DV + 2, device=q.device, dtype=torch.float32)
    _attention_step_kernel[(B, H, splits)](
        q,
        k,
        v,
        k_cache,
        v_cache,
        slot_positions,
        position,
        partial,
        scale * LOG2E,
        slots if window is None else int(window),
        slots,
        split_slots,
        H=H,
        DK=DK,
        DV=DV,
        BLOCK_DK=block_size(DK),
        BLOCK_DV=BLOCK_DV,
        BLOCK_N=BLOCK_N,
        num_warps=1 if INTERPRET else 4,
    )
    o = torch.empty_like(v)
    _attention_combine_kernel[(B * H,)](
        partial,
        o,
        splits,
        DV=DV,
        BLOCK_DV=BLOCK_DV,
        BLOCK_SPLITS=triton.next_power_of_2(splits),
        num_warps=1 if INTERPRET else 4,
    )
    return o
