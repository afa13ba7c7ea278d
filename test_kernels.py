"""Property tests of the Triton kernels for sliding-window attention and the Trigger step against the
PyTorch references in nirvana.py (outputs and the gradients of every input).

    python -m pytest -q test_kernels.py                              # CPU: Triton interpreter, small shapes
    NIRVANA_KERNEL_TESTS=cuda python -m pytest -q test_kernels.py    # GPU: larger shapes, more examples
    NIRVANA_KERNEL_ERRORS=errors.json ...                            # also write the worst errors seen

The reference runs in float64 on the same inputs; errors are ||out - ref|| / ||ref|| over whole tensors.
Bounds: float32 1e-4 (float32-accurate products: exact in the interpreter, tf32x3 on the GPU; the issue's
"near 1e-4". Worst seen on an H100: 1.6e-5 for SWA dq at T = 1 with Dv = 256, whose exact value is 0 and whose
computed value is float32 rounding of dP - delta, two sums of 256 products; 1.2e-5 for the Trigger's deta of a
single token, one sum over the bank; everything else below 1e-5);
bfloat16 3e-2 (bf16 operands and outputs; worst seen: 1.3e-2 in 40 random SWA cases on the CPU, 7e-3 in
25 on an H100; one random CPU example reached 3.0e-2: SWA dq at T = 2, Dk = 16, window 2, seed 2727, where the
backward's delta = rowsum(o * do) comes from the bf16-rounded o and dq = P (dP - delta) K cancels).
"""

import json
import os

ON_CUDA = os.environ.get("NIRVANA_KERNEL_TESTS", "cpu") == "cuda"
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
import nirvana

DEVICE = "cuda" if ON_CUDA else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
EXAMPLES = 25 if ON_CUDA else 12  # each new head size / dtype compiles kernels
# CPU (CI): a fixed example order, so that a run is reproducible; GPU: new random examples each run.
WORST = {}  # (kernel, dtype, tensor) -> worst relative error seen


@pytest.fixture(scope="module", autouse=True)
def report_worst_errors():
    """NIRVANA_KERNEL_ERRORS=path: the worst errors as JSON; under pytest-xdist one file per worker (path.gw0, ...)."""
    yield
    path = os.environ.get("NIRVANA_KERNEL_ERRORS")
    if path:
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        with open(f"{path}.{worker}" if worker else path, "w") as f:
            json.dump({" ".join(key): value for key, value in sorted(WORST.items())}, f, indent=1)


def assert_close(actual, expected, dtype, key, bound=None):
    """Relative L2 error under the bound of `bound` (default: the dtype `actual` must have). The inputs are
    O(1), so the denominator has a floor of RMS 0.1: an all-zero reference (dq when each query sees one key) is
    compared on that absolute scale."""
    bound = dtype if bound is None else bound
    assert actual is not None, f"{key}: no gradient"
    assert torch.isfinite(actual).all(), f"{key}: non-finite values"
    assert actual.shape == expected.shape and actual.dtype == dtype, f"{key}: {actual.shape} {actual.dtype}"
    diff = (actual.double() - expected.double()).norm().item()
    floor = 0.1 * expected.numel() ** 0.5
    error = diff / max(expected.double().norm().item(), floor)
    name = (key[0], str(bound).replace("torch.", ""), key[1])
    WORST[name] = max(WORST.get(name, 0.0), error)
    assert error < TOLERANCE[bound], f"{name}: relative error {error:.2e} >= {TOLERANCE[bound]:.0e}"


def random(generator, *shape, dtype, scale=1.0, shift=0.0):
    x = torch.randn(*shape, generator=generator, device=DEVICE, dtype=torch.float64) * scale + shift
    return x.to(dtype).requires_grad_()


def outputs_and_gradients(fn, inputs, cotangents):
    """fn(*inputs) -> tuple of outputs; returns the outputs and d(sum <out, cotangent>)/d(input) per input."""
    outputs = fn(*inputs)
    total = sum((o.double() * c).sum() for o, c in zip(outputs, cotangents))
    return outputs, torch.autograd.grad(total, inputs, allow_unused=True)


