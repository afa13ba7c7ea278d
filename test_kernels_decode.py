"""Property tests of the one-token decode kernels (kernels/decode.py, and kernels/causal_conv.py's step) against
their plain twins in nirvana.py: gated_delta_rule_step (L2 norm, gates, one step of the recurrence, the state
updated in place), causal_conv_silu_step (convolve, SiLU, move the tail along) and attention_step (write the
ring slot, attend the window), and of a tiny model decoding with backend="triton".

    python -m pytest -q test_kernels_decode.py                              # CPU: Triton interpreter
    NIRVANA_KERNEL_TESTS=cuda python -m pytest -q test_kernels_decode.py    # GPU: more examples

The reference is the twin in float64 on the same (dtype-rounded) inputs; errors are ||x - ref|| / ||ref||.
Bounds: float32 1e-5 (float32 arithmetic, only the order of the sums differs; worst seen on the CPU 2.4e-7);
bfloat16 1e-2 on a GPU, 3e-2 on the CPU: the kernels round o to bf16, and the delta-rule step its normalised
q and k as the parallel path does (the float64 twin keeps them exact), and Triton's interpreter rounds a cast
to bf16 toward zero (half of the values differ from torch's round-to-nearest), doubling that error. Worst seen
on the CPU in 40 random cases: delta-rule step o 1.4e-2 after three steps (the float32 twin run on the bf16
inputs, rounding to nearest: 3e-3), state 3.9e-3, attention 5.0e-3. The caches the kernels write must equal
the twin's.
"""

import os

ON_CUDA = os.environ.get("NIRVANA_KERNEL_TESTS", "cpu") == "cuda"
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nirvana
from kernels import decode
from kernels.causal_conv import causal_conv_silu_step as causal_conv_step

DEVICE = "cuda" if ON_CUDA else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2 if ON_CUDA else 3e-2}
EXAMPLES = 30 if ON_CUDA else 12
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not ON_CUDA)
HEAD_DIMS = st.sampled_from([16, 24, 64, 100]) if ON_CUDA else st.sampled_from([16, 24, 40])


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


# ------------------------------------------------------------------------------------------------------
# The delta rule's one-token step


@PROPERTY
@given(
    B=st.integers(1, 3),
    H=st.integers(1, 3),
    Dk=HEAD_DIMS,
    Dv=HEAD_DIMS,
    steps=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_delta_rule_step_matches_the_twin(B, H, Dk, Dv, steps, dtype, seed):
    """`steps` tokens one after the other from a random float32 state; q, k and v are strided views of one
    convolution output row, and decay and beta strided columns of one projection, as the model splits them
    (the kernel reads them in place)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator)).to(DEVICE)

    A_log, dt_bias = (16 * torch.rand(H, generator=generator)).log().to(DEVICE), randn(H) - 4
    state = randn(B, H, Dk, Dv, scale=0.3)
    reference_state = state.double()
    for _ in range(steps):
        row = randn(B, 1, 2 * H * Dk + H * Dv + 5).to(dtype)  # [q, k, v, 5 more columns]
        q, k, v = (part.view(B, H, -1) for part in row[:, 0, :-5].split([H * Dk, H * Dk, H * Dv], dim=-1))
        projection = randn(B, 2 * H + 3).to(dtype)  # [decay, beta, other parts]
        decay, beta = projection[:, :H], projection[:, H : 2 * H]
        o = decode.gated_delta_rule_step(q, k, v, decay, beta, A_log, dt_bias, state)
        expected = nirvana.gated_delta_rule_step(
            *(x.double() for x in (q, k, v, decay, beta, A_log, dt_bias)), reference_state
        )
        assert o.dtype == dtype and o.shape == (B, H, Dv) and state.dtype == torch.float32
        assert relative_error(o, expected) <= TOLERANCE[dtype]
        assert relative_error(state, reference_state) <= TOLERANCE[dtype]


def test_delta_rule_step_rejects_bad_inputs():
    q, v = torch.randn(2, 3, 16, device=DEVICE), torch.randn(2, 3, 16, device=DEVICE)
    gates, A_log = torch.randn(2, 3, device=DEVICE), torch.zeros(3, device=DEVICE)
    for state in (
        torch.zeros(2, 3, 16, 8, device=DEVICE),  # Dv of v is 16
        torch.zeros(2, 3, 16, 16, device=DEVICE, dtype=torch.bfloat16),  # the state is float32
    ):
        with pytest.raises(ValueError, match="state must be"):
            decode.gated_delta_rule_step(q, q, v, gates, gates, A_log, A_log, state)
    with pytest.raises(ValueError, match="expected q, k"):
        decode.gated_delta_rule_step(
            q, q[..., :8], v, gates, gates, A_log, A_log, torch.zeros(2, 3, 16, 16, device=DEVICE)
        )
    with pytest.raises(ValueError, match="no gradients"):
        decode.gated_delta_rule_step(
            q, q, v, gates, gates, A_log.requires_grad_(), A_log, torch.zeros(2, 3, 16, 16, device=DEVICE)
        )


def test_attention_step_rejects_bad_inputs():
    q = torch.randn(1, 2, 16, device=DEVICE)
    k_cache = torch.zeros(1, 2, 4, 16, device=DEVICE)  # (B, H, slots, D)
    slot_positions = torch.full((4,), -1, device=DEVICE)
    with pytest.raises(ValueError, match="int64"):
        decode.attention_step(
            q, q, q, k_cache, k_cache, slot_positions.int(), torch.tensor([0], device=DEVICE)
        )
    with pytest.raises(ValueError, match="expected q, k"):
        decode.attention_step(q, q, q, k_cache[:, :, :1], k_cache, slot_positions, torch.tensor([0]))
    with pytest.raises(ValueError, match="window"):
        decode.attention_step(q, q, q, k_cache, k_cache, slot_positions, torch.tensor([0]), window=0)


# ------------------------------------------------------------------------------------------------------
# The short convolution's one-token step


@PROPERTY
@given(
    B=st.integers(1, 3),
    C=st.integers(1, 70),
    K=st.integers(1, 4),
    steps=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    float32_tail=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_causal_conv_step_matches_the_twin(B, C, K, steps, dtype, float32_tail, seed):
    """`steps` tokens from a random tail; x is a strided slice of a wider row (as the model's q, k, v of its
    fused projection), the tail may be float32 under bf16 inputs (autocast). The tail the kernel moves along
    must equal the twin's."""
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(C, 1, K, generator=generator) / K**0.5).to(DEVICE)
    tail = torch.randn(B, K - 1, C, generator=generator).to(DEVICE, torch.float32 if float32_tail else dtype)
    reference_tail = tail.double()
    for _ in range(steps):
        x = torch.randn(B, C + 7, generator=generator).to(DEVICE, dtype)[:, 3 : 3 + C]
        y = causal_conv_step(x, tail, weight)
        expected = nirvana.causal_conv_silu_step(x.double(), reference_tail, weight.double())
        assert y.dtype == dtype and y.shape == (B, C)
        assert relative_error(y, expected) <= TOLERANCE[dtype]
        assert torch.equal(tail.double(), reference_tail)
    with pytest.raises(ValueError, match=r"tail \(B, K - 1, C\)"):
        causal_conv_step(x, tail[:, :0] if K > 1 else tail.new_zeros(B, 1, C), weight)


