"""Property tests of the fused paths against their plain-PyTorch twins in nirvana.py:
kernels.linear_cross_entropy.chunked_linear_cross_entropy vs nirvana.linear_cross_entropy (loss, dh, dW);
kernels.trigger_decode.trigger_step_decode (Triton, decoding) vs nirvana.trigger_step;
kernels.rms_norm.gated_rms_norm (Triton) vs nirvana.gated_rms_norm (output, dx, dgate, dw);
kernels.rms_norm.rms_norm (Triton) vs nirvana.rms_norm (output, dx, dw);
kernels.swiglu.swiglu_linear (Triton elementwise, product formed again in backward) vs nirvana.swiglu_linear;
what the fused norm and SwiGLU save for backward against their twins;
kernels.causal_conv.causal_conv_silu (Triton) vs nirvana.causal_conv_silu (output, dx, dw), and what it keeps;
kernels.l2_norm.l2_normalize (Triton) vs nirvana.l2_normalize (output, dx), and what it keeps.

    python -m pytest -q test_kernels_fused.py                              # CPU
    NIRVANA_KERNEL_TESTS=cuda python -m pytest -q test_kernels_fused.py    # GPU: larger shapes

Errors are ||out - ref|| / ||ref|| over whole tensors; float32 runs both in float32 (only the summation order
differs), bfloat16 under autocast (both form the logits and their gradient in bf16; dW sums its chunks in
float32 here, in one bf16 product there).
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
from kernels import trigger_decode
from kernels.causal_conv import causal_conv_silu, causal_conv_silu_step
from kernels.l2_norm import l2_normalize
from kernels.linear_cross_entropy import chunked_linear_cross_entropy
from kernels.rms_norm import gated_rms_norm, rms_norm
from kernels.swiglu import swiglu_linear
from kernels.trigger_decode import trigger_step_decode

DEVICE = "cuda" if ON_CUDA else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # worst seen on the CPU: 2e-7, 2.4e-3 (dW)
# the Trigger's decode kernels' c in bf16: rounded to nearest on a GPU (2^-9 relative); Triton's interpreter
# rounds casts to bf16 toward zero (worst seen in 30 random CPU cases: 3.9e-3)
TRIGGER_C_BF16 = 4e-3 if ON_CUDA else 6e-3


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def assert_gradients_match(out, expected, inputs, reference, grad_out, names, bound):
    """The gradients of out (from inputs) against those of the float64 twin's expected (from reference), for
    the same output gradient: each in its input's dtype, within bound."""
    grads = torch.autograd.grad(out, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, reference, grad_out.double())
    for name, actual, want, given_input in zip(names, grads, expected_grads, inputs):
        assert actual.dtype == given_input.dtype, name
        assert relative_error(actual, want) <= bound, f"{name}: {relative_error(actual, want):.2e}"


def loss_and_grads(loss_fn, h, weight, targets, dtype, **kwargs):
    h, weight = h.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = loss_fn(h, weight, targets, **kwargs)
    loss.backward()
    return loss.detach(), h.grad, weight.grad