def check_against_reference(
    kernel_fn, reference_fn, inputs, names, kernel_name, dtype, zero_grad=(), output_dtypes=None
):
    """Compare outputs and all input gradients of kernel_fn (on `inputs`) with reference_fn in float64, under
    dtype's bound. Each gradient must come back in its input's dtype, each output in output_dtypes (default:
    dtype)."""
    generator = torch.Generator(DEVICE).manual_seed(0)
    with torch.no_grad():
        probe = kernel_fn(*inputs)
    # both sides get the same cotangent values (representable in the output dtype)
    cotangents = [
        torch.randn(o.shape, generator=generator, device=DEVICE, dtype=torch.float64).to(o.dtype).double()
        for o in probe
    ]
    out, grads = outputs_and_gradients(kernel_fn, inputs, cotangents)
    reference_inputs = [x.detach().double().requires_grad_() for x in inputs]
    ref_out, ref_grads = outputs_and_gradients(reference_fn, reference_inputs, cotangents)
    for i, (o, r, o_dtype) in enumerate(zip(out, ref_out, output_dtypes or [dtype] * len(out))):
        assert_close(o, r, o_dtype, (kernel_name, f"out{i}"), bound=dtype)
    for name, g, r, x in zip(names, grads, ref_grads, inputs):
        if name in zero_grad:  # the reference has no path from this input
            assert r is None and (g is None or not g.any()), f"{kernel_name}: {name} should get no gradient"
            continue
        assert_close(g, r, x.dtype, (kernel_name, "d" + name), bound=dtype)


# ------------------------------------------------------------------------------------------------------
# Sliding-window attention


def check_swa(B, T, H, Dk, expand_v, window, dtype, seed, scale=None):
    generator = torch.Generator(DEVICE).manual_seed(seed)
    q, k = (random(generator, B, T, H, Dk, dtype=dtype) for _ in range(2))
    v = random(generator, B, T, H, Dk * expand_v, dtype=dtype)
    check_against_reference(
        lambda q, k, v: (kernels.sliding_window_attention(q, k, v, window, scale),),
        lambda q, k, v: (nirvana.sliding_window_attention(q, k, v, window, scale),),
        [q, k, v],
        ["q", "k", "v"],
        "swa",
        dtype,
    )


