"""Fused Gated DeltaNet short convolution in Pallas: SiLU(causal depthwise conv) (+ per-head L2 norm), forward
and backward kernels under custom_vjp.

  reference.py   the pure-JAX op (what every backend must match) and the argument checks
  gpu_triton.py  Pallas Triton kernels (GPU; also Pallas interpret mode on CPU); the math and tiling
  ops.py         custom_vjp, backend choice
  lower_check.py lowers the kernels for CUDA from any machine (catches Triton-lowering errors without a GPU)
"""

from pallas_kernels.short_conv.ops import short_conv
from pallas_kernels.short_conv.reference import short_conv_reference

__all__ = ["short_conv", "short_conv_reference"]