# ------------------------------------------------------------------------------------------------------
# Attention over the ring buffer


@PROPERTY
@given(
    B=st.integers(1, 3),
    H=st.integers(1, 3),
    Dk=HEAD_DIMS,
    Dv=HEAD_DIMS,
    window=st.one_of(st.none(), st.integers(1, 40)),
    max_seq_len=st.integers(1, 60),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    float32_cache=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_attention_step_matches_the_twin(B, H, Dk, Dv, window, max_seq_len, dtype, float32_cache, seed):
    """From an empty ring (slots = min(window, max_seq_len), as Attention.setup_cache sizes it), one token at
    each position 0 .. max_seq_len - 1: before the ring is full, when it wraps, and after (window None: full
    attention, every position in its own slot). The cache may be float32 under bf16 queries (autocast)."""
    generator = torch.Generator().manual_seed(seed)
    slots = max_seq_len if window is None else min(window, max_seq_len)
    cache_dtype = torch.float32 if float32_cache else dtype
    k_cache = torch.zeros(B, H, slots, Dk, device=DEVICE, dtype=cache_dtype)
    v_cache = torch.zeros(B, H, slots, Dv, device=DEVICE, dtype=cache_dtype)
    slot_positions = torch.full((slots,), -1, device=DEVICE)
    reference = [k_cache.double(), v_cache.double(), slot_positions.clone()]
    for position in range(max_seq_len):
        q, k = (torch.randn(B, H, Dk, generator=generator).to(DEVICE, dtype) for _ in range(2))
        v = torch.randn(B, H, Dv, generator=generator).to(DEVICE, dtype)
        at = torch.tensor([position], device=DEVICE)
        o = decode.attention_step(q, k, v, k_cache, v_cache, slot_positions, at, window)
        expected = nirvana.attention_step(q.double(), k.double(), v.double(), *reference, at, window)
        assert o.dtype == dtype and o.shape == (B, H, Dv)
        assert relative_error(o, expected) <= TOLERANCE[dtype], f"position {position}"
        assert torch.equal(slot_positions, reference[2])
        assert torch.equal(k_cache.double(), reference[0]) and torch.equal(v_cache.double(), reference[1])


def test_attention_step_attends_exactly_the_window():
    """Values one-hot by position: the output's weights sit on positions (p - W, p] only."""
    B, H, D, W, slots = 1, 1, 16, 5, 5
    k_cache = torch.zeros(B, H, slots, D, device=DEVICE)
    v_cache = torch.zeros(B, H, slots, D, device=DEVICE)
    slot_positions = torch.full((slots,), -1, device=DEVICE)
    q = torch.zeros(B, H, D, device=DEVICE)  # equal scores: a mean over the visible positions
    for position in range(12):
        v = torch.nn.functional.one_hot(torch.tensor(position), D).float().to(DEVICE).expand(B, H, D)
        at = torch.tensor([position], device=DEVICE)
        o = decode.attention_step(q, q, v, k_cache, v_cache, slot_positions, at, W)
        expected = torch.zeros(D, device=DEVICE)
        expected[max(0, position - W + 1) : position + 1] = 1 / min(W, position + 1)
        torch.testing.assert_close(o[0, 0], expected)


def test_attention_step_ignores_what_empty_and_stale_slots_hold():
    """The kernel loads every slot of its range before it knows which are visible: NaN in the empty slots (and
    in a slot that falls out of the window) must not reach o. Compared with the twin on zero-filled caches."""
    B, H, D, W, slots = 2, 2, 16, 3, 4  # slots > W: one filled slot is always outside the window
    generator = torch.Generator().manual_seed(0)
    k_cache = torch.full((B, H, slots, D), float("nan"), device=DEVICE)
    v_cache = torch.full((B, H, slots, D), float("nan"), device=DEVICE)
    slot_positions = torch.full((slots,), -1, device=DEVICE)
    reference = [torch.zeros(B, H, slots, D, dtype=torch.float64, device=DEVICE) for _ in range(2)]
    reference.append(slot_positions.clone())
    for position in range(7):
        q, k, v = (torch.randn(B, H, D, generator=generator).to(DEVICE) for _ in range(3))
        at = torch.tensor([position], device=DEVICE)
        if position == 5:  # the oldest filled slot, outside the window, gets NaN again
            stale = (position - W) % slots
            k_cache[:, :, stale] = v_cache[:, :, stale] = float("nan")
        o = decode.attention_step(q, k, v, k_cache, v_cache, slot_positions, at, W)
        expected = nirvana.attention_step(q.double(), k.double(), v.double(), *reference, at, W)
        assert torch.isfinite(o).all(), f"position {position}"
        assert relative_error(o, expected) <= TOLERANCE[torch.float32], f"position {position}"


# ------------------------------------------------------------------------------------------------------
# The model: decoding with backend="triton" (both one-token kernels, the Trigger's decode kernels) equals
# the torch backend's decoding


@pytest.mark.parametrize("variant", ["nirvana", "transformer"])  # SWA and Trigger; full attention with RoPE
def test_tiny_model_decodes_like_the_torch_backend(variant):
    idx = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    logits = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        config = nirvana.NirvanaConfig.from_preset(f"{variant}-tiny", window=8, backend=backend)
        model = nirvana.Nirvana(config).to(DEVICE).eval()
        model.setup_caches(batch_size=2, max_seq_len=20)
        with torch.no_grad():
            steps = [model(idx[:, :5], input_pos=0)[0]]
            steps += [model(idx[:, i : i + 1], input_pos=i)[0] for i in range(5, 20)]  # past the window
        logits[backend] = torch.cat(steps, dim=1)
    torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-4, atol=1e-4)


