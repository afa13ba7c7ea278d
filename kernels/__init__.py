"""Triton kernels for Nirvana's three hot functions, with the signatures of their PyTorch references in
nirvana.py (see nirvana.load_backend):

  gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None)
  sliding_window_attention(q, k, v, window, scale=None)
  trigger_step(q, k, v, p_prev, eta, bank_weight, bank_bias, detach_inner_grad=False)

Each works on CUDA tensors, or on the CPU when TRITON_INTERPRET=1 is set before triton is imported.
The other fast paths of the model are modules beside these: causal_conv (the short convolution with its
SiLU), l2_norm (q and k's L2 norm), rms_norm (the pre-norms and gated_rms_norm), swiglu (SwiGLU's output
projection), linear_cross_entropy, trigger_decode (the Trigger step of a few tokens without gradients, for
decoding, which falls back to trigger_step) and decode (the one-token steps of the delta rule and of attention
over the ring buffer); nirvana.load_backend puts them all in the backend's table.
"""

import torch

from kernels import gated_delta_rule as _gated_delta_rule
from kernels import sliding_window_attention as _sliding_window_attention
from kernels import trigger as _trigger

# torch.compile runs each of them as it is, between two compiled graphs: traced, inductor would recompile the
# Triton kernels inside with its own argument types (a Python float becomes float64) and stop at host-side shapes
gated_delta_rule = torch.compiler.disable(_gated_delta_rule.gated_delta_rule)
sliding_window_attention = torch.compiler.disable(_sliding_window_attention.sliding_window_attention)
trigger_step = torch.compiler.disable(_trigger.trigger_step)

__all__ = ["gated_delta_rule", "sliding_window_attention", "trigger_step"]
