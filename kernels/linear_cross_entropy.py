"""The language-model loss without its logits: nirvana.linear_cross_entropy chunk by chunk.

nirvana.linear_cross_entropy forms all N x vocab logits, then their float32 copy, the float32 softmax autograd
saves for backward and, in backward, its float32 and 16-bit gradients: at N = 4 x 4096 tokens and a
32000-token vocabulary, each float32 copy is 2 GiB. Here one program of plain PyTorch runs over the tokens in
chunks of about CHUNK_BYTES of float32 logits; for each chunk it forms the logits at the matmul's precision,
their float32 log-softmax, the chunk's share of the loss and, when a gradient is wanted, the gradients of h
and W right away:
  dlogits = (softmax(logits) - onehot(target)) / n_valid   (zero on ignored rows), in the matmul's dtype
  dh = dlogits W,   dW += dlogits^T h   (dW summed over the chunks in float32)
so backward only scales the saved dh and dW by the loss's gradient. At most one chunk's logits exist at a
time. Same values as the reference up to rounding (test_kernels_fused.py compares them in float32 and bf16).
"""

import torch

CHUNK_BYTES = 256 * 2**20  # float32 logits of one chunk: 2048 tokens of a 32000-token vocabulary


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, dtype, chunk_size, grad_enabled):
        # h (N, D) and weight (V, D) in their own dtypes, computed in `dtype` (autocast's, else h's)
        N, V = h.shape[0], weight.shape[0]
        want_dh, want_dweight = (grad_enabled and ctx.needs_input_grad[i] for i in (0, 1))
        with torch.autocast(h.device.type, enabled=False):
            h_c, weight_c = h.to(dtype), weight.to(dtype)
            valid = targets != -1
            n_valid = valid.sum()
            loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
            dh = torch.empty_like(h) if want_dh else None
            dweight = (
                torch.zeros(V, weight.shape[1], dtype=torch.float32, device=h.device)
                if want_dweight
                else None
            )
            for start in range(0, N, chunk_size):
                rows = slice(start, min(start + chunk_size, N))
                # log-softmax of the logits in float32, read from the matmul's output in one pass: (n, V)
                log_probs = torch.log_softmax(h_c[rows] @ weight_c.T, dim=-1, dtype=torch.float32)
                target = targets[rows].clamp(min=0)[:, None]
                chunk_valid = valid[rows]
                loss_sum -= torch.where(chunk_valid, log_probs.gather(1, target).squeeze(1), 0.0).sum()
                if not (want_dh or want_dweight):
                    continue
                dlogits = log_probs.exp_()  # softmax, in place
                dlogits.scatter_add_(1, target, torch.full_like(target, -1, dtype=dlogits.dtype))
                dlogits = dlogits.mul_((chunk_valid / n_valid)[:, None]).to(dtype)  # d(mean loss)/dlogits
                if want_dh:
                    dh[rows] = dlogits @ weight_c
                if want_dweight:
                    dweight += (dlogits.T @ h_c[rows]).float()
        ctx.save_for_backward(dh, dweight)
        ctx.weight_dtype = weight.dtype
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dweight = ctx.saved_tensors
        dh = None if dh is None else dh * grad_loss
        dweight = None if dweight is None else (dweight * grad_loss).to(ctx.weight_dtype)
        return dh, dweight, None, None, None, None


@torch.compiler.disable  # under torch.compile it runs as it is, between two graphs (as the Triton kernels do)
def chunked_linear_cross_entropy(h, weight, targets, chunk_size=None):
    """nirvana.linear_cross_entropy(h, weight, targets) without all the logits at once.

    h (N, d_model), weight (vocab, d_model), targets (N,) with -1 = ignore -> the mean cross-entropy, float32.
    chunk_size: tokens per chunk; default CHUNK_BYTES of float32 logits. Gradients of h and W are returned in
    their dtypes (dW summed in float32).
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(
            f"h (N, D) and weight (vocab, D) expected, got {tuple(h.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != h.shape[:1]:
        raise ValueError(f"targets must have shape ({h.shape[0]},), got {tuple(targets.shape)}")
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    chunk_size = chunk_size or max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    grad_enabled = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, targets, dtype, chunk_size, grad_enabled)
