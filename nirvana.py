"""
Nirvana: a Specialized Generalist Model with a Task-Aware Memory Mechanism (arXiv 2510.26083), in one file.

Read it top to bottom:
  1. NirvanaConfig: every knob, the six variants and the named presets.
  2. The three hot functions, in plain PyTorch: the gated delta rule (token-by-token recurrence = the
     executable spec, plus a chunked form), sliding-window attention, and the Trigger's CL-OGD step.
     `backend="triton"` swaps them for the compiled versions in kernels/; the model code does not change.
  3. Small modules in reading order: norms, the fused projection (several linear maps of one input as
     one GEMM), causal conv, RoPE, attention with its cache, Gated DeltaNet, the Trigger, the Updater,
     the mixers, the block, and the model with generate().

Shapes: B batch, T tokens, H heads, Dk key/query head size, Dv value head size (= expand_v * Dk),
d_t trigger space (64), K bank size (64). Equation numbers refer to the paper. Where the paper leaves a
detail open (initialisations, the order of the Trigger's steps, the exact window), the comment next to the
code says which choice this file makes.

Decoding: setup_caches(batch_size, max_seq_len) gives every cached module (causal convs, delta-rule
states, attention rings) its buffers; each call then passes input_pos, the position of its first token,
and the caller advances it (an int, or a device tensor when a one-token step is replayed from a CUDA
graph). The model itself keeps no count of the tokens it has seen.
"""

import math
from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# ----------------------------------------------------------------------------------------------------------
# 1. Configuration


class Variant(NamedTuple):
    layout: str  # "nirvana", "gdn", "hybrid" or "attention": which mixer each layer uses (layer_kind)
    trigger: bool  # the Trigger (Sec. 2.2) in every post-prelude Nirvana layer
    swa_rope: bool  # RoPE in the sliding-window branch


# Each variant fixes the layer layout; the paper's tables compare them side by side (Tables 2-9, Fig. 4).
VARIANTS = {
    "nirvana": Variant("nirvana", trigger=True, swa_rope=False),
    # without the Trigger: t = sigmoid(u . x), zeta sees [a; b]
    "nirvana-notrigger": Variant("nirvana", trigger=False, swa_rope=False),
    # Appendix A.4
    "nirvana-rope": Variant("nirvana", trigger=True, swa_rope=True),
    # every layer is the Gated DeltaNet branch alone
    "gated-deltanet": Variant("gdn", trigger=False, swa_rope=False),
    # GDN and SWA layers alternating; SWA with RoPE as in Samba
    "hybrid": Variant("hybrid", trigger=False, swa_rope=True),
    # Transformer++: full causal attention with RoPE
    "transformer": Variant("attention", trigger=False, swa_rope=True),
}

# Sizes. Parameter counts with vocab 32000 and untied embeddings (test_nirvana.py checks them):
#          nirvana        nirvana-notrigger  gated-deltanet  hybrid         transformer
#   125m   146,903,568    145,100,688        141,406,608     137,756,232    134,105,856
#   350m   417,496,832    412,723,584        399,724,928     386,796,224    373,867,520
#   1.3b   1,386,310,336  1,377,850,816      1,338,488,256   1,291,357,920  1,244,227,584
# (nirvana-rope has nirvana's count). "tiny" (366,832 for nirvana, vocab 512) is for tests and the CPU.
PRESETS = {
    "tiny": dict(
        vocab_size=512,
        context_length=256,
        d_model=64,
        n_layers=4,
        n_heads=2,
        window=32,
        lowrank=8,
        trigger_dim=16,
        bank_size=8,
    ),
    "125m": dict(d_model=768, n_layers=12, n_heads=6, window=2048, context_length=4096),
    "350m": dict(d_model=1024, n_layers=24, n_heads=8, window=2048, context_length=4096),
    "1.3b": dict(d_model=2048, n_layers=22, n_heads=16, window=2048, context_length=4096),
}


@dataclass
class NirvanaConfig:
    variant: str = "nirvana"  # a key of VARIANTS
    vocab_size: int = 32000  # LLaMA-2-sized sentencepiece vocabulary (Sec. 3)
    context_length: int = 4096  # training context (Sec. 3); the model itself has no length limit
    d_model: int = 2048
    n_layers: int = 22
    n_heads: int = 16  # shared by both memory branches (same heads, same head sizes)
    head_dim: int | None = None  # Dk; None means d_model // n_heads
    expand_v: int = 1  # Dv = expand_v * Dk
    n_prelude: int = 2  # first layers are Gated DeltaNet only (Sec. 2.2)
    window: int = 2048  # W: keys (i-W, i] including the query itself (Sec. 3)
    lowrank: int = 32  # r of the low-rank q/k/v deltas of the SWA branch (Sec. 2.1)
    trigger_dim: int = 64  # d_t, "a compact 64-dimensional space" (Sec. 3.1)
    bank_size: int = 64  # K blocks in the shared fast-weight bank (Sec. 2.2)
    eta_ref: float = 0.1  # eq.(5); our choice: |Δp| about 0.06 per layer at init (d_t = 64)
    detach_inner_grad: bool = False  # True stops training gradients through the inner gradient of eq.(4)
    conv_size: int = 4  # causal depthwise conv of Gated DeltaNet
    ffn_hidden: int | None = None  # SwiGLU hidden size; None means 8/3 d_model rounded up to 128
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    backend: str = "torch"  # "torch" (this file) or "triton" (kernels/)

    def __post_init__(self):
        def fail(message):
            raise ValueError(f"NirvanaConfig: {message}")

        if self.variant not in VARIANTS:
            fail(f"unknown variant {self.variant!r}; choose one of {sorted(VARIANTS)}")
        if self.backend not in ("torch", "triton"):
            fail(f"unknown backend {self.backend!r}; choose 'torch' or 'triton'")
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "window",
            "lowrank",
            "trigger_dim",
            "bank_size",
            "conv_size",
            "expand_v",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                fail(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model}), or set head_dim")
            self.head_dim = self.d_model // self.n_heads
        if self.head_dim < 1:
            fail(f"head_dim must be positive, got {self.head_dim}")
        if self.ffn_hidden is None:
            self.ffn_hidden = 128 * math.ceil(8 * self.d_model / 3 / 128)
        if not 0 <= self.n_prelude <= self.n_layers:
            fail(f"n_prelude must be in [0, n_layers={self.n_layers}], got {self.n_prelude}")
        if self.layout == "nirvana" and self.n_prelude == self.n_layers:
            fail("a Nirvana model needs at least one post-prelude layer (n_prelude < n_layers)")
        if self.value_dim < 8:
            fail(
                f"n_heads * head_dim * expand_v must be >= 8 (zeta's hidden size is 1/8 of it), got {self.value_dim}"
            )
        if self.eta_ref < 0:
            fail(f"eta_ref must be >= 0, got {self.eta_ref}")

    @property
    def layout(self):
        return VARIANTS[self.variant].layout

    @property
    def trigger(self):
        return VARIANTS[self.variant].trigger

    @property
    def swa_rope(self):
        return VARIANTS[self.variant].swa_rope

    @property
    def value_head_dim(self):
        return self.head_dim * self.expand_v  # Dv

    @property
    def key_dim(self):
        return self.n_heads * self.head_dim  # H * Dk: the width of q and k

    @property
    def value_dim(self):
        return self.n_heads * self.value_head_dim  # H * Dv: the width of v, and len(a) = len(b)

    def layer_kind(self, layer):
        """What mixer layer `layer` uses: 'gdn', 'swa', 'attention' or 'nirvana'."""
        if self.layout == "nirvana":
            return "gdn" if layer < self.n_prelude else "nirvana"
        if self.layout == "hybrid":
            return "gdn" if layer % 2 == 0 else "swa"
        return self.layout

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "NirvanaConfig":
        """'<variant>-<size>' (e.g. 'nirvana-125m', 'gated-deltanet-350m') or a bare size (the nirvana variant)."""
        variant, size = "nirvana", name
        for candidate in sorted(VARIANTS, key=len, reverse=True):
            if name.startswith(candidate + "-"):
                variant, size = candidate, name[len(candidate) + 1 :]
                break
        if size not in PRESETS:
            names = [f"{v}-{s}" for v in VARIANTS for s in PRESETS]
            raise ValueError(
                f"unknown preset {name!r}; sizes are {list(PRESETS)}, e.g. {names[:3]} ... {names[-1]}"
            )
        return cls.from_dict({"variant": variant, **PRESETS[size], **overrides})

    @classmethod
    def from_dict(cls, values):
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"NirvanaConfig: unknown fields {sorted(unknown)}")
        return cls(**values)