@settings(max_examples=30 if ON_CUDA else 15, deadline=None, database=None, derandomize=not ON_CUDA)
@given(
    N=st.integers(1, 3000 if ON_CUDA else 300),
    D=st.integers(1, 96),
    V=st.integers(2, 700),
    chunk_size=st.one_of(st.none(), st.integers(1, 400)),
    ignored=st.floats(0, 0.9),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_chunked_linear_cross_entropy_matches_reference(N, D, V, chunk_size, ignored, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=generator).to(DEVICE)
    weight = (torch.randn(V, D, generator=generator) * 2 / D**0.5).to(DEVICE)
    targets = torch.randint(0, V, (N,), generator=generator)
    targets[torch.rand(N, generator=generator) < ignored] = -1
    targets[0] = int(torch.randint(0, V, ()))  # at least one counts
    targets = targets.to(DEVICE)
    expected = loss_and_grads(nirvana.linear_cross_entropy, h, weight, targets, dtype)
    actual = loss_and_grads(chunked_linear_cross_entropy, h, weight, targets, dtype, chunk_size=chunk_size)
    for name, a, e in zip(("loss", "dh", "dW"), actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, (
            f"{name}: {a.dtype} {a.shape} vs {e.dtype} {e.shape}"
        )
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        assert relative_error(a, e) <= TOLERANCE[dtype], f"{name}: relative error {relative_error(a, e):.2e}"


def test_chunked_linear_cross_entropy_without_gradients_and_bad_shapes():
    h, weight = torch.randn(50, 8, device=DEVICE), torch.randn(30, 8, device=DEVICE)
    targets = torch.randint(0, 30, (50,), device=DEVICE)
    with torch.no_grad():
        loss = chunked_linear_cross_entropy(h, weight, targets, chunk_size=7)
    torch.testing.assert_close(loss, nirvana.linear_cross_entropy(h, weight, targets))
    with pytest.raises(ValueError, match="targets must have shape"):
        chunked_linear_cross_entropy(h, weight, targets[:-1])
    with pytest.raises(ValueError, match=r"h \(N, D\) and weight \(vocab, D\)"):
        chunked_linear_cross_entropy(h, weight[:, :-1], targets)


def test_model_loss_with_chunked_cross_entropy_matches_torch_backend():
    # the tiny model's loss and gradients with the triton backend's loss are the torch backend's
    torch.manual_seed(0)
    model = nirvana.Nirvana(nirvana.NirvanaConfig.from_preset("gated-deltanet-tiny")).to(DEVICE)
    idx = torch.randint(0, model.config.vocab_size, (2, 24), device=DEVICE)
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -1
    logits, loss = model(idx, targets)
    assert logits is None
    grads = torch.autograd.grad(loss, list(model.parameters()))
    model.linear_cross_entropy = chunked_linear_cross_entropy
    _, chunked_loss = model(idx, targets)
    chunked_grads = torch.autograd.grad(chunked_loss, list(model.parameters()))
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-5, atol=1e-6)
    for (name, _), actual, expected in zip(model.named_parameters(), chunked_grads, grads):
        assert relative_error(actual, expected) <= 1e-5, name


@pytest.mark.parametrize("variant", ["gated-deltanet", "nirvana"])
def test_tiny_model_on_the_triton_backend_matches_torch_backend(variant):
    # every fast path at once (kernels, fused norms, SwiGLU, chunked loss), float32: the same loss and
    # gradients as the plain model with the same weights, up to the kernels' tf32 products: 3e-6 over all
    # gradients together, 2e-4 to 1e-2 for the smallest (the last layer's Trigger theta, whose gradient
    # norm is 1e-5 there, reaches only its own layer's output)
    torch.manual_seed(0)
    model = nirvana.Nirvana(nirvana.NirvanaConfig.from_preset(f"{variant}-tiny")).to(DEVICE)
    fast = nirvana.Nirvana(nirvana.NirvanaConfig.from_preset(f"{variant}-tiny", backend="triton")).to(DEVICE)
    fast.load_state_dict(model.state_dict())
    idx = torch.randint(0, model.config.vocab_size, (2, 40), device=DEVICE)
    losses, grads = [], []
    for m in (model, fast):
        _, loss = m(idx, idx.roll(-1, dims=1))
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(m.parameters())))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    assert (
        relative_error(torch.cat([g.flatten() for g in grads[1]]), torch.cat([g.flatten() for g in grads[0]]))
        <= 1e-4
    )
    for (name, _), actual, expected in zip(model.named_parameters(), grads[1], grads[0]):
        assert relative_error(actual, expected) <= 3e-2, name


# ------------------------------------------------------------------------------------------------------
# The Trigger's decode kernels vs nirvana.trigger_step (autograd for the inner gradient)


