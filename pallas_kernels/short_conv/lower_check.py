"""Lower the short-conv kernels (forward + backward, under jit(value_and_grad)) for CUDA from any machine.

Catches Triton-lowering errors (non-power-of-two tiles, unsupported primitives) without a GPU: lowering builds the
Triton IR of every kernel, which is then run through the MLIR verifier (Triton's op verifiers, e.g. its
power-of-two tensor sizes; ``pallas_kernels.lower_check``); only the Triton -> PTX compile needs a GPU. Usage:

  python -m pallas_kernels.short_conv.lower_check
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from pallas_kernels import lower_check
from pallas_kernels.lower_check import verified_triton_modules
from pallas_kernels.short_conv import gpu_triton
from pallas_kernels.short_conv.ops import short_conv

# The model's shape per q / k / v: bf16, B=1, T=4096, 14 heads of 128 channels, conv width 4.
B, T, H, K, W = 1, 4096, 14, 128, 4


def lower_for_cuda(head_dim: int | None, segments: bool = True, *, B: int = B, T: int = T, C: int = H * K,
                   W: int = W, dtype=jnp.bfloat16, config: gpu_triton.Config | None = None):
  """jit(value_and_grad) of the op (Triton config, not interpret mode), lowered for 'cuda'; returns the Lowered."""
  cfg = gpu_triton.Config() if config is None else config

  def loss(x, w, sid):
    return jnp.sum(short_conv(x, w, sid, head_dim=head_dim, config=cfg).astype(jnp.float32))

  args = (jax.ShapeDtypeStruct((B, T, C), dtype), jax.ShapeDtypeStruct((W, C), dtype),
          jax.ShapeDtypeStruct((B, T), jnp.int32) if segments else None)
  return lower_check.lower_for_cuda(jax.value_and_grad(loss, argnums=(0, 1)), *args)


def main() -> None:
  for head_dim in (K, None):
    for segments in (True, False):
      t = time.perf_counter()
      with verified_triton_modules() as verified:
        lower_for_cuda(head_dim, segments)
      print(f"head_dim={head_dim} segment_ids={segments}: lowered for cuda, verified Triton modules {verified}, "
            f"{time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
  main()
