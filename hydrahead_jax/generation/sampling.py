"""Next-token choice from logits: greedy, or temperature / top-k / top-p (nucleus) sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits_BxV: jax.Array, top_k, top_p) -> jax.Array:
  """Logits outside the top-k (``top_k`` <= 0: no limit) or outside the smallest set of tokens whose probability
  reaches ``top_p`` (1: no limit) set to -inf. ``top_k``/``top_p`` may be traced scalars (no recompiles)."""
  V = logits_BxV.shape[-1]
  sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
  in_k_V = jnp.arange(V) < k
  sorted_BxV = jnp.where(in_k_V, sorted_BxV, -jnp.inf)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  keep_BxV = (jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < top_p) & in_k_V
  n_B = jnp.maximum(keep_BxV.sum(-1), 1)  # the most likely token always stays
  threshold_Bx1 = jnp.take_along_axis(sorted_BxV, (n_B - 1)[:, None], axis=-1)
  return jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, -jnp.inf)


def sample_logits(logits_BxV: jax.Array, key: jax.Array, temperature, top_k, top_p, *, greedy: bool) -> jax.Array:
  """Token ids [B] int32: argmax when ``greedy``, else a draw from softmax(filtered logits / temperature)."""
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  return jax.random.categorical(key, filter_logits(logits_BxV, top_k, top_p), axis=-1).astype(jnp.int32)