@settings(max_examples=30 if ON_CUDA else 15, deadline=None, database=None, derandomize=not ON_CUDA)
@given(
    lead=st.one_of(st.tuples(st.integers(1, 8)), st.tuples(st.integers(1, 4), st.integers(1, 3))),
    d_t=st.integers(2, 64),
    K=st.integers(1, 64),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_trigger_decode_matches_reference(lead, d_t, K, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*lead, d_t, generator=generator).to(dtype).to(DEVICE) for _ in range(3))
    p_prev = (1 + 0.3 * torch.randn(*lead, K, generator=generator)).to(DEVICE)
    eta = (0.1 * torch.rand(*lead, generator=generator)).to(DEVICE)
    bank_weight = (torch.randn(K, d_t, d_t, generator=generator) / (K * d_t) ** 0.5).to(DEVICE)
    bank_bias = (torch.randn(K, d_t, generator=generator) / (K * d_t) ** 0.5).to(DEVICE)
    inputs = (q, k, v, p_prev, eta, bank_weight, bank_bias)
    with torch.no_grad():
        c, p = trigger_step_decode(*inputs)
        c_model, p_model = nirvana.trigger_step(*inputs)  # as the model calls it: dtypes
        c_ref, p_ref = nirvana.trigger_step(*(x.double() for x in inputs))  # float64 reference values
    assert (c.dtype, p.dtype, c.shape, p.shape) == (
        c_model.dtype,
        p_model.dtype,
        c_model.shape,
        p_model.shape,
    )
    # float32 arithmetic here: c within its dtype's rounding, p within float32's
    assert relative_error(c, c_ref) <= (1e-5 if dtype == torch.float32 else TRIGGER_C_BF16)
    assert relative_error(p, p_ref) <= 1e-5


def test_trigger_decode_takes_the_models_layouts():
    """As a decoding model calls it: q~, k~, v~ column slices of the fused projection's output (B, 1, width),
    p_prev all ones (the first post-prelude layer); and a model cast to bf16 (the bank in bf16 too)."""
    generator = torch.Generator().manual_seed(0)
    d_t, K = 24, 12
    projection = torch.randn(4, 1, 3 * d_t + 5, generator=generator).to(DEVICE)
    q, k, v = projection[..., :d_t], projection[..., d_t : 2 * d_t], projection[..., 2 * d_t : 3 * d_t]
    p_prev, eta = torch.ones(4, 1, K, device=DEVICE), 0.1 * torch.rand(4, 1, generator=generator).to(DEVICE)
    bank_weight = (torch.randn(K, d_t, d_t, generator=generator) / (K * d_t) ** 0.5).to(DEVICE)
    bank_bias = (torch.randn(K, d_t, generator=generator) / (K * d_t) ** 0.5).to(DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        inputs = (
            [x.to(dtype) for x in (q, k, v)] + [p_prev, eta] + [x.to(dtype) for x in (bank_weight, bank_bias)]
        )
        with torch.no_grad():
            c, p = trigger_step_decode(*inputs)
            c_ref, p_ref = nirvana.trigger_step(*(x.double() for x in inputs))
        assert c.shape == (4, 1, d_t) and p.shape == (4, 1, K) and c.dtype == dtype
        assert relative_error(c, c_ref) <= (1e-5 if dtype == torch.float32 else TRIGGER_C_BF16)
        assert relative_error(p, p_ref) <= 1e-5


def test_trigger_dispatch_decode_kernels_only_without_gradients():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 16, device=DEVICE) for _ in range(3))
    p_prev, eta = 1 + 0.3 * torch.randn(3, 8, device=DEVICE), 0.1 * torch.rand(3, device=DEVICE)
    bank_weight, bank_bias = (
        torch.randn(8, 16, 16, device=DEVICE) / 12,
        torch.randn(8, 16, device=DEVICE) / 12,
    )
    inputs = [q, k, v, p_prev, eta, bank_weight, bank_bias]
    with torch.no_grad():
        decoded = trigger_decode.trigger_step(*inputs)
    for a, b in zip(decoded, trigger_step_decode(*inputs)):
        assert torch.equal(a, b)
    bank_weight.requires_grad_()
    c, p = trigger_decode.trigger_step(*inputs)  # the fused kernel, differentiable
    assert c.requires_grad and p.requires_grad
    c_ref, p_ref = nirvana.trigger_step(*inputs)
    assert relative_error(c, c_ref) <= 1e-4 and relative_error(p, p_ref) <= 1e-4


# ------------------------------------------------------------------------------------------------------
# Gated DeltaNet's output norm: one Triton kernel each way vs nirvana.gated_rms_norm

# the leading dimensions of per-head rows: (N,) with N possibly 0, or (B, T, H)
PER_HEAD_LEAD = st.one_of(
    st.tuples(st.integers(0, 40)), st.tuples(st.integers(1, 3), st.integers(1, 20), st.integers(1, 4))
)


