"""Pallas kernels of HydraHead-JAX, one package per op (reference + one module per backend + glue + bench).

Importing ``pallas_kernels`` registers the 'pallas' implementation of ``hydrahead_jax.ops.gated_delta_rule``.
"""

from pallas_kernels import gated_delta_rule  # noqa: F401  (registers 'pallas')
