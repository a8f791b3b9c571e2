"""Chunked gated delta rule in Pallas: forward and backward kernels under ``jax.custom_vjp``.

  reference.py   the pure-JAX op (what every backend must match)
  chunk_math.py  in-kernel math of one chunk, shared by the backends
  gpu_triton.py  Pallas Triton kernels (GPU; also Pallas interpret mode on CPU)
  tpu.py         Pallas Mosaic TPU kernels (checked in TPU interpret mode on CPU)
  ops.py         padding, gate/segment preparation, custom_vjp, backend choice
  bench.py       GPU timing helpers (used by benchmarks/bench_gdn.py)
"""

from pallas_kernels.gated_delta_rule.ops import gated_delta_rule_pallas, gdn_pallas_impl


def register() -> None:
  """Register ``implementation='pallas'`` with ``hydrahead_jax.ops.gated_delta_rule``."""
  from hydrahead_jax.ops import register_gdn_implementation
  register_gdn_implementation("pallas", gdn_pallas_impl)


register()

__all__ = ["gated_delta_rule_pallas", "gdn_pallas_impl", "register"]