# ----------------------------------------------------------------------------------------------------------
# 2. The three hot functions (torch backend). kernels/ exports the same names with the same signatures.

CHUNK_SIZE = 64


def gated_delta_rule_recurrent(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """The gated delta rule token by token: the executable spec (Gated DeltaNet, Yang et al. 2025).

    q, k (B, T, H, Dk) L2-normalised; v (B, T, H, Dv); g (B, T, H) log-decay; beta (B, T, H) in (0, 1).
    Per head, with S of shape (Dk, Dv):  S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
    o_t = S_t^T (scale q_t). Returns o (B, T, H, Dv) in v's dtype and the final state (N, H, Dk, Dv) float32.
    """
    if cu_seqlens is not None:
        return _per_sequence(
            gated_delta_rule_recurrent, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens
        )
    B, T, H, Dk = q.shape
    scale = Dk**-0.5 if scale is None else scale
    out_dtype, dtype = v.dtype, _compute_dtype(v)
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    S = q.new_zeros(B, H, Dk, v.shape[-1]) if initial_state is None else initial_state.to(dtype).clone()
    out = []
    for t in range(T):
        k_t, v_t, beta_t = k[:, t], v[:, t], beta[:, t, :, None]  # (B, H, Dk), (B, H, Dv)
        S = S * g[:, t, :, None, None].exp()  # alpha_t S
        S = S - torch.einsum("bhk,bhv->bhkv", k_t, beta_t * torch.einsum("bhk,bhkv->bhv", k_t, S))
        S = S + torch.einsum("bhk,bhv->bhkv", beta_t * k_t, v_t)  # + beta_t k_t v_t^T
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))  # S_t^T q_t
    o = torch.stack(out, dim=1) if out else v.new_zeros(B, 0, H, v.shape[-1])
    return o.to(out_dtype), (S if output_final_state else None)


def gated_delta_rule_chunked(
    q,
    k,
    v,
    g,
    beta,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    chunk_size=CHUNK_SIZE,
):
    """The same function as gated_delta_rule_recurrent, chunk by chunk (the WY/UT form of Gated DeltaNet).

    Inside a chunk with cumulative log-decay G_t = sum_{s<=t} g_s, the delta-rule "new values"
    u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t) solve the unit lower-triangular system
        (I + L) U = beta V - beta exp(G) K S_0,   L_ts = beta_t exp(G_t - G_s) k_t.k_s  (s < t),
    then  O = exp(G) Q S_0 + (Q K^T * exp(G_t - G_s), s <= t) U  and
          S_C = exp(G_C) S_0 + (K * exp(G_C - G))^T U.
    """
    if cu_seqlens is not None:
        return _per_sequence(
            gated_delta_rule_chunked, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens
        )
    B, T, H, Dk = q.shape
    Dv, out_dtype = v.shape[-1], v.dtype
    C = chunk_size
    scale = Dk**-0.5 if scale is None else scale
    pad = (-T) % C  # padded tokens have k = 0, beta = 0, g = 0: they leave the state unchanged

    dtype = _compute_dtype(v)

    def chunks(x):  # (B, T, H, ...) -> (B, H, N, C, ...) float32 (float64 stays float64)
        x = x.to(dtype)
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, 0, 0, pad))
        return x.view(B, (T + pad) // C, C, H, *x.shape[3:]).transpose(1, 3).transpose(2, 3)

    q, k, v, g, beta = chunks(q) * scale, chunks(k), chunks(v), chunks(g), chunks(beta)
    G = g.cumsum(-1)  # (B, H, N, C)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # exp(G_t - G_s), s <= t
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, -math.inf).exp()
    L = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)
    I_plus_L = L + torch.eye(C, device=q.device, dtype=dtype)
    U0 = torch.linalg.solve_triangular(I_plus_L, beta[..., None] * v, upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(
        I_plus_L, (beta * G.exp())[..., None] * k, upper=False, unitriangular=True
    )
    attn = (q @ k.transpose(-1, -2)) * decay  # (B, H, N, C, C)
    S = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(dtype)
    out = []
    for n in range(q.shape[2]):
        U = U0[:, :, n] - W[:, :, n] @ S  # (B, H, C, Dv)
        out.append((q[:, :, n] * G[:, :, n, :, None].exp()) @ S + attn[:, :, n] @ U)
        G_last = G[:, :, n, -1:]  # (B, H, 1)
        S = (
            G_last[..., None].exp() * S
            + (k[:, :, n] * (G_last - G[:, :, n]).exp()[..., None]).transpose(-1, -2) @ U
        )
    o = torch.stack(out, dim=2).reshape(B, H, T + pad, Dv)[:, :, :T].transpose(1, 2)
    return o.to(out_dtype), (S if output_final_state else None)


def _compute_dtype(x):
    """The delta rule runs in float32 (float64 inputs stay float64, for gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sequence(fn, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    """Packed sequences (B == 1, offsets cu_seqlens of length N+1): run fn on each; no state crosses."""
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got q of shape {tuple(q.shape)}")
    offsets = [int(x) for x in cu_seqlens]
    if offsets[0] != 0 or offsets[-1] != q.shape[1] or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={q.shape[1]}, got {offsets}")
    outs, states = [], []
    for n, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
        state = None if initial_state is None else initial_state[n : n + 1]
        o, s = fn(
            *(x[:, start:end] for x in (q, k, v, g, beta)),
            scale=scale,
            initial_state=state,
            output_final_state=True,
        )
        outs.append(o)
        states.append(s)
    return torch.cat(outs, dim=1), (torch.cat(states) if output_final_state else None)


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Torch backend: the chunked form for sequences, the recurrence for one-token decoding."""
    rule = gated_delta_rule_recurrent if q.shape[1] == 1 else gated_delta_rule_chunked
    return rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


def l2_normalize(x, dtype):
    """x / ||x|| over the last dimension, computed in float32 and rounded once to dtype (q and k of the delta
    rule: a bf16 norm leaves |k| = 1 only to about 4e-3)."""
    return F.normalize(x.float(), dim=-1).to(dtype)


def delta_rule_gates(decay, beta, A_log, dt_bias):
    """Gated DeltaNet's gates in float32 from the projections Wa x, Wb x (..., H) and the per-head A_log,
    dt_bias (H,): g = -exp(A_log) softplus(Wa x + dt_bias) (log alpha), beta = sigmoid(Wb x)."""
    g = -A_log.float().exp() * F.softplus(decay.float() + dt_bias.float())
    return g, beta.float().sigmoid()


def gated_delta_rule_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Tensor,
    beta: Tensor,
    A_log: Tensor,
    dt_bias: Tensor,
    state: Tensor,
    scale: float | None = None,
) -> Tensor:
    """One token per sequence through the cached state (decoding): the L2 norm of q and k, the gates and one
    step of the recurrence, as the parallel path computes them for that token.

    q, k (B, H, Dk) before the L2 norm; v (B, H, Dv); decay, beta (B, H) the projections Wa x, Wb x; A_log,
    dt_bias (H,); state (B, H, Dk, Dv) float32, updated in place. Returns o (B, H, Dv) in v's dtype.
    """
    q1, k1 = l2_normalize(q, v.dtype), l2_normalize(k, v.dtype)
    g, beta = delta_rule_gates(decay, beta, A_log, dt_bias)
    o, new_state = gated_delta_rule_recurrent(
        *(x[:, None] for x in (q1, k1, v, g, beta)), scale, state, output_final_state=True
    )
    state.copy_(new_state)
    return o[:, 0]


