"""The hybrid cache: K/V for the FA groups only, a fixed-size Gated DeltaNet state for the LA heads.

Per layer (``LayerCache``; a stacked segment's arrays carry a leading ``layers`` axis, so decoding scans too):
  k, v     [B, S, Gf, K]   FA keys (after QK-norm and RoPE) and values, S = the cache's slot count;
  state    [B, Hs, K, K]   float32 delta-rule states of the LA heads (Hs = Hl, or one per LA KV group with
                           la_sharing='kv_gates', whose heads share k, v and gates: ``cfg.num_la_states``);
  conv_q/k/v [B, W-1, Hl, K] the last W-1 pre-conv inputs of the LA q, k, v (the short conv's history).
A layer without FA groups has k = v = None; one without LA heads has state = conv_* = None. Nothing is stored
per token for LA heads.

``HybridCache`` adds ``length`` (int32 scalar: slots written, the same for every row) and ``pos`` ([B] int32: real
tokens of each row so far = RoPE position of its next token). Prompts are LEFT-padded: row b's slots
[0, length - pos[b]) are padding (never attended, no-ops for the LA state), so every row's newest token sits in
the same slot and one scalar write index serves the whole batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hydrahead_jax.config import ModelConfig


class LayerCache(NamedTuple):
  k: jax.Array | None
  v: jax.Array | None
  state: jax.Array | None
  conv_q: jax.Array | None
  conv_k: jax.Array | None
  conv_v: jax.Array | None


class HybridCache(NamedTuple):
  layers: tuple[LayerCache, ...]  # one per segment of ``plan_segments(cfg)``
  length: jax.Array  # int32 []: slots written
  pos: jax.Array  # int32 [B]: real tokens per row


def _segments(cfg: ModelConfig):
  from hydrahead_jax.nn.model import plan_segments

  return plan_segments(cfg)


def init_cache(cfg_or_model, batch_size: int, max_length: int, dtype=None) -> HybridCache:
  """An empty cache for ``batch_size`` rows and ``max_length`` slots (prompt padding + generated tokens).

  ``dtype``: of K/V and conv tails (default the model's compute dtype); the LA state is always float32.
  """
  cfg = getattr(cfg_or_model, "cfg", cfg_or_model)
  if batch_size < 1 or max_length < 1:
    raise ValueError(f"init_cache: batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
  dt = jnp.dtype(dtype or cfg.dtype)
  B, S, K, W1 = batch_size, max_length, cfg.head_dim, cfg.la_conv_size - 1
  layers = []
  for seg in _segments(cfg):
    lead = (seg.length,) if seg.stacked else ()
    gf = seg.num_fa_groups
    hl, hkv = cfg.num_la_heads(seg.start), cfg.num_la_kv_heads(seg.start)  # q tails per head, k/v per k/v head
    hs = cfg.num_la_states(seg.start)
    zeros = lambda *shape, d=dt: jnp.zeros(lead + shape, d)  # noqa: E731
    kv = (zeros(B, S, gf, K), zeros(B, S, gf, K)) if gf else (None, None)
    la = ((zeros(B, hs, K, K, d=jnp.float32), zeros(B, W1, hl, K), zeros(B, W1, hkv, K), zeros(B, W1, hkv, K)) if hl
          else (None,) * 4)
    layers.append(LayerCache(*kv, *la))
  return HybridCache(tuple(layers), jnp.zeros((), jnp.int32), jnp.zeros((B,), jnp.int32))


def cache_nbytes(cache: HybridCache) -> int:
  """Bytes held by a cache (all arrays)."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)))


def cache_bytes(cfg: ModelConfig, length: int, batch_size: int = 1, dtype=None) -> dict[str, int]:
  """Cache size for ``length`` tokens per row, from the config alone: {'per_token': FA K/V bytes per token
  and row, 'fixed': LA state + conv tails per row (independent of length), 'total': all rows at ``length``}."""
  item = np.dtype(jnp.dtype(dtype or cfg.dtype)).itemsize
  K, W1 = cfg.head_dim, cfg.la_conv_size - 1
  per_token = fixed = 0
  for i in range(cfg.num_layers):
    gf = cfg.num_fa_groups(i)
    hl, hkv, hs = cfg.num_la_heads(i), cfg.num_la_kv_heads(i), cfg.num_la_states(i)
    per_token += 2 * gf * K * item
    fixed += hs * K * K * 4 + (hl + 2 * hkv) * W1 * K * item
  return {"per_token": per_token, "fixed": fixed, "total": batch_size * (per_token * int(length) + fixed)}