@settings(max_examples=30 if ON_CUDA else 12, deadline=None, database=None, derandomize=not ON_CUDA)
@given(
    lead=PER_HEAD_LEAD,
    D=st.sampled_from([3, 16, 64, 100, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    x_float32=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gated_rms_norm_matches_reference(lead, D, dtype, x_float32, seed):
    # as the model calls it: gate in the compute dtype, x in it or float32, weight float32
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, D, generator=generator).to(torch.float32 if x_float32 else dtype).to(DEVICE)
    gate = (2 * torch.randn(*lead, D, generator=generator)).to(dtype).to(DEVICE)
    weight = (1 + 0.3 * torch.randn(D, generator=generator)).to(DEVICE)
    grad_out = torch.randn(*lead, D, generator=generator).to(dtype).to(DEVICE)
    inputs = [t.clone().requires_grad_() for t in (x, gate, weight)]
    reference = [t.detach().double().requires_grad_() for t in (x, gate, weight)]
    out = gated_rms_norm(*inputs, 1e-6)
    expected = nirvana.gated_rms_norm(*reference, 1e-6)
    out_model = nirvana.gated_rms_norm(*(t.detach() for t in inputs), 1e-6)
    assert out.dtype == out_model.dtype == dtype and out.shape == expected.shape
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert x.numel() == 0 or relative_error(out, expected) <= bound
    if x.numel() == 0:
        return
    assert_gradients_match(out, expected, inputs, reference, grad_out, ("dx", "dgate", "dw"), bound)


@settings(max_examples=30 if ON_CUDA else 12, deadline=None, database=None, derandomize=not ON_CUDA)
@given(
    lead=st.one_of(st.tuples(st.integers(0, 40)), st.tuples(st.integers(1, 3), st.integers(1, 20))),
    D=st.sampled_from([3, 64, 100, 256, 1024]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_matches_reference(lead, D, dtype, seed):
    # as the model calls it: x the float32 residual stream, weight float32; bf16 means under autocast, where
    # both write their output in bf16
    generator = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(*lead, D, generator=generator)).to(DEVICE)
    weight = (1 + 0.3 * torch.randn(D, generator=generator)).to(DEVICE)
    grad_out = torch.randn(*lead, D, generator=generator).to(dtype).to(DEVICE)
    inputs = [t.clone().requires_grad_() for t in (x, weight)]
    reference = [t.detach().double().requires_grad_() for t in (x, weight)]
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = rms_norm(*inputs, 1e-6)
        out_model = nirvana.rms_norm(*(t.detach() for t in inputs), 1e-6)
    expected = nirvana.rms_norm(*reference, 1e-6)
    assert out.dtype == out_model.dtype == dtype and out.shape == expected.shape
    bound = TOLERANCE[dtype]
    assert x.numel() == 0 or relative_error(out, expected) <= bound
    if x.numel() == 0:
        return
    assert_gradients_match(out, expected, inputs, reference, grad_out, ("dx", "dw"), bound)


def test_norms_reject_mismatched_shapes():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight \(D,\) expected, got \(2, 8\) and \(7,\)"):
        rms_norm(x, torch.ones(7, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="x and gate"):
        gated_rms_norm(x, x[:, :4], torch.ones(8, device=DEVICE), 1e-6)


# ------------------------------------------------------------------------------------------------------
# SwiGLU's output projection: the product formed by a Triton kernel, and again in backward; gate and up
# side by side in one input


@settings(max_examples=30 if ON_CUDA else 12, deadline=None, database=None, derandomize=not ON_CUDA)
@given(
    lead=st.one_of(st.tuples(st.integers(0, 30)), st.tuples(st.integers(1, 3), st.integers(1, 17))),
    F_=st.sampled_from([1, 24, 100, 352]),
    D=st.sampled_from([8, 40, 64]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_swiglu_linear_matches_reference(lead, F_, D, dtype, seed):
    # as the model calls it: gate and up side by side out of one GEMM in the compute dtype, weight float32
    # (bf16: autocast)
    generator = torch.Generator().manual_seed(seed)
    gate = 2 * torch.randn(*lead, F_, generator=generator)
    up = torch.randn(*lead, F_, generator=generator)
    gate_up = torch.cat([gate, up], dim=-1).to(dtype).to(DEVICE)
    weight = (torch.randn(D, F_, generator=generator) / F_**0.5).to(DEVICE)
    grad_out = torch.randn(*lead, D, generator=generator).to(dtype).to(DEVICE)
    inputs = [t.clone().requires_grad_() for t in (gate_up, weight)]
    reference = [t.detach().double().requires_grad_() for t in (gate_up, weight)]
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = swiglu_linear(*inputs)
        out_model = nirvana.swiglu_linear(*(t.detach() for t in inputs))
    expected = nirvana.swiglu_linear(*reference)
    assert out.dtype == out_model.dtype == dtype and out.shape == expected.shape
    bound = TOLERANCE[dtype]
    assert gate_up.numel() == 0 or relative_error(out, expected) <= bound
    if gate_up.numel() == 0:
        return
    assert_gradients_match(out, expected, inputs, reference, grad_out, ("dgate_up", "dw"), bound)


def test_swiglu_linear_reads_a_view_of_the_projection():
    """The model passes the GEMM's output whole; a strided view (a slice of a wider tensor) gives the same
    values and gradients as its contiguous copy."""
    wide = torch.randn(3, 5, 20, device=DEVICE, requires_grad=True)
    weight = torch.randn(4, 6, device=DEVICE)
    copy = wide.detach()[..., 2:14].clone().requires_grad_()
    out, out_copy = swiglu_linear(wide[..., 2:14], weight), swiglu_linear(copy, weight)
    torch.testing.assert_close(out, out_copy)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_copy.backward(grad)
    torch.testing.assert_close(wide.grad[..., 2:14], copy.grad)
    assert wide.grad[..., :2].abs().sum() == 0 and wide.grad[..., 14:].abs().sum() == 0


def test_swiglu_linear_rejects_mismatched_shapes():
    gate_up = torch.randn(2, 12, device=DEVICE)
    with pytest.raises(ValueError, match=r"got \(2, 12\) and \(4, 5\)"):
        swiglu_linear(gate_up, torch.randn(4, 5, device=DEVICE))
    with pytest.raises(ValueError, match=r"got \(2, 11\) and \(4, 6\)"):
        swiglu_linear(gate_up[:, :11], torch.randn(4, 6, device=DEVICE))


def saved_bytes(fn, *inputs):
    """Bytes fn's autograd graph keeps for backward, not counting the inputs themselves (the bf16 copies
    autocast makes of them count)."""
    given = {t.untyped_storage().data_ptr() for t in inputs}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in given:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            fn(*inputs)
    return sum(storages.values())


def test_fused_norm_and_swiglu_keep_less_for_backward():
    # what makes the triton backend's training step smaller: per token at d_model 1024 and ffn 2816, in bf16,
    # the pre-norm keeps one float32 rstd beside its input (its twin on the CPU also the float32 normed x;
    # torch's CUDA rms_norm is fused and keeps the rstd alone too), and SwiGLU only gate and up (its twin
    # also SiLU(gate) and the product)
    T, D, F_ = 64, 1024, 2816
    h = torch.randn(T, D, device=DEVICE, requires_grad=True)
    weight = torch.ones(D, device=DEVICE, requires_grad=True)
    twin_norm = saved_bytes(lambda x, w: nirvana.rms_norm(x, w, 1e-6), h, weight)
    assert saved_bytes(lambda x, w: rms_norm(x, w, 1e-6), h, weight) == 4 * T <= twin_norm
    if not ON_CUDA:
        assert twin_norm >= 4 * T * D
    gate_up = torch.randn(T, 2 * F_, device=DEVICE).bfloat16().requires_grad_()
    down = torch.randn(D, F_, device=DEVICE, requires_grad=True)
    assert saved_bytes(swiglu_linear, gate_up, down) == 0
    assert saved_bytes(nirvana.swiglu_linear, gate_up, down) >= 2 * (2 * T * F_) + 2 * D * F_


# ------------------------------------------------------------------------------------------------------
# Gated DeltaNet's short convolution and its SiLU: Triton forward and backward vs nirvana.causal_conv_silu (cuDNN)


@settings(max_examples=30 if ON_CUDA else 12, deadline=None, database=None, derandomize=not ON_CUDA)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 300 if ON_CUDA else 40),
    C=st.integers(1, 300 if ON_CUDA else 40),
    K=st.integers(1, 5),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_causal_conv_silu_matches_reference(B, T, C, K, dtype, seed):
    # as the model calls it: x in the compute dtype, weight float32
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=generator).to(dtype).to(DEVICE)
    weight = (torch.randn(C, 1, K, generator=generator) / K**0.5).to(DEVICE)
    grad_out = torch.randn(B, T, C, generator=generator).to(dtype).to(DEVICE)
    inputs = [t.clone().requires_grad_() for t in (x, weight)]
    reference = [t.detach().double().requires_grad_() for t in (x, weight)]
    out = causal_conv_silu(*inputs)
    expected = nirvana.causal_conv_silu(*reference)
    assert out.dtype == dtype and out.shape == expected.shape
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert relative_error(out, expected) <= bound
    grads = torch.autograd.grad(out, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, reference, grad_out.double())
    for name, actual, want, given_input in zip(("dx", "dw"), grads, expected_grads, inputs):
        assert actual.dtype == given_input.dtype, name
        assert relative_error(actual, want) <= bound, f"{name}: {relative_error(actual, want):.2e}"


@pytest.mark.parametrize("kernel_size", [1, 2, 4])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_causal_conv_decoding_through_its_tail_matches_the_whole_sequence(backend, kernel_size):
    """nirvana.CausalConv with a cache: a prompt, then one token at a time (the step) and three at a time
    (on [tail; x]) -- the outputs are the convolution of the whole sequence, float32; kernel size 1 keeps an
    empty tail."""
    ops = nirvana.TORCH_OPS
    if backend == "triton":
        ops = nirvana.with_ops(
            ops, causal_conv_silu=causal_conv_silu, causal_conv_silu_step=causal_conv_silu_step
        )
    conv = nirvana.CausalConv(8, kernel_size, ops)
    conv = conv.to(DEVICE)
    x = torch.randn(2, 12, 8, device=DEVICE)
    with torch.no_grad():
        whole = conv(x)
        conv.setup_cache(2, 12, DEVICE, torch.float32)
        pieces = [conv(x[:, :5])] + [conv(x[:, t : t + 1]) for t in (5, 6)] + [conv(x[:, 7:10])]
        pieces += [conv(x[:, 10:11]), conv(x[:, 11:])]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv.tail, x[:, x.shape[1] - (kernel_size - 1) :])
    with pytest.raises(ValueError, match=r"x \(B, T, C\) and weight \(C, 1, K\)"):
        causal_conv_silu(x, conv.weight[:4])


def test_causal_conv_silu_keeps_only_its_input_for_backward():
    # the twin keeps the convolution's output for SiLU's backward too: (B, T, C) more in the compute dtype
    B, T, C, K = 2, 64, 48, 4
    x = torch.randn(B, T, C, device=DEVICE).bfloat16().requires_grad_()
    weight = torch.randn(C, 1, K, device=DEVICE, requires_grad=True)
    kept = saved_bytes(causal_conv_silu, x, weight)
    assert kept <= 4 * C * K  # the flattened float32 weight, when reshape copies it; x itself is not counted
    assert saved_bytes(nirvana.causal_conv_silu, x, weight) >= kept + 2 * B * T * C


@pytest.mark.parametrize("variant", ["gated-deltanet", "nirvana", "transformer"])
def test_no_layer_keeps_its_fused_projections_output_for_backward(variant):
    """Every part of in_proj's (B, T, width) output (qkv_proj's in the transformer) is a view of it; a
    consumer that kept its view would keep the whole output alive (in nirvana-350m, 8.4 KiB per token per
    layer once held by the low-rank deltas' up-projections; in transformer-350m 6 KiB, held by attention's
    v beside the rotated q and k). Triton backend, bf16 autocast."""
    model = nirvana.Nirvana(nirvana.NirvanaConfig.from_preset(f"{variant}-tiny", backend="triton")).to(DEVICE)
    outputs = []  # held here, so that no later tensor can take a freed output's address
    for module in model.modules():
        is_projection = isinstance(module, nirvana.FusedLinear) and (
            module.parts.keys() >= {"qkv", "gate"} or module.parts.keys() == {"q", "k", "v"}
        )
        if is_projection:
            module.register_forward_hook(lambda _, __, out: outputs.append(out[0]))
    kept = set()

    def pack(t):
        kept.add(t.untyped_storage().data_ptr())
        return t

    idx = torch.randint(0, model.config.vocab_size, (2, 40), device=DEVICE)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            model(idx, idx)
    assert len(outputs) == model.config.n_layers
    assert not kept & {out.untyped_storage().data_ptr() for out in outputs}


def test_compiled_training_keeps_no_view_of_a_larger_tensor_for_backward():
    """A view kept for backward keeps its whole storage alive. Under torch.compile every Triton kernel splits
    the graph, and a graph that takes views as inputs may keep them where eager autograd kept its own float32
    results: the gates' inputs, views of in_proj's output, once kept that whole output alive in every layer
    (about 3 GiB more than eager at 350m, B 4, T 4096, on a GPU). Nirvana (its prelude layers are Gated
    DeltaNet layers), Triton backend, bf16 autocast, compiled; eager: the test above."""
    torch.manual_seed(0)
    model = nirvana.Nirvana(nirvana.NirvanaConfig.from_preset("nirvana-tiny", backend="triton")).to(DEVICE)
    forward = torch.compile(model)
    idx = torch.randint(0, model.config.vocab_size, (2, 40), device=DEVICE)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def views_kept():
        views = []

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in parameters and storage.nbytes() > t.numel() * t.element_size():
                views.append((tuple(t.shape), t.stride(), storage.nbytes()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                forward(idx, idx)[1].backward()
        return views

    views_kept()  # compiles
    assert views_kept() == []


# ------------------------------------------------------------------------------------------------------
# The L2 norm of q and k: Triton forward and backward vs nirvana.l2_normalize (F.normalize in float32)


@settings(max_examples=30 if ON_CUDA else 12, deadline=None, database=None, derandomize=not ON_CUDA)
@given(
    lead=PER_HEAD_LEAD,
    D=st.sampled_from([1, 16, 64, 100, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    zero_row=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_l2_normalize_matches_reference(lead, D, dtype, zero_row, seed):
    # as the model calls it: x (the SiLU of the convolution) in the compute dtype, the output in that dtype
    generator = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(*lead, D, generator=generator)).to(dtype)
    if zero_row and x.numel():
        x.view(-1, D)[0] = 0  # the clamped norm: y = 0, dx = dy / eps in both
    x = x.to(DEVICE)
    grad_out = torch.randn(*lead, D, generator=generator).to(dtype).to(DEVICE)
    inputs = [x.clone().requires_grad_()]
    reference = [x.detach().double().requires_grad_()]
    out = l2_normalize(inputs[0], dtype)
    expected = nirvana.l2_normalize(reference[0], torch.float64)
    assert out.dtype == dtype and out.shape == expected.shape
    if x.numel() == 0:
        return
    bound = TOLERANCE[dtype]

    def assert_close(actual, want, name, scale=0.0):  # relative to want's norm, or to scale where larger
        error = (actual.double() - want).norm().item()
        assert error <= bound * max(want.norm().item(), scale), f"{name}: error {error:.2e}"

    assert_close(out, expected, "y")
    (dx,) = torch.autograd.grad(out, inputs, grad_out)
    (expected_dx,) = torch.autograd.grad(expected, reference, grad_out.double())
    assert dx.dtype == dtype
    norm = reference[0].detach().norm(dim=-1, keepdim=True)
    live = norm[..., 0] > 0  # a zero row's dx is dy / 1e-12 in both: compared apart, on its own scale
    # at D = 1 dx is zero but for rounding: the scale of dx is that of dy / ||x||
    assert_close(dx[live], expected_dx[live], "dx", (grad_out.double() / norm)[live].norm().item())
    assert_close(dx[~live], expected_dx[~live], "dx of the zero row")


def test_l2_normalize_keeps_its_output_and_the_norms_for_backward():
    # the twin keeps x in float32 (4 bytes a value); the kernel its output, which the delta rule keeps too,
    # and one float32 norm per row
    rows, D = 256, 128
    x = torch.randn(rows, D, device=DEVICE).bfloat16().requires_grad_()
    kept = saved_bytes(lambda t: l2_normalize(t, torch.bfloat16), x)
    assert kept == 2 * rows * D + 4 * rows
    assert saved_bytes(lambda t: nirvana.l2_normalize(t, torch.bfloat16), x) >= 4 * rows * D
    with pytest.raises(ValueError, match=r"x \(\.\.\., D\) with D >= 1"):
        l2_normalize(torch.randn(3, 0, device=DEVICE), torch.float32)