def windowed_attention(q, k, v, q_positions, k_positions, window=None, scale=None):
    """Softmax attention where query at position i sees keys at positions j with i - window < j <= i.

    q (B, Tq, H, Dk), k (B, Tk, H, Dk), v (B, Tk, H, Dv); positions (Tq,), (Tk,) absolute, a key position < 0
    marks an empty cache slot; window None means full causal attention. Returns (B, Tq, H, Dv).
    """
    delta = q_positions[:, None] - k_positions[None, :]  # (Tq, Tk) = i - j
    visible = (delta >= 0) & (k_positions[None, :] >= 0)
    if window is not None:
        visible &= delta < window
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=visible, scale=scale
    )
    return o.transpose(1, 2)


def sliding_window_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, scale: float | None = None
) -> Tensor:
    """Causal sliding-window attention: query i attends keys (i - window, i], itself included.

    q, k (B, T, H, Dk), v (B, T, H, Dv) -> (B, T, H, Dv); scale defaults to Dk ** -0.5.
    """
    positions = torch.arange(q.shape[1], device=q.device)
    return windowed_attention(q, k, v, positions, positions, window, scale)


# SDPA's backends for attention_step: all but cuDNN's, which PyTorch may pick first on Hopper. On an H100 this
# step, replayed from a CUDA graph, gave other values than run directly (up to 1e-2 relative in bf16) where the
# kernels' step did not; test_kernels_decode.py checks the replay.
ONE_QUERY_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_positions: Tensor,
    position: Tensor,
    window: int | None = None,
    scale: float | None = None,
) -> Tensor:
    """One query per sequence through a ring buffer of keys and values (decoding).

    The new key and value (of the token at `position`, a (1,) tensor) go into slot position mod slots, then
    the query attends the slots whose position j satisfies position - window < j <= position (window None:
    every filled slot). q, k (B, H, Dk), v (B, H, Dv); k_cache (B, H, slots, Dk), v_cache (B, H, slots, Dv)
    (each head's slots side by side, so a step reads one contiguous block per head), slot_positions (slots,)
    (-1: empty), all updated in place. Returns (B, H, Dv) in v's dtype.
    """
    slot = position % slot_positions.shape[0]
    k_cache.index_copy_(2, slot, k[:, :, None].to(k_cache.dtype))
    v_cache.index_copy_(2, slot, v[:, :, None].to(v_cache.dtype))
    slot_positions.index_copy_(0, slot, position)
    keys = k_cache.transpose(1, 2).to(q.dtype)  # (B, slots, H, Dk)
    values = v_cache.transpose(1, 2).to(v.dtype)
    with sdpa_kernel(ONE_QUERY_SDPA_BACKENDS):
        return windowed_attention(q[:, None], keys, values, position, slot_positions, window, scale)[:, 0]


def fast_weight_function(x, p, bank_weight, bank_bias):
    """f(x; p) = x + LN(W(p) x + b(p)), LN without affine parameters (Sec. 2.2).

    x (..., d_t), p (..., K), bank_weight (K, d_t, d_t), bank_bias (K, d_t); W(p) = sum_k p_k W_k eq.(6).
    Contracting the bank with x first, z = sum_k p_k (W_k x + b_k), never forms W(p) per token
    (torch.einsum contracts left to right: bank with x gives (..., K, d_t), then p sums over K).
    """
    bank_weight, bank_bias, p = bank_weight.to(x.dtype), bank_bias.to(x.dtype), p.to(x.dtype)  # in x's dtype
    z = torch.einsum("kij,...j,...k->...i", bank_weight, x, p) + p @ bank_bias  # (..., d_t)
    return x + F.layer_norm(z, z.shape[-1:])


def trigger_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    p_prev: Tensor,
    eta: Tensor,
    bank_weight: Tensor,
    bank_bias: Tensor,
    detach_inner_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """One CL-OGD step of the Trigger (Sec. 2.2), for every token at once; tokens never share p.

    q, k, v (..., d_t) are q~, k~, v~; p_prev (..., K); eta (...,). In this order (learn, then read):
      L = ||f(k~; p_prev) - v~||^2                eq.(3)
      grad = dL/dp at p_prev                      eq.(4), (7): by autograd, kept in the graph
      p = p_prev - eta * grad                     eq.(5)
      c = f(q~; p)                                eq.(2): learn on (k~, v~), then read with q~
    Returns c (..., d_t) and p (..., K).
    """
    differentiable = torch.is_grad_enabled() and not detach_inner_grad
    with torch.enable_grad():
        p_in = p_prev if p_prev.requires_grad else p_prev.detach().requires_grad_()
        # eq.(3), summed over tokens
        loss = (fast_weight_function(k, p_in, bank_weight, bank_bias) - v).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, p_in, create_graph=differentiable, retain_graph=True)
    p = p_prev - eta[..., None] * grad  # eq.(5)
    return fast_weight_function(q, p, bank_weight, bank_bias), p  # eq.(2)


def causal_conv_silu(x, weight):
    """SiLU of a depthwise causal convolution over time: y_t = SiLU(sum_j w_j x_{t-K+1+j}) per channel,
    zeros before x's first step.

    x (B, T, C), weight (C, 1, K). Returns (B, T, C) in x's dtype.
    """
    B, T, C = x.shape
    K = weight.shape[-1]
    x = torch.cat([x.new_zeros(B, K - 1, C), x], dim=1)  # (B, K - 1 + T, C)
    # as a (B, C, 1, K - 1 + T) image in channels-last layout, which is x's own memory: cuDNN's depthwise
    # kernel reads and writes it without the transposed copies conv1d makes; the output is (B, T, C) again
    z = F.conv2d(x.transpose(1, 2).unsqueeze(2), weight.unsqueeze(2).to(x.dtype), groups=C)
    return F.silu(z.squeeze(2).transpose(1, 2))


def causal_conv_silu_step(x, tail, weight):
    """causal_conv_silu for one new time step (decoding): x (B, C) the new input, tail (B, K - 1, C) the K - 1
    inputs before it, updated in place (moved up one row, x its newest). Returns y (B, C) in x's dtype."""
    window = torch.cat([tail.to(x.dtype), x[:, None]], dim=1)  # (B, K, C)
    tail.copy_(window[:, 1:])
    return causal_conv_silu(window, weight)[:, -1]


