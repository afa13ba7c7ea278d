"""Property tests of the fused paths against their plain-PyTorch twins in nirvana.py:
kernels.linear_cross_entropy.chunked_linear_cross_entropy vs nirvana.linear_cross_entropy (loss, dh, dW).

    python -m pytest -q test_kernels_fused.py                              # CPU
    NIRVANA_KERNEL_TESTS=cuda python -m pytest -q test_kernels_fused.py    # GPU: larger shapes

Errors are ||out - ref|| / ||ref|| over whole tensors; float32 runs both in float32 (only the summation order
differs), bfloat16 under autocast (both form the logits and their gradient in bf16; dW sums its chunks in
float32 here, in one bf16 product there).
"""
import os

ON_CUDA = os.environ.get("NIRVANA_KERNEL_TESTS", "cpu") == "cuda"
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported

import pytest
import torch
from hypothesis import given, settings, strategies as st

import nirvana
from kernels.linear_cross_entropy import chunked_linear_cross_entropy

DEVICE = "cuda" if ON_CUDA else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}   # worst seen on the CPU: 2e-7, 2.4e-3 (dW)


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def loss_and_grads(loss_fn, h, weight, targets, dtype, **kwargs):
    h, weight = h.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = loss_fn(h, weight, targets, **kwargs)
    loss.backward()
    return loss.detach(), h.grad, weight.grad


@settings(max_examples=30 if ON_CUDA else 15, deadline=None, database=None, derandomize=not ON_CUDA)
@given(N=st.integers(1, 3000 if ON_CUDA else 300), D=st.integers(1, 96), V=st.integers(2, 700),
       chunk_size=st.one_of(st.none(), st.integers(1, 400)), ignored=st.floats(0, 0.9),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_chunked_linear_cross_entropy_matches_reference(N, D, V, chunk_size, ignored, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=generator).to(DEVICE)
    weight = (torch.randn(V, D, generator=generator) * 2 / D ** 0.5).to(DEVICE)
    targets = torch.randint(0, V, (N,), generator=generator)
    targets[torch.rand(N, generator=generator) < ignored] = -1
    targets[0] = int(torch.randint(0, V, ()))                                          # at least one counts
    targets = targets.to(DEVICE)
    expected = loss_and_grads(nirvana.linear_cross_entropy, h, weight, targets, dtype)
    actual = loss_and_grads(chunked_linear_cross_entropy, h, weight, targets, dtype, chunk_size=chunk_size)
    for name, a, e in zip(("loss", "dh", "dW"), actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{name}: {a.dtype} {a.shape} vs {e.dtype} {e.shape}"
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
