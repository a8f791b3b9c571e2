"""Full softmax attention for a layer's FA groups: GQA, QK RMSNorm (Qwen3), RoPE, causal and segment masks.

Shape letters: B batch, T length, D model, Hf FA query heads, Gf FA KV groups, K head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from hydrahead_jax.config import ModelConfig
from hydrahead_jax.nn.layers import HEADS_NAMES, RMSNorm, apply_rope, fan_in_normal, make_param, project
from hydrahead_jax.parallel.context import context_attention, context_size
from hydrahead_jax.sharding import constrain, per_shard

SHARD_B = ("batch", None, None, None)  # batch rows only (heads whole)


def segment_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """[B, 1, T, T] boolean: query and key belong to the same document."""
  return (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]


def attention_implementation(requested: str | None, dtype) -> str:
  """cuDNN flash attention on GPU for half-precision inputs (jax's own default is the O(T^2) XLA path)."""
  if requested is not None:
    return requested
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if half and jax.default_backend() == "gpu" else "xla"


class FullAttention(nnx.Module):
  """Causal softmax GQA with QK RMSNorm (Qwen3) and RoPE, for the first ``num_groups`` groups."""

  def __init__(self, cfg: ModelConfig, num_groups: int, *, rngs: nnx.Rngs):
    D, K, r, pd = cfg.d_model, cfg.head_dim, cfg.heads_per_group, cfg.param_dtype
    self.cfg = cfg
    self.wq = make_param(rngs, fan_in_normal(D), (D, num_groups * r, K), ("embed", "heads", "head_dim"), pd)
    self.wk = make_param(rngs, fan_in_normal(D), (D, num_groups, K), ("embed", "kv_heads", "head_dim"), pd)
    self.wv = make_param(rngs, fan_in_normal(D), (D, num_groups, K), ("embed", "kv_heads", "head_dim"), pd)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(K, eps=cfg.rms_eps, names=("head_dim",), param_dtype=pd, rngs=rngs)
      self.k_norm = RMSNorm(K, eps=cfg.rms_eps, names=("head_dim",), param_dtype=pd, rngs=rngs)
    else:
      self.q_norm = self.k_norm = None

  def projections(self) -> dict[str, jax.Array]:
    """Input projection weights by the name of attend()'s argument."""
    return {"q": self.wq[...], "k": self.wk[...], "v": self.wv[...]}

  def __call__(self, x_BxTxD, cos_sin, segment_ids_BxT):
    return self.attend(**project(x_BxTxD, self.projections(), self.cfg.dtype), cos_sin=cos_sin,
                       segment_ids_BxT=segment_ids_BxT)

  def attend(self, q, k, v, *, cos_sin, segment_ids_BxT):
    """Attention output [B, T, Hf, K] from the projected q [B, T, Hf, K], k and v [B, T, Gf, K]."""
    q, k, v = (checkpoint_name(x, "mixer_proj") for x in (q, k, v))  # remat 'save_proj' (nn/model.py)
    q_BxTxHfxK, k_BxTxGfxK, v_BxTxGfxK = q, k, v
    if self.q_norm is not None:
      q_BxTxHfxK, k_BxTxGfxK = self.q_norm(q_BxTxHfxK), self.k_norm(k_BxTxGfxK)
    q_BxTxHfxK = apply_rope(q_BxTxHfxK, *cos_sin)
    k_BxTxGfxK = apply_rope(k_BxTxGfxK, *cos_sin)
    impl = attention_implementation(self.cfg.fa_implementation, q_BxTxHfxK.dtype)
    scale = self.cfg.head_dim**-0.5
    if context_size() > 1:  # the sequence is split over the 'context' mesh axis (parallel/context.py)
      return constrain(context_attention(q_BxTxHfxK, k_BxTxGfxK, v_BxTxGfxK, segment_ids_BxT, scale=scale,
                                         implementation=impl), HEADS_NAMES)
    mask = None if segment_ids_BxT is None else segment_mask(segment_ids_BxT)
    attend = lambda q, k, v, m: (jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, mask=m, is_causal=True, scale=scale, implementation=impl),)
    if impl == "cudnn":
      # Per batch-row shard. jax's cuDNN attention partitioner failed on 2 H100s (jax 0.11.2: "'GSPMDSharding'
      # object has no attribute 'spec'", as in jax-ml/jax#21584); inside shard_map it is not consulted.
      attend = per_shard(attend, (SHARD_B,) * 4, (SHARD_B,))
    (o_BxTxHfxK,) = attend(q_BxTxHfxK, k_BxTxGfxK, v_BxTxGfxK, mask)
    return constrain(o_BxTxHfxK, HEADS_NAMES)

  def attend_cached(self, q, k, v, *, cos_sin, cache_k, cache_v, length, start_B):
    """Attention of T new tokens over a KV cache (chunked prefill, T = 1 for decoding).

    q [B, T, Hf, K], k and v [B, T, Gf, K] are the projected new tokens, which occupy cache slots
    [length, length + T); cache_k / cache_v [B, S, Gf, K] hold keys (after QK-norm and RoPE) and values of the
    earlier slots. Slots before ``start_B[b]`` are row b's left padding: never attended (a padding query sees
    only itself). Returns (o [B, T, Hf, K], cache_k, cache_v) with the new tokens written. The XLA attention runs
    over all S slots under a mask, so one compiled shape serves every length.
    """
    q_BxTxHfxK, k_BxTxGfxK = q, k
    if self.q_norm is not None:
      q_BxTxHfxK, k_BxTxGfxK = self.q_norm(q_BxTxHfxK), self.k_norm(k_BxTxGfxK)
    q_BxTxHfxK = apply_rope(q_BxTxHfxK, *cos_sin)
    k_BxTxGfxK = apply_rope(k_BxTxGfxK, *cos_sin)
    cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k_BxTxGfxK.astype(cache_k.dtype), length, axis=1)
    cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), length, axis=1)
    T, S = q_BxTxHfxK.shape[1], cache_k.shape[1]
    slot_1xTx1 = (length + jnp.arange(T, dtype=jnp.int32))[None, :, None]
    slot_1x1xS = jnp.arange(S, dtype=jnp.int32)[None, None, :]
    mask_BxTxS = (slot_1x1xS <= slot_1xTx1) & ((slot_1x1xS >= start_B[:, None, None]) | (slot_1x1xS == slot_1xTx1))
    o_BxTxHfxK = jax.nn.dot_product_attention(q_BxTxHfxK, cache_k.astype(q_BxTxHfxK.dtype),
                                              cache_v.astype(q_BxTxHfxK.dtype), mask=mask_BxTxS[:, None],
                                              scale=self.cfg.head_dim**-0.5, implementation="xla")
    return constrain(o_BxTxHfxK, HEADS_NAMES), cache_k, cache_v
