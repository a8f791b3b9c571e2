"""The reference every Pallas backend matches: the pure-JAX op of ``hydrahead_jax.ops``."""

from hydrahead_jax.ops.gated_delta_rule import gated_delta_rule
from hydrahead_jax.ops.gdn_chunked import gdn_chunked
from hydrahead_jax.ops.gdn_recurrent import gdn_recurrent

__all__ = ["gated_delta_rule", "gdn_chunked", "gdn_recurrent"]