MAX_T = 700 if ON_CUDA else 70


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not ON_CUDA)
@given(
    B=st.integers(1, 3 if ON_CUDA else 2),
    H=st.integers(1, 4 if ON_CUDA else 2),
    T=st.one_of(st.integers(1, 3), st.integers(1, MAX_T)),
    Dk=st.sampled_from([64, 128] if ON_CUDA else [16, 24, 32]),
    expand_v=st.sampled_from([1, 2]),
    window=st.one_of(st.integers(1, 4), st.integers(1, MAX_T + 20)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_swa_matches_reference(B, T, H, Dk, expand_v, window, dtype, seed):
    check_swa(B, T, H, Dk, expand_v, window, dtype, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swa_window_spans_unmasked_blocks_and_custom_scale(dtype):
    # T and W several blocks long: the kernels' mask-free middle ranges run, in both directions
    check_swa(1, 150 if ON_CUDA else 100, 2, 16, 2, 67 if not ON_CUDA else 130, dtype, seed=1, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swa_widest_tested_heads(dtype):
    # Dk 128, Dv 256: the launch configs must fit in shared memory (float32 tiles once needed 304 KB on an H100)
    check_swa(1, 90, 1, 128 if ON_CUDA else 32, 2, 40, dtype, seed=4)


def test_swa_window_one_is_identity_on_values():
    # each query sees only itself, so o = v exactly (a property independent of the reference)
    generator = torch.Generator(DEVICE).manual_seed(2)
    q, k, v = (random(generator, 1, 19, 2, 16, dtype=torch.float32) for _ in range(3))
    torch.testing.assert_close(kernels.sliding_window_attention(q, k, v, 1), v, rtol=1e-6, atol=1e-6)


def test_swa_after_the_models_rope_matches_reference():
    # the nirvana-rope variant rotates q and k (nirvana.apply_rope) before the kernel; gradients flow back
    # through the rotation
    generator = torch.Generator(DEVICE).manual_seed(3)
    q, k, v = (random(generator, 1, 33, 2, 16, dtype=torch.float32) for _ in range(3))
    cos, sin = nirvana.rope_angles(torch.arange(q.shape[1], device=DEVICE), q.shape[-1], 100.0)

    def after_rope(attention):
        return lambda q, k, v: (
            attention(nirvana.apply_rope(q, cos, sin), nirvana.apply_rope(k, cos, sin), v, 20),
        )

    check_against_reference(
        after_rope(kernels.sliding_window_attention),
        after_rope(nirvana.sliding_window_attention),
        [q, k, v],
        ["q", "k", "v"],
        "swa-rope",
        torch.float32,
    )


def test_swa_rejects_bad_inputs():
    q = torch.randn(1, 8, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="window must be a positive integer"):
        kernels.sliding_window_attention(q, q, q, 0)
    with pytest.raises(ValueError, match="expected q, k"):
        kernels.sliding_window_attention(q, q[:, :4], q, 4)
    with pytest.raises(ValueError, match="share one dtype"):
        kernels.sliding_window_attention(q, q, q.double(), 4)


# ------------------------------------------------------------------------------------------------------
# Trigger step (CL-OGD through the LayerNorm and the bank, eqs. 2-7)


def trigger_inputs(shape, D, K, dtype, seed):
    generator = torch.Generator(DEVICE).manual_seed(seed)
    q, k, v = (random(generator, *shape, D, dtype=dtype) for _ in range(3))
    p_prev = random(generator, *shape, K, dtype=dtype, scale=0.3, shift=1.0)  # near the all-ones start
    eta = (torch.rand(shape, generator=generator, device=DEVICE, dtype=torch.float64) * 0.2).to(dtype)
    bank_weight = random(generator, K, D, D, dtype=dtype, scale=(K * D) ** -0.5)  # the model's init scale
    bank_bias = random(generator, K, D, dtype=dtype, scale=(K * D) ** -0.5)
    return [q, k, v, p_prev, eta.requires_grad_(), bank_weight, bank_bias]


def check_trigger(shape, D, K, dtype, detach, seed):
    inputs = trigger_inputs(shape, D, K, dtype, seed)
    check_against_reference(
        lambda *x: kernels.trigger_step(*x, detach_inner_grad=detach),
        lambda *x: nirvana.trigger_step(*x, detach_inner_grad=detach),
        inputs,
        ["q", "k", "v", "p_prev", "eta", "bank_weight", "bank_bias"],
        "trigger-detach" if detach else "trigger",
        dtype,
        zero_grad=("k", "v") if detach else (),
    )


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not ON_CUDA)
@given(
    shape=st.one_of(
        st.tuples(st.integers(1, 3000 if ON_CUDA else 40)),
        st.tuples(st.integers(1, 4), st.integers(1, 700 if ON_CUDA else 12)),
    ),
    D=st.sampled_from([48, 64] if ON_CUDA else [8, 16, 24]),
    K=st.sampled_from([16, 64] if ON_CUDA else [4, 8, 12]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    detach=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_trigger_matches_reference(shape, D, K, dtype, detach, seed):
    check_trigger(shape, D, K, dtype, detach, seed)


@pytest.mark.parametrize("detach", [False, True])
def test_trigger_at_model_size(detach):
    # the paper's d_t = 64, K = 64; on the CPU 17 tokens: two programs of 16, the second one a tail
    check_trigger((2, 17) if ON_CUDA else (17,), 64, 64, torch.float32, detach, seed=5)


def test_trigger_with_the_dtypes_of_the_model_under_autocast():
    # bf16 autocast gives q~, k~, v~ in bf16 (Linear outputs) while p, eta and the bank stay float32: c and dq, dk,
    # dv come back in bf16, p' and dp, deta, dbank in float32, all within bf16's bound (the inputs' precision)
    shape = (2, 33) if ON_CUDA else (17,)
    q, k, v, p_prev, eta, bank_weight, bank_bias = trigger_inputs(shape, 64, 64, torch.bfloat16, seed=8)
    inputs = [q, k, v] + [x.detach().float().requires_grad_() for x in (p_prev, eta, bank_weight, bank_bias)]
    check_against_reference(
        kernels.trigger_step,
        nirvana.trigger_step,
        inputs,
        ["q", "k", "v", "p_prev", "eta", "bank_weight", "bank_bias"],
        "trigger-autocast",
        torch.bfloat16,
        output_dtypes=(torch.bfloat16, torch.float32),
    )


def test_trigger_broadcasts_p_prev_and_matches_without_grad():
    # the first post-prelude layer starts from p = all-ones (K,); under no_grad the result is the same
    q, k, v, _, eta, bank_weight, bank_bias = trigger_inputs((3, 5), 16, 8, torch.float32, seed=6)
    ones = torch.ones(8, device=DEVICE)
    with torch.no_grad():
        c, p = kernels.trigger_step(q, k, v, ones, eta, bank_weight, bank_bias)
    c_ref, p_ref = nirvana.trigger_step(q, k, v, ones.expand(3, 5, 8), eta, bank_weight, bank_bias)
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-5)


def test_trigger_rejects_bad_shapes():
    q, k, v, p_prev, eta, bank_weight, bank_bias = trigger_inputs((4,), 16, 8, torch.float32, seed=7)
    with pytest.raises(ValueError, match="bank_weight must be"):
        kernels.trigger_step(q, k, v, p_prev, eta, bank_weight[:, :8], bank_bias)
    with pytest.raises(ValueError, match="p_prev must end in K"):
        kernels.trigger_step(q, k, v, p_prev[:, :4], eta, bank_weight, bank_bias)
    with pytest.raises(ValueError, match="q, k, v must share one shape"):
        kernels.trigger_step(q, k[:, :8], v, p_prev, eta, bank_weight, bank_bias)


# ------------------------------------------------------------------------------------------------------
# Inside the model: the tiny Nirvana with these two kernels gives the torch backend's loss and gradients


def tiny_model_loss_and_gradients(**config):
    """nirvana-tiny (window 24) on a random batch of 2 x 40 tokens: model, batch, loss and gradients."""
    torch.manual_seed(0)
    config = nirvana.NirvanaConfig.from_preset("nirvana-tiny", window=24, **config)
    model = nirvana.Nirvana(config).to(DEVICE)
    idx = torch.randint(0, config.vocab_size, (2, 40), device=DEVICE)
    _, loss = model(idx, idx)
    return model, idx, loss, torch.autograd.grad(loss, list(model.parameters()))


def assert_same_loss_and_gradients(forward, model, idx, reference_loss, reference_grads, key):
    """forward (the model, or the compiled model) gives the reference loss and parameter gradients."""
    _, loss = forward(idx, idx)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-5)
    for (name, _), g, r in zip(model.named_parameters(), grads, reference_grads):
        assert_close(g, r, torch.float32, (key, "d" + name))


def test_tiny_model_with_kernels_matches_torch_backend():
    model, idx, loss, grads = tiny_model_loss_and_gradients()
    kernel_ops = nirvana.with_ops(
        nirvana.TORCH_OPS,
        sliding_window_attention=kernels.sliding_window_attention,
        trigger_step=kernels.trigger_step,
    )
    swapped = 0
    for module in model.modules():
        if getattr(module, "ops", None) is nirvana.TORCH_OPS:
            module.ops = kernel_ops
            swapped += 1
    assert swapped > 0, "no module uses nirvana.TORCH_OPS: the model's backend wiring changed"
    assert_same_loss_and_gradients(model, model, idx, loss, grads, "tiny-model")


def test_compiled_model_matches_eager():
    # torch.compile (train.py --compile) runs the kernels between its graphs: same loss and gradients as eager
    model, idx, loss, grads = tiny_model_loss_and_gradients(backend="triton")
    assert_same_loss_and_gradients(torch.compile(model), model, idx, loss, grads, "compiled-model")
