"""Lowering of Pallas Triton kernels for CUDA from any machine, with every Triton module verified.

Catches Triton-lowering errors (non-power-of-two tensor sizes, unsupported primitives) without a GPU: lowering a
jitted function with ``lowering_platforms=('cuda',)`` builds the Triton IR of every kernel, which is then run
through the MLIR verifier (Triton's op verifiers); only the Triton -> PTX compile needs a GPU. Used by the tests of
every op (``short_conv/lower_check.py`` adds that op's model-shape check and a command line).
"""

from __future__ import annotations

import contextlib

import jax


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


def lower_for_cuda(fn, *args):
  """``jax.jit(fn)`` traced on ``args`` (arrays or ShapeDtypeStructs) and lowered for 'cuda'; the Lowered."""
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