def autocast_input(x):
    """x in the autocast dtype when autocast is on, else unchanged. A norm's float32 output feeds many
    projections (the Nirvana mixer's fused one, the Trigger's theta, the Updater's u without the Trigger);
    autocast would cast it once per projection and add their input gradients in float32, this casts it
    once (same forward values; the gradients add up in that dtype)."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def rms_norm(x, weight, eps):
    """RMSNorm over the last dimension (d_model), in float32: the pre-norms of every block and the final norm.

    x (..., D), weight (D,). The result is in the autocast dtype under autocast, cast once here (see
    autocast_input), else in x's dtype.
    """
    normed = F.rms_norm(x.float(), x.shape[-1:], weight.float(), eps)
    return autocast_input(normed.to(x.dtype))


def gated_rms_norm(x, gate, weight, eps):
    """Gated DeltaNet's output norm: RMSNorm(x) w * SiLU(gate) over the last dimension (one head's Dv values).

    x, gate (..., D), weight (D,). The norm runs in float32 (under autocast too); the result is in gate's
    dtype.
    """
    normed = F.rms_norm(x.float(), x.shape[-1:], weight.float(), eps)
    return normed.to(gate.dtype) * F.silu(gate)


def swiglu_linear(gate_up, weight):
    """SwiGLU's output projection: (SiLU(gate) * up) W^T. gate_up (..., 2F): gate and up side by side, as
    one GEMM gives them; weight (d_model, F)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, weight)


def linear_cross_entropy(h, weight, targets):
    """Mean cross-entropy of the logits h W^T over the targets that are not -1 (the language-model loss).

    h (N, d_model), weight (vocab, d_model), targets (N,) -> scalar float32. The logits are formed at the
    matmul's precision (autocast's under autocast) and the softmax runs in float32 over all N x vocab of them.
    """
    logits = F.linear(h, weight)  # (N, vocab)
    return F.cross_entropy(logits.float(), targets, ignore_index=-1)


TORCH_OPS = SimpleNamespace(
    gated_delta_rule=gated_delta_rule,
    gated_delta_rule_step=gated_delta_rule_step,
    sliding_window_attention=sliding_window_attention,
    attention_step=attention_step,
    trigger_step=trigger_step,
    causal_conv_silu=causal_conv_silu,
    causal_conv_silu_step=causal_conv_silu_step,
    l2_normalize=l2_normalize,
    rms_norm=rms_norm,
    gated_rms_norm=gated_rms_norm,
    swiglu_linear=swiglu_linear,
    linear_cross_entropy=linear_cross_entropy,
)


def plain_when_compiled_without_grad(fused, plain):
    """fused, except under torch.compile without gradients (a compiled decode step), where plain is traced:
    these fused kernels exist to keep less for backward, and without one inductor fuses plain with the
    elementwise work around it (one kernel where fused would stand alone between two graphs)."""

    def op(*args):
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            return plain(*args)
        return fused(*args)

    return op


def load_backend(name):
    """The hot functions for `backend`: this file's ("torch") or the fast ones of kernels/ ("triton")."""
    if name == "torch":
        return TORCH_OPS
    try:
        import kernels
    except ImportError as error:
        raise RuntimeError(
            f"backend='triton' needs the kernels/ package and Triton ({error}); "
            "use backend='torch' or install triton"
        ) from error
    from kernels import decode, trigger_decode
    from kernels.causal_conv import causal_conv_silu as fused_causal_conv_silu
    from kernels.causal_conv import causal_conv_silu_step as fused_causal_conv_silu_step
    from kernels.l2_norm import l2_normalize as fused_l2_normalize
    from kernels.linear_cross_entropy import chunked_linear_cross_entropy
    from kernels.rms_norm import gated_rms_norm as fused_gated_rms_norm
    from kernels.rms_norm import rms_norm as fused_rms_norm
    from kernels.swiglu import swiglu_linear as fused_swiglu_linear

    return SimpleNamespace(
        gated_delta_rule=kernels.gated_delta_rule,
        gated_delta_rule_step=decode.gated_delta_rule_step,  # one token per sequence
        sliding_window_attention=kernels.sliding_window_attention,
        attention_step=decode.attention_step,  # one query per sequence over the ring buffer
        trigger_step=trigger_decode.trigger_step,  # fused kernel, or the decode kernels for a few tokens
        causal_conv_silu=fused_causal_conv_silu,  # keeps x alone for backward, not the conv's output
        causal_conv_silu_step=fused_causal_conv_silu_step,  # one token per sequence, the cache moved in place
        # l2_normalize keeps its output (which the delta rule keeps too) and the norms
        l2_normalize=plain_when_compiled_without_grad(fused_l2_normalize, l2_normalize),
        rms_norm=plain_when_compiled_without_grad(fused_rms_norm, rms_norm),
        gated_rms_norm=plain_when_compiled_without_grad(fused_gated_rms_norm, gated_rms_norm),
        swiglu_linear=plain_when_compiled_without_grad(fused_swiglu_linear, swiglu_linear),
        linear_cross_entropy=chunked_linear_cross_entropy,
    )


def with_ops(ops, **replaced):
    """A backend's op table with some of its functions replaced, e.g. the torch backend with one kernel
    swapped in (the tests and bench.py compare paths this way)."""
    return SimpleNamespace(**{**vars(ops), **replaced})


# ----------------------------------------------------------------------------------------------------------
# 3. Modules, in reading order


class RMSNorm(nn.Module):
    """RMSNorm over d_model, in float32; its output in the autocast dtype under autocast (rms_norm)."""

    def __init__(self, dim, eps, ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.rms_norm = eps, ops.rms_norm

    def forward(self, x):  # (B, T, d_model) -> (B, T, d_model)
        return self.rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """RMSNorm over each head's Dv values, times SiLU of an output gate (Gated DeltaNet's output norm)."""

    def __init__(self, dim, eps, ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.gated_rms_norm = eps, ops.gated_rms_norm

    def forward(self, x, gate):  # (B, T, H, Dv), (B, T, H, Dv)
        return self.gated_rms_norm(x, gate, self.weight, self.eps)  # the norm in float32 under autocast too


class FusedLinear(nn.Linear):
    """Linear maps of one input computed as one GEMM (one launch instead of one per map): the parts' weight
    rows stacked, the output split. parts: name -> output width, in row order; forward returns the parts."""

    def __init__(self, d_in, **parts):
        super().__init__(d_in, sum(parts.values()), bias=False)
        self.parts = parts

    def forward(self, x):  # (..., d_in) -> one (..., width) tensor per part
        return super().forward(x).split(list(self.parts.values()), dim=-1)


# Every module with an inference cache has setup_cache(batch_size, max_seq_len, device, dtype) and
# clear_cache(); Nirvana.setup_caches / clear_caches call them on every such module.


class CausalConv(nn.Module):
    """Depthwise causal conv over time, kernel conv_size, then SiLU; its cache is the last conv_size - 1
    inputs (the tail). A prefill runs the convolution on [tail; x] and keeps that window's last inputs;
    decoding one token runs the backend's step, which moves the tail along in place."""

    def __init__(self, channels, kernel_size, ops):
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(channels, 1, kernel_size).uniform_(-1, 1) / math.sqrt(kernel_size)
        )
        self.ops = ops
        self.register_buffer("tail", None, persistent=False)

    def setup_cache(self, batch_size, max_seq_len, device, dtype):
        self.tail = torch.zeros(
            batch_size, self.weight.shape[-1] - 1, self.weight.shape[0], device=device, dtype=dtype
        )

    def clear_cache(self):
        self.tail = None

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        if self.tail is None:
            return self.ops.causal_conv_silu(x, self.weight)  # zeros before the first step
        if x.shape[1] == 1:
            return self.ops.causal_conv_silu_step(x[:, 0], self.tail, self.weight)[:, None]
        kept = self.tail.shape[1]
        window = torch.cat([self.tail.to(x.dtype), x], dim=1)  # (B, K - 1 + T, C)
        self.tail.copy_(window[:, window.shape[1] - kept :])  # kept may be 0 (conv_size 1)
        return self.ops.causal_conv_silu(window, self.weight)[:, kept:]  # the tail's own outputs dropped


def rope_angles(positions, head_dim, base):
    """cos and sin (T, 1, head_dim // 2) of the rotary angles at absolute `positions` (T,): computed once for
    q and k."""
    half = head_dim // 2
    frequencies = base ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * frequencies  # (T, D/2)
    return angles.cos()[:, None, :], angles.sin()[:, None, :]


def apply_rope(x, cos, sin):
    """Rotary position embedding (Su et al.) on (B, T, H, D), the halves of each head rotated by rope_angles."""
    half = cos.shape[-1]
    x_float = x.float()
    x1, x2 = x_float[..., :half], x_float[..., half : 2 * half]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x_float[..., 2 * half :]], dim=-1)
    return rotated.to(x.dtype)


