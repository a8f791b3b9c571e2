"""Parallelism beyond the rule table: context parallelism along the 'context' mesh axis (``context``)."""

from hydrahead_jax.parallel.context import (context_attention, context_conv, context_gated_delta_rule,
                                            context_size)

__all__ = ["context_attention", "context_conv", "context_gated_delta_rule", "context_size"]
