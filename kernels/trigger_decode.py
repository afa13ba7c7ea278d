"""The Trigger's CL-OGD step for a few tokens without gradients (decoding), in closed form.

nirvana.trigger_step computes it with autograd; the fused kernel (kernels/trigger.py) gives each program a
block of tokens and loops over the K bank blocks: at one token per sequence (N = batch size) a handful of
programs run the whole loop. Here the same step is a few batched products
over all K blocks at once, in float32, with the gradient of eq.(4) written out (no autograd), for N tokens
(each its own p):
  A_k = W_k k~ + b_k  (N, K, d_t);   z = A p;   y = LN(z);   f = k~ + y            eq.(6), eq.(3)
  dL/df = 2 (f - v~);   dL/dz = rstd (dL/df - mean(dL/df) - y mean(dL/df * y))     LN's backward
  dL/dp = A^T dL/dz;    p = p_prev - eta dL/dp;   c = q~ + LN(sum_k p_k (W_k q~ + b_k))   eq.(4), (5), (2)
trigger_step sends calls that need no gradient and have at most CLOSED_FORM_TOKENS tokens here, all others to
the fused kernel. test_kernels_fused.py compares the closed form with nirvana.trigger_step.
"""

import torch

import kernels

CLOSED_FORM_TOKENS = 256  # (N, K, d_t) float32 of A: 4 MiB at d_t = K = 64
LAYER_NORM_EPS = 1e-5  # F.layer_norm's default, as nirvana.fast_weight_function uses it


def trigger_step_closed_form(q, k, v, p_prev, eta, bank_weight, bank_bias):
    """nirvana.trigger_step without autograd. q, k, v (..., d_t); p_prev (..., K); eta (...,); bank_weight
    (K, d_t, d_t); bank_bias (K, d_t) -> c (..., d_t) in q's dtype, p (..., K) in the dtype of
    p_prev - eta grad.
    Computed in float32 (float64 inputs in float64)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    c_dtype = q.dtype
    p_dtype = torch.promote_types(torch.promote_types(p_prev.dtype, eta.dtype), q.dtype)  # p_prev - eta grad
    d_t, K = q.shape[-1], p_prev.shape[-1]
    lead = q.shape[:-1]
    q, k, v = (x.reshape(-1, d_t).to(dtype) for x in (q, k, v))  # (N, d_t)
    p_prev, eta = p_prev.reshape(-1, K).to(dtype), eta.reshape(-1, 1).to(dtype)  # (N, K), (N, 1)
    weight, bias = bank_weight.to(dtype), bank_bias.to(dtype)

    def bank_applied(x):  # A_k = W_k x + b_k: (N, K, d_t)
        return torch.einsum("kij,nj->nki", weight, x) + bias

    def layer_norm(z):  # (y, rstd), no affine
        mean = z.mean(-1, keepdim=True)
        rstd = torch.rsqrt((z - mean).square().mean(-1, keepdim=True) + LAYER_NORM_EPS)
        return (z - mean) * rstd, rstd

    A = bank_applied(k)
    y, rstd = layer_norm(torch.einsum("nki,nk->ni", A, p_prev))  # eq.(6) at p_prev
    df = 2 * (k + y - v)  # dL/df, eq.(3)
    dz = rstd * (df - df.mean(-1, keepdim=True) - y * (df * y).mean(-1, keepdim=True))
    p = p_prev - eta * torch.einsum("nki,ni->nk", A, dz)  # eq.(4), (5)
    c = q + layer_norm(torch.einsum("nki,nk->ni", bank_applied(q), p))[0]  # eq.(2)
    return c.to(c_dtype).reshape(*lead, d_t), p.to(p_dtype).reshape(*lead, K)


@torch.compiler.disable  # under torch.compile it runs as it is, between two graphs (as the kernels do)
def trigger_step(q, k, v, p_prev, eta, bank_weight, bank_bias, detach_inner_grad=False):
    """kernels.trigger_step's signature: the closed form for a few tokens without gradients, else the
    fused kernel."""
    inputs = (q, k, v, p_prev, eta, bank_weight, bank_bias)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    if not needs_grad and q.numel() <= CLOSED_FORM_TOKENS * q.shape[-1]:
        return trigger_step_closed_form(*inputs)
    return kernels.trigger_step(*inputs, detach_inner_grad=detach_inner_grad)