class Attention(nn.Module):
    """Causal softmax attention over a window of W keys (SWA) or all keys (window None), optional RoPE.

    Cache: a ring buffer of the last W keys/values (SWA) or max_seq_len of them (full attention), with the
    absolute position of each slot, so decoding one token costs O(W), not O(context). Its layout is
    (B, H, slots, D): a decode step reads each head's slots as one contiguous block.
    """

    def __init__(self, config, window, rope, ops):
        super().__init__()
        self.window, self.rope, self.rope_base, self.ops = window, rope, config.rope_base, ops
        self.H, self.Dk, self.Dv = config.n_heads, config.head_dim, config.value_head_dim
        for name in ("k_cache", "v_cache", "slot_positions"):
            self.register_buffer(name, None, persistent=False)

    def setup_cache(self, batch_size, max_seq_len, device, dtype):
        slots = max_seq_len if self.window is None else min(self.window, max_seq_len)
        self.k_cache = torch.zeros(batch_size, self.H, slots, self.Dk, device=device, dtype=dtype)
        self.v_cache = torch.zeros(batch_size, self.H, slots, self.Dv, device=device, dtype=dtype)
        self.slot_positions = torch.full((slots,), -1, device=device)  # -1: empty slot

    def clear_cache(self):
        self.k_cache = self.v_cache = self.slot_positions = None

    def forward(self, q, k, v, positions=None):  # q, k (B, T, H, Dk), v (B, T, H, Dv) -> (B, T, H, Dv)
        """positions (T,): the absolute positions of the tokens (on q's device), None: 0 .. T - 1 (no cache)."""
        if positions is None:
            positions = torch.arange(q.shape[1], device=q.device)
        if self.rope:
            cos, sin = rope_angles(positions, self.Dk, self.rope_base)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.k_cache is None:
            if self.window is None:
                # attention keeps v for backward beside the rotated q and k, and v is a view of the q/k/v
                # projection's output: kept as it is, it would keep that whole output alive
                if self.rope and torch.is_grad_enabled():
                    v = v.contiguous()
                return F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
                ).transpose(1, 2)
            return self.ops.sliding_window_attention(q, k, v, self.window)
        if q.shape[1] == 1:  # decoding: the backend's one-query step writes the ring and attends it
            o = self.ops.attention_step(
                q[:, 0],
                k[:, 0],
                v[:, 0],
                self.k_cache,
                self.v_cache,
                self.slot_positions,
                positions,
                self.window,
            )
            return o[:, None]
        # Writing first overwrites no key that a query of this call still sees when every key fits (full
        # attention); then the cache alone is attended.
        if self.window is None:
            self.write_cache(k, v, positions)
            return windowed_attention(
                q,
                self.k_cache.transpose(1, 2).to(q.dtype),
                self.v_cache.transpose(1, 2).to(v.dtype),
                positions,
                self.slot_positions,
                self.window,
            )
        keys = torch.cat([self.k_cache.transpose(1, 2).to(k.dtype), k], dim=1)  # (B, slots + T, H, Dk)
        values = torch.cat([self.v_cache.transpose(1, 2).to(v.dtype), v], dim=1)
        o = windowed_attention(
            q, keys, values, positions, torch.cat([self.slot_positions, positions]), self.window
        )
        self.write_cache(k, v, positions)
        return o

    def write_cache(self, k, v, positions):
        """Put the newest keys/values (at most one per slot) into the ring at slot = position mod slots."""
        kept = min(k.shape[1], self.slot_positions.shape[0])
        slots = positions[-kept:] % self.slot_positions.shape[0]
        self.k_cache[:, :, slots] = k[:, -kept:].transpose(1, 2).to(self.k_cache.dtype)
        self.v_cache[:, :, slots] = v[:, -kept:].transpose(1, 2).to(self.v_cache.dtype)
        self.slot_positions[slots] = positions[-kept:]


def qkv_widths(config):
    """The widths of q, k and v side by side in the fused projection's qkv part: H*Dk, H*Dk, H*Dv."""
    return [config.key_dim, config.key_dim, config.value_dim]


def gated_deltanet_projections(config):
    """What the Gated DeltaNet branch reads from x, name -> width: q, k, v side by side (one short
    convolution runs over all three) and Wa x, Wb x, Wg x (the projections of the decay, of beta and of the
    output gate, before their nonlinearities)."""
    return dict(qkv=sum(qkv_widths(config)), decay=config.n_heads, beta=config.n_heads, gate=config.value_dim)


