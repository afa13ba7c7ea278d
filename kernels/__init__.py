"""Triton kernels for Nirvana's three hot functions, with the signatures of their PyTorch references in
nirvana.py (see nirvana.load_backend):

  gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None)
  sliding_window_attention(q, k, v, window, scale=None)
  trigger_step(q, k, v, p_prev, eta, bank_weight, bank_bias, detach_inner_grad=False)

Each works on CUDA tensors, or on the CPU when TRITON_INTERPRET=1 is set before triton is imported.
"""
from kernels.gated_delta_rule import gated_delta_rule
from kernels.sliding_window_attention import sliding_window_attention
from kernels.trigger import trigger_step

__all__ = ["gated_delta_rule", "sliding_window_attention", "trigger_step"]
