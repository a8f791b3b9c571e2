"""Ops: the gated delta rule (validation, registry of implementations: the pure-JAX references and the Pallas
kernels of ``pallas_kernels.gated_delta_rule``, dispatch)."""

from hydrahead_jax.ops.gated_delta_rule import (
    available_implementations,
    default_implementation,
    gated_delta_rule,
    get_gdn_implementation,
    register_gdn_implementation,
)

__all__ = [
    "available_implementations",
    "default_implementation",
    "gated_delta_rule",
    "get_gdn_implementation",
    "register_gdn_implementation",
]