class GatedDeltaNet(nn.Module):
    """The linear-attention branch (Gated DeltaNet), given the projections of x (gated_deltanet_projections).

    q1, k1 = L2norm(SiLU(conv(q))), L2norm(SiLU(conv(k))); v1 = SiLU(conv(v));
    g = -exp(A_log) softplus(Wa x + dt_bias), beta = sigmoid(Wb x); b = GatedRMSNorm(S^T q1, SiLU(Wg x)).
    The three depthwise convolutions are one over q, k and v side by side (one launch, one cache).
    Cache: the conv tail and the state S (B, H, Dk, Dv) in float32.
    """

    def __init__(self, config, ops):
        super().__init__()
        H, Dk, Dv = config.n_heads, config.head_dim, config.value_head_dim
        self.H, self.Dk, self.Dv, self.ops = H, Dk, Dv, ops
        self.qkv_widths = qkv_widths(config)
        self.conv = CausalConv(sum(self.qkv_widths), config.conv_size, ops)
        # Gated DeltaNet's initialisation: decay rate A ~ U(0, 16), time step dt ~ logU(1e-3, 1e-1)
        self.A_log = nn.Parameter(torch.empty(H).uniform_(0, 16).clamp_(min=1e-4).log())
        dt = torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)).exp()
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.norm = GatedRMSNorm(Dv, config.norm_eps, ops)
        self.register_buffer("state", None, persistent=False)

    def setup_cache(self, batch_size, max_seq_len, device, dtype):  # the state is float32 whatever dtype is
        self.state = torch.zeros(batch_size, self.H, self.Dk, self.Dv, device=device)

    def clear_cache(self):
        self.state = None

    def forward(self, qkv, decay, beta, gate):
        """q, k, v side by side (B, T, 2*H*Dk + H*Dv); Wa x, Wb x (B, T, H); Wg x (B, T, H*Dv)
        -> b (B, T, H*Dv)."""
        B, T, _ = qkv.shape
        H, Dk, Dv = self.H, self.Dk, self.Dv
        if torch.is_grad_enabled():  # the gates' inputs are copied out of in_proj's output (see NirvanaMixer)
            decay, beta = decay.contiguous(), beta.contiguous()
        q, k, v1 = self.conv(qkv).split(self.qkv_widths, dim=-1)  # SiLU(conv(q)), ...
        q, k, v1 = q.view(B, T, H, Dk), k.view(B, T, H, Dk), v1.view(B, T, H, Dv)
        if self.state is not None and T == 1:  # decoding: the backend's one-token step updates the state
            o = self.ops.gated_delta_rule_step(
                q[:, 0], k[:, 0], v1[:, 0], decay[:, 0], beta[:, 0], self.A_log, self.dt_bias, self.state
            )[:, None]
        else:
            q1, k1 = self.ops.l2_normalize(q, v1.dtype), self.ops.l2_normalize(k, v1.dtype)  # (B, T, H, Dk)
            g, beta = delta_rule_gates(decay, beta, self.A_log, self.dt_bias)  # (B, T, H) log alpha, beta
            o, state = self.ops.gated_delta_rule(
                q1, k1, v1, g, beta, initial_state=self.state, output_final_state=self.state is not None
            )
            if self.state is not None:
                self.state.copy_(state)
        gate = gate.view(B, T, self.H, self.Dv)
        return self.norm(o.to(gate.dtype), gate).view(B, T, self.H * self.Dv)


class TriggerBank(nn.Module):
    """W^bank: K blocks, each a (d_t x d_t) matrix and a d_t bias, shared by all layers and tokens, eq.(6)."""

    def __init__(self, config):
        super().__init__()
        K, d_t = config.bank_size, config.trigger_dim
        # with p = all-ones, W(p) = sum_k W_k has entries of variance 1/d_t: f starts near a random linear map
        self.weight = nn.Parameter(torch.randn(K, d_t, d_t) / math.sqrt(K * d_t))
        self.bias = nn.Parameter(torch.randn(K, d_t) / math.sqrt(K * d_t))


class Trigger(nn.Module):
    """Per layer: one CL-OGD step (Sec. 2.2) on q~, k~, v~ = Linear(d_model -> d_t) of x (computed by the
    mixer's fused projection), with the step size of eq.(5) from theta_l (d_model,)."""

    def __init__(self, config, ops):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(config.d_model))
        self.eta_ref, self.detach_inner_grad, self.ops = config.eta_ref, config.detach_inner_grad, ops

    def forward(self, x, q, k, v, p_prev, bank):
        """x (B, T, d_model); q~, k~, v~ (B, T, d_t); p_prev (B, T, K) -> c (B, T, d_t), p (B, T, K)."""
        eta = self.eta_ref * torch.sigmoid((x @ self.theta.to(x.dtype)).float())  # (B, T) eq.(5)
        # the bank products run at q~'s precision (autocast's under autocast, as any matmul); p stays float32
        return self.ops.trigger_step(
            q, k, v, p_prev.float(), eta, bank.weight, bank.bias, self.detach_inner_grad
        )


class Updater(nn.Module):
    """Conditional interpolation eq.(8): o = t a + (1 - t) b + zeta([a; b; c]), t = sigmoid(u . c).

    zeta: Linear -> Swish -> Linear with hidden size len(a)/8. Without the Trigger (nirvana-notrigger), the
    condition is the block input x: t = sigmoid(u . x), and zeta sees [a; b].
    """

    def __init__(self, config):
        super().__init__()
        D = config.value_dim
        self.condition_in_zeta = config.trigger  # c enters zeta, x does not
        condition_dim = config.trigger_dim if config.trigger else config.d_model
        self.u = nn.Parameter(torch.zeros(condition_dim))
        zeta_in = 2 * D + (condition_dim if self.condition_in_zeta else 0)
        self.zeta = nn.Sequential(
            nn.Linear(zeta_in, D // 8, bias=False), nn.SiLU(), nn.Linear(D // 8, D, bias=False)
        )

    def forward(self, a, b, condition):  # a, b (B, T, H*Dv); condition: c (B, T, d_t) or x (B, T, d_model)
        t = torch.sigmoid((condition @ self.u.to(condition.dtype)).float()).to(a.dtype)  # (B, T)
        zeta_in = torch.cat([a, b, condition.to(a.dtype)] if self.condition_in_zeta else [a, b], dim=-1)
        return torch.lerp(b, a, t[..., None]) + self.zeta(zeta_in), t  # t a + (1 - t) b + zeta


class GatedDeltaNetMixer(nn.Module):
    """Prelude layers and the gated-deltanet baseline: the linear-attention branch alone."""

    def __init__(self, config, ops):
        super().__init__()
        self.in_proj = FusedLinear(config.d_model, **gated_deltanet_projections(config))
        self.gated_deltanet = GatedDeltaNet(config, ops)
        self.o_proj = nn.Linear(config.value_dim, config.d_model, bias=False)

    def forward(self, x):  # (B, T, d_model) -> (B, T, d_model)
        return self.o_proj(self.gated_deltanet(*self.in_proj(x)))


class AttentionMixer(nn.Module):
    """The SWA layers of the hybrid baseline (window W) and the transformer's full attention (window None)."""

    def __init__(self, config, window, ops):
        super().__init__()
        self.H, self.Dk, self.Dv = config.n_heads, config.head_dim, config.value_head_dim
        self.qkv_proj = FusedLinear(config.d_model, q=config.key_dim, k=config.key_dim, v=config.value_dim)
        self.attention = Attention(config, window, config.swa_rope, ops)
        self.o_proj = nn.Linear(config.value_dim, config.d_model, bias=False)

    def forward(self, x, positions):  # (B, T, d_model) -> (B, T, d_model)
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x)
        q, k, v = q.view(B, T, self.H, self.Dk), k.view(B, T, self.H, self.Dk), v.view(B, T, self.H, self.Dv)
        return self.o_proj(self.attention(q, k, v, positions).reshape(B, T, -1))