def test_compiled_decode_step_matches_the_eager_one():
    """eval.py's torch.compile'd decode step (the fused norms and SwiGLU traced as their plain twins, which
    inductor fuses with their neighbours; the decode kernels between its graphs) gives the eager step's logits,
    float32, nirvana-tiny with a window of 8 (a 64-token prompt, then 3 warm-up and 6 compared steps)."""
    import eval as evaluation

    torch.manual_seed(0)
    config = nirvana.NirvanaConfig.from_preset("nirvana-tiny", window=8, backend="triton")
    model = nirvana.Nirvana(config).to(DEVICE).eval()
    eager = evaluation.decode_logits(model, 2, steps=6, cache_len=80)
    compiled = evaluation.decode_logits(model, 2, steps=6, compile=True, cache_len=80)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("variant", ["transformer", "nirvana"])  # full attention over 4,227 slots; SWA 2,048
def test_torch_backend_decode_step_replays_from_a_cuda_graph(variant):
    """The torch backend's decode step (the twins, attention_step's SDPA among them), captured in a CUDA graph
    and replayed, gives what it gives run directly (eval.graph_is_safe: 1e-3 relative), in bf16 with the cache
    sizes of bench's decode section (prompt 4096, 128 steps): else bench times the twins without a graph."""
    import eval as evaluation

    torch.manual_seed(0)
    config = nirvana.NirvanaConfig.from_preset(f"{variant}-tiny", window=2048, backend="torch")
    model = nirvana.Nirvana(config).to("cuda", torch.bfloat16).eval()
    assert evaluation.graph_is_safe(model, 4, cache_len=evaluation.check_cache_len(4096, 128))
