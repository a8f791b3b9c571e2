"""Fused scale-normalized fusion of a layer's head outputs in Pallas: forward and backward kernels under custom_vjp.

  reference.py   the pure-JAX op (what every backend must match), written from ScaleNormFusion's math
  gpu_triton.py  Pallas Triton kernels (GPU; also Pallas interpret mode on CPU)
  ops.py         argument checks, per-head scale matrix, row padding, custom_vjp, backend choice
"""

from pallas_kernels.fusion_norm.ops import fused_head_fusion
from pallas_kernels.fusion_norm.reference import fused_head_fusion_reference

__all__ = ["fused_head_fusion", "fused_head_fusion_reference"]