class NirvanaMixer(nn.Module):
    """A post-prelude Nirvana layer: both memory branches on shared q, k, v, the Trigger, the Updater.

    Every projection of x is one GEMM (in_proj): the Gated DeltaNet's (q, k, v shared with the SWA branch,
    and its gates), the down projections D x of the SWA branch's low-rank deltas U D x (Sec. 2.1, rank r),
    and the Trigger's q~, k~, v~ (Sec. 2.2).
    """

    def __init__(self, config, ops):
        super().__init__()
        self.H, self.Dk, self.Dv = config.n_heads, config.head_dim, config.value_head_dim
        r, d_t = config.lowrank, config.trigger_dim
        trigger_parts = dict(trigger_q=d_t, trigger_k=d_t, trigger_v=d_t) if config.trigger else {}
        self.in_proj = FusedLinear(
            config.d_model,
            **gated_deltanet_projections(config),
            q_delta=r,
            k_delta=r,
            v_delta=r,
            **trigger_parts,
        )
        self.gated_deltanet = GatedDeltaNet(config, ops)
        self.q_delta_up = nn.Linear(r, config.key_dim, bias=False)  # U of the low-rank deltas
        self.k_delta_up = nn.Linear(r, config.key_dim, bias=False)
        self.v_delta_up = nn.Linear(r, config.value_dim, bias=False)
        self.attention = Attention(config, config.window, config.swa_rope, ops)
        self.trigger = Trigger(config, ops) if config.trigger else None
        self.updater = Updater(config)
        self.o_proj = nn.Linear(config.value_dim, config.d_model, bias=False)

    def forward(self, x, positions, p, bank):
        """x (B, T, d_model), p (B, T, K) from the layer below -> out (B, T, d_model), p, t (B, T)."""
        B, T, _ = x.shape
        qkv, decay, beta, gate, q_delta, k_delta, v_delta, *trigger_qkv = self.in_proj(x)
        # A tensor kept for backward that is a view of in_proj's output keeps that whole output alive (8 KiB
        # per token per layer at 350m). When training, the narrow parts whose consumers keep them are copied
        # out of it first: the deltas' rank-r inputs (a Linear keeps its input) and, in GatedDeltaNet, the
        # gates' inputs. Done before any kernel call: under torch.compile each Triton kernel splits the graph,
        # and a later graph would take the views as inputs and keep them.
        if torch.is_grad_enabled():
            q_delta, k_delta, v_delta = (part.contiguous() for part in (q_delta, k_delta, v_delta))
        b = self.gated_deltanet(qkv, decay, beta, gate)  # (B, T, H*Dv) linear attention
        q, k, v = qkv.split(self.gated_deltanet.qkv_widths, dim=-1)
        q2 = (q + self.q_delta_up(q_delta)).view(B, T, self.H, self.Dk)  # Sec. 2.1 low-rank deltas
        k2 = (k + self.k_delta_up(k_delta)).view(B, T, self.H, self.Dk)
        v2 = (v + self.v_delta_up(v_delta)).view(B, T, self.H, self.Dv)
        a = self.attention(q2, k2, v2, positions).reshape(B, T, -1)  # (B, T, H*Dv) SWA
        if self.trigger is None:
            o, t = self.updater(a, b, x)
        else:
            c, p = self.trigger(x, *trigger_qkv, p, bank)  # (B, T, d_t), (B, T, K)
            o, t = self.updater(a, b, c)  # eq.(8)
        return self.o_proj(o), p, t


class SwiGLU(nn.Module):
    """down(SiLU(gate x) * up x); the triton backend keeps only [gate x; up x] for backward.

    gate and up are one GEMM (gate_up: the gate's rows, then up's), and the output projection takes its
    (B, T, 2 ffn_hidden) result whole: the triton backend reads gate and up in place and writes their
    gradients into one tensor, where splitting them would copy each out and concatenate the gradients."""

    def __init__(self, config, ops):
        super().__init__()
        self.gate_up = nn.Linear(config.d_model, 2 * config.ffn_hidden, bias=False)
        self.down = nn.Linear(config.ffn_hidden, config.d_model, bias=False)
        self.swiglu_linear = ops.swiglu_linear

    def forward(self, x):  # (B, T, d_model) -> (B, T, d_model)
        return self.swiglu_linear(self.gate_up(x), self.down.weight)  # gate_up (B, T, 2 ffn_hidden)


class Block(nn.Module):
    """h = h + Wo mixer(RMSNorm(h)); h = h + SwiGLU(RMSNorm(h))."""

    def __init__(self, config, layer, ops):
        super().__init__()
        kind = config.layer_kind(layer)
        self.kind = kind
        self.mixer_norm = RMSNorm(config.d_model, config.norm_eps, ops)
        if kind == "gdn":
            self.mixer = GatedDeltaNetMixer(config, ops)
        elif kind == "nirvana":
            self.mixer = NirvanaMixer(config, ops)
        else:
            self.mixer = AttentionMixer(config, config.window if kind == "swa" else None, ops)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps, ops)
        self.ffn = SwiGLU(config, ops)

    def forward(self, h, positions=None, p=None, bank=None):
        """h (B, T, d_model) -> h, and the Trigger's p (B, T, K) and the gate t (B, T) of a Nirvana layer.

        Each mixer gets what it reads: the Gated DeltaNet only x; attention also the positions; a Nirvana
        layer also p from the layer below and the shared bank (other layers pass p on and give t = None).
        """
        x = self.mixer_norm(h)  # in the autocast dtype under autocast
        t = None
        if self.kind == "nirvana":
            out, p, t = self.mixer(x, positions, p, bank)
        elif self.kind == "gdn":
            out = self.mixer(x)
        else:
            out = self.mixer(x, positions)
        h = h + out
        return h + self.ffn(self.ffn_norm(h)), p, t


# Checkpoints written before the projections of one input became one GEMM (FusedLinear), and before the short
# convolutions of q, k and v became one, hold each part under its own name. Per block, a fused weight <- the
# old weights of its parts, in row order; parts the checkpoint lacks (the Trigger's, in a variant without it)
# are not in the fused weight either.
UNFUSED_NAMES = {
    "mixer.qkv_proj.weight": ["mixer.q_proj", "mixer.k_proj", "mixer.v_proj"],
    "mixer.in_proj.weight": [
        "mixer.q_proj",
        "mixer.k_proj",
        "mixer.v_proj",
        "mixer.gated_deltanet.a_proj",
        "mixer.gated_deltanet.b_proj",
        "mixer.gated_deltanet.g_proj",
        "mixer.q_delta.down",
        "mixer.k_delta.down",
        "mixer.v_delta.down",
        "mixer.trigger.q_proj",
        "mixer.trigger.k_proj",
        "mixer.trigger.v_proj",
    ],
    "mixer.q_delta_up.weight": ["mixer.q_delta.up"],
    "mixer.k_delta_up.weight": ["mixer.k_delta.up"],
    "mixer.v_delta_up.weight": ["mixer.v_delta.up"],
    "ffn.gate_up.weight": ["ffn.gate", "ffn.up"],
    "mixer.gated_deltanet.conv.weight": [
        "mixer.gated_deltanet.q_conv",
        "mixer.gated_deltanet.k_conv",
        "mixer.gated_deltanet.v_conv",
    ],
}


def unfused_parts(model, keys, prefix=""):
    """For a checkpoint written before the fusion (keys: the names of its entries, prefix included):
    fused parameter name -> the names of its parts there, in row order. Empty for a newer checkpoint."""
    keys, parts = set(keys), {}
    for name, _ in model.named_parameters():
        _, layer, within_block = name.split(".", 2) if name.startswith("blocks.") else ("", "", "")
        old = [f"{prefix}blocks.{layer}.{part}.weight" for part in UNFUSED_NAMES.get(within_block, [])]
        if old := [key for key in old if key in keys]:
            parts[prefix + name] = old
    return parts


def load_unfused_checkpoint(model, state_dict, prefix, *args):
    """load_state_dict pre-hook of Nirvana: a checkpoint of separate projections gets its fused weights
    (replacing any fused entry: torch.distributed's set_model_state_dict fills in the model's own)."""
    for fused, old in unfused_parts(model, state_dict, prefix).items():
        state_dict[fused] = torch.cat([state_dict.pop(key) for key in old])


