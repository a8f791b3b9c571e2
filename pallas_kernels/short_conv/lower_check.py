"""Lower the short-conv kernels (forward + backward, under jit(value_and_grad)) for CUDA from any machine.

Catches Triton-lowering errors (non-power-of-two tiles, unsupported primitives) without a GPU: lowering builds the
Triton IR of every kernel, which is then run through the MLIR verifier (Triton's op verifiers, e.g. its
power-of-two tensor sizes); only the Triton -> PTX compile needs a GPU. Usage:

  python -m pallas_kernels.short_conv.lower_check
"""

from __future__ import annotations

import contextlib
import time

import jax
import jax.numpy as jnp

from pallas_kernels.short_conv import gpu_triton
from pallas_kernels.short_conv.ops import short_conv

# The model's shape per q / k / v: bf16, B=1, T=4096, 14 heads of 128 channels, conv width 4.
B, T, H, K, W = 1, 4096, 14, 128, 4


@contextlib.contextmanager
def verified_triton_modules():
  """Yields a list that collects one entry per Triton module lowered inside, each verified (MLIRError if bad).

  Wraps the Pallas Triton lowering entry point (a jax internal; if it moves, nothing is verified or counted)."""
  try:
    from jax._src.pallas.triton import lowering
  except ImportError:
    yield []
    return
  original = getattr(lowering, "lower_jaxpr_to_triton_module", None)
  names: list[str] = []
  if original is None:
    yield names
    return

  def lower_and_verify(*args, **kwargs):
    result = original(*args, **kwargs)
    result.module.operation.verify()
    names.append(str(result.module.operation.attributes["sym_name"]).strip('"'))
    return result

  lowering.lower_jaxpr_to_triton_module = lower_and_verify
  try:
    yield names
  finally:
    lowering.lower_jaxpr_to_triton_module = original


def lower_for_cuda(head_dim: int | None, segments: bool = True, *, B: int = B, T: int = T, C: int = H * K,
                   W: int = W, dtype=jnp.bfloat16, config: gpu_triton.Config | None = None):
  """jit(value_and_grad) of the op (Triton config, not interpret mode), lowered for 'cuda'; returns the Lowered."""
  cfg = gpu_triton.Config() if config is None else config

  def loss(x, w, sid):
    return jnp.sum(short_conv(x, w, sid, head_dim=head_dim, config=cfg).astype(jnp.float32))

  args = (jax.ShapeDtypeStruct((B, T, C), dtype), jax.ShapeDtypeStruct((W, C), dtype),
          jax.ShapeDtypeStruct((B, T), jnp.int32) if segments else None)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(*args).lower(lowering_platforms=("cuda",))


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
