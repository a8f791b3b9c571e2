"""Ops: the gated delta rule (reference forms + registry of kernel implementations)."""

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