def fuse_optimizer_state(model, optimizer_state):
    """A full optimizer state dict keyed by parameter name (as torch.distributed.checkpoint's
    get_optimizer_state_dict gives it) from before the fusion: each part's state (AdamW's moments)
    concatenated like the weights, the parts' names in param_groups replaced by the fused name."""
    state = optimizer_state["state"]
    parts = unfused_parts(model, state)
    for fused, old in parts.items():
        entries = [state.pop(key) for key in old]
        state[fused] = {
            name: torch.cat([entry[name] for entry in entries])
            if torch.is_tensor(value) and value.dim()
            else value  # "step" is shared
            for name, value in entries[0].items()
        }
    renamed = {old[0]: fused for fused, old in parts.items()}
    dropped = {key for old in parts.values() for key in old[1:]}
    for group in optimizer_state["param_groups"]:
        group["params"] = [renamed.get(name, name) for name in group["params"] if name not in dropped]
    return optimizer_state


class Nirvana(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        ops = load_backend(config.backend)
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.trigger_bank = TriggerBank(config) if config.trigger else None
        self.blocks = nn.ModuleList(Block(config, layer, ops) for layer in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps, ops)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.linear_cross_entropy = ops.linear_cross_entropy  # lm_head + loss in one
        self.max_seq_len = None  # the caches' size, once set up
        self.register_load_state_dict_pre_hook(load_unfused_checkpoint)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                # GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 n_layers)
                residual = name.endswith(("o_proj", "ffn.down"))
                std = config.init_std / math.sqrt(2 * config.n_layers) if residual else config.init_std
                nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        return n - self.token_embedding.weight.numel() if non_embedding else n

    def embed(self, idx):  # (B, T) token ids -> (B, T, d_model)
        if idx.dim() != 2:
            raise ValueError(f"token ids must have shape (B, T), got {tuple(idx.shape)}")
        if idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"token ids must be integers, got {idx.dtype}")
        # a host check cannot run in a graph
        capturing = idx.is_cuda and torch.cuda.is_current_stream_capturing()
        if idx.numel() and not capturing and bool(((idx < 0) | (idx >= self.config.vocab_size)).any()):
            raise ValueError(
                f"token id out of range: ids must lie in [0, {self.config.vocab_size}), "
                f"got min {int(idx.min())} and max {int(idx.max())}"
            )
        return self.token_embedding(idx)

    def backbone(self, h, input_pos=None, trace=None):
        """All blocks and the final norm on embeddings h (B, T, d_model).

        input_pos: with caches set up, the position of h[:, 0] in the sequence (0 for the prompt), an int or
        a 0-dim device tensor that the caller advances (a CUDA graph of a one-token step reads it there);
        without caches, None. An int is checked against the caches' size; a device tensor is not (reading it
        would wait for the device).
        trace: a dict to fill with per-Nirvana-layer lists "gate" (B, T) (t of eq.8) and "p" (B, T, K) (eq.5).
        """
        if h.dim() != 3 or h.shape[-1] != self.config.d_model:
            raise ValueError(
                f"embeddings must have shape (B, T, {self.config.d_model}), got {tuple(h.shape)}"
            )
        self.check_input_pos(input_pos, h.shape[1])
        positions = None  # without caches every attention layer counts from 0
        if input_pos is not None:  # (T,) the tokens' absolute positions, formed once for all attention layers
            positions = input_pos + torch.arange(h.shape[1], device=h.device)
        p = None
        if self.config.trigger:
            # p^0 = all-ones
            p = h.new_ones(h.shape[0], h.shape[1], self.config.bank_size, dtype=torch.float32)
        for block in self.blocks:
            h, p, t = block(h, positions, p, self.trigger_bank)
            if trace is not None and t is not None:
                trace.setdefault("gate", []).append(t.detach())
                if self.config.trigger:
                    trace.setdefault("p", []).append(p.detach())
        return self.final_norm(h)

    def check_input_pos(self, input_pos, n_tokens):
        if self.max_seq_len is None:
            if input_pos is not None:
                raise ValueError("input_pos is for decoding through the caches: call setup_caches first")
            return
        if input_pos is None:
            raise ValueError(
                "the caches are set up: pass input_pos, the position of this call's first token "
                "(0 for the prompt)"
            )
        # no device sync, and no host read of a traced tensor under torch.compile
        if isinstance(input_pos, int) or (
            input_pos.device.type == "cpu" and not torch.compiler.is_compiling()
        ):
            if int(input_pos) < 0:
                raise ValueError(f"input_pos must be >= 0, got {int(input_pos)}")
            if int(input_pos) + n_tokens > self.max_seq_len:
                raise ValueError(
                    f"the caches hold {self.max_seq_len} tokens; {int(input_pos)} + {n_tokens} "
                    "do not fit: call setup_caches with a larger max_seq_len"
                )

    def forward(self, idx, targets=None, return_trace=False, *, input_pos=None):
        """idx (B, T) -> (logits (B, T, vocab), None); given targets (B, T) (-1 = ignore) -> (None, the mean
        cross-entropy): training needs no logits, and the triton backend's loss never forms them all at once.

        input_pos: the position of idx[:, 0] when decoding through the caches (see backbone).
        """
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(
                f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}"
            )
        trace = {} if return_trace else None
        h = self.backbone(self.embed(idx), input_pos, trace)  # (B, T, d_model)
        logits = loss = None
        if targets is None:
            logits = self.lm_head(h)  # (B, T, vocab)
        else:
            loss = self.linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten())
        return (logits, loss, trace) if return_trace else (logits, loss)

    # Inference: caches are plain buffers on the modules; decoding runs the same forward as training.

    def setup_caches(self, batch_size, max_seq_len):
        """Allocate every layer's cache: delta-rule state, conv tails, SWA ring buffer, full-attention KV."""
        weight = self.lm_head.weight
        self.max_seq_len = max_seq_len
        for module in self.modules():
            if hasattr(module, "setup_cache"):
                module.setup_cache(batch_size, max_seq_len, weight.device, weight.dtype)

    def clear_caches(self):
        self.max_seq_len = None
        for module in self.modules():
            if hasattr(module, "clear_cache"):
                module.clear_cache()

    @torch.no_grad()
    def generate(
        self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None
    ) -> Tensor:
        """Continue idx (B, T) by max_new_tokens sampled tokens: prefill, then O(1)-per-token decoding.

        temperature 0 picks the most likely token; else softmax(logits / temperature) over the top_k most
        likely (all when top_k is None).
        """
        prompt_len = idx.shape[1]
        self.setup_caches(idx.shape[0], prompt_len + max_new_tokens)
        try:
            logits, _ = self(idx, input_pos=0)
            tokens = [idx]
            for step in range(max_new_tokens):
                logits = logits[:, -1]  # (B, vocab)
                if temperature == 0:
                    next_token = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits.float() / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, -math.inf)
                    next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
                tokens.append(next_token)
                if step + 1 < max_new_tokens:
                    logits, _ = self(next_token, input_pos=prompt_len + step)
        finally:
            self.clear_caches()
        return torch.cat(tokens, dim=1)

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu", **overrides):
        """A model on the device map_location names (its tensors are read straight there), from a checkpoint
        holding "config" (a dict of NirvanaConfig fields) and "model" (state dict)."""
        try:
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint not found: {path}") from None
        except Exception as error:
            raise ValueError(f"cannot read checkpoint {path}: {error}") from error
        if not isinstance(checkpoint, dict) or not {"config", "model"} <= set(checkpoint):
            raise ValueError(f"checkpoint {path} lacks the 'config' and 'model' entries")
        model = cls(NirvanaConfig.from_dict({**checkpoint["config"], **overrides}))
        model.load_state_dict(checkpoint["model"])
        return model.to(map_location)  # built on the CPU; load_state_dict copied into those parameters
