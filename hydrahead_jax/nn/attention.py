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
from hydrahead_jax.ops.packed_attention import attend_segments, pallas_packed_attention, segment_mask
from hydrahead_jax.parallel.context import context_attention, context_size
from hydrahead_jax.sharding import constrain, per_shard

SHARD_B = ("batch", None, None, None)  # batch rows only (heads whole)
SEGMENTS_B = ("batch", None)


def attention_implementation(requested: str | None, dtype) -> str:
  """cuDNN flash attention on GPU for half-precision inputs (jax's own default is the O(T^2) XLA path)."""
  if requested is not None:
    return requested
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if half and jax.default_backend() == "gpu" else "xla"


def cached_key_block(T: int) -> int:
  """Cache slots per block when a chunk of T > 1 new tokens attends to the cache: the chunk length clamped to
  [8, 1024] (scores held at a time: [B, heads, T, block] float32)."""
  return max(8, min(T, 1024))


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
                                         implementation=impl,
                                         packed_implementation=self.cfg.fa_packed_implementation,
                                         algorithm=self.cfg.fa_context_algorithm), HEADS_NAMES)
    attend = lambda q, k, v, m: (jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, mask=m, is_causal=True, scale=scale, implementation=impl),)
    if impl == "cudnn":
      # Per batch-row shard. jax's cuDNN attention partitioner failed on 2 H100s (jax 0.11.2: "'GSPMDSharding'
      # object has no attribute 'spec'", as in jax-ml/jax#21584); inside shard_map it is not consulted.
      attend = per_shard(attend, (SHARD_B,) * 4, (SHARD_B,))
    args = (q_BxTxHfxK, k_BxTxGfxK, v_BxTxGfxK)
    if segment_ids_BxT is None:
      (o_BxTxHfxK,) = attend(*args, None)
    elif impl == "cudnn":
      # cuDNN takes a mask as a dense [B, 1, T, T] bias: O(T^2) memory and a slower kernel (all-FA training at
      # 8K-64K ran 1.5-2x slower on an H200 with segment ids of one document than without; a 7:1 hybrid at 256K
      # asked for 222 GiB). When every row holds one document (long-context rows, benchmarks) the mask changes
      # nothing: skip it at run time. Packed rows take segment-aware Pallas flash attention (no T x T tensor),
      # or the dense mask for short T (``packed_implementation``); the mask is built inside its branch only.
      pallas = per_shard(lambda q, k, v, s: (pallas_packed_attention(q, k, v, s, scale=scale),),
                         (SHARD_B,) * 3 + (SEGMENTS_B,), (SHARD_B,))
      (o_BxTxHfxK,) = attend_segments(segment_ids_BxT, self.cfg.fa_packed_implementation,
                                      no_mask=lambda: attend(*args, None),
                                      pallas=lambda: pallas(*args, segment_ids_BxT),
                                      masked=lambda: attend(*args, segment_mask(segment_ids_BxT)))
    else:
      (o_BxTxHfxK,) = attend(*args, segment_mask(segment_ids_BxT))
    return constrain(o_BxTxHfxK, HEADS_NAMES)

  def attend_cached(self, q, k, v, *, cos_sin, cache_k, cache_v, length, start_B, valid_BxT):
    """Attention of T new tokens (slots [length, length + T)) over a KV cache and themselves: chunked prefill,
    and decoding with T = 1.

    q [B, T, Hf, K], k and v [B, T, Gf, K] are the projected new tokens; cache_k / cache_v [B, S, Gf, K] hold
    keys (after QK-norm and RoPE) and values of earlier slots, of which [start_B[b], length) are row b's real
    tokens (left padding before). Among the new tokens attention is causal and skips those with ``valid_BxT``
    False (padding; each still sees itself). One softmax over both parts; the cache is only read: for T = 1 in
    one masked pass over all S slots, for a chunk (T > 1) block by block over the filled slots only (online
    softmax, ``cached_key_block``), so a prefill costs causal attention and holds [T, block] scores. Returns
    (o [B, T, Hf, K], the new tokens' keys and values [B, T, Gf, K]) for the caller to write at ``length``.
    """
    q_BxTxHfxK, k_BxTxGfxK = q, k
    if self.q_norm is not None:
      q_BxTxHfxK, k_BxTxGfxK = self.q_norm(q_BxTxHfxK), self.k_norm(k_BxTxGfxK)
    q_BxTxHfxK = apply_rope(q_BxTxHfxK, *cos_sin)
    k_BxTxGfxK = apply_rope(k_BxTxGfxK, *cos_sin).astype(cache_k.dtype)
    v_BxTxGfxK = v.astype(cache_v.dtype)
    B, T, Hf, K = q_BxTxHfxK.shape
    G, S, dt, f32 = k_BxTxGfxK.shape[2], cache_k.shape[1], cache_k.dtype, jnp.float32
    q_BxTxGxRxK = q_BxTxHfxK.reshape(B, T, G, Hf // G, K).astype(dt)
    scale = self.cfg.head_dim**-0.5

    def scores(keys_BxSxGxK):
      return jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, keys_BxSxGxK, preferred_element_type=f32) * scale

    def values(p_BxGxRxTxS, values_BxSxGxK):
      return jnp.einsum("bgrts,bsgk->bgrtk", p_BxGxRxTxS.astype(dt), values_BxSxGxK, preferred_element_type=f32)

    def old_block(carry, first, size, lo):
      """Online-softmax update with cache slots [first, first + size), of which those >= lo count."""
      m_BxGxRxT, l_BxGxRxT, acc_BxGxRxTxK = carry
      slot_S = first + jnp.arange(size, dtype=jnp.int32)
      keep_BxS = (slot_S >= lo) & (slot_S < length) & (slot_S >= start_B[:, None])
      s = jnp.where(keep_BxS[:, None, None, None, :], scores(jax.lax.dynamic_slice_in_dim(cache_k, first, size, 1)),
                    -jnp.inf)
      m_new = jnp.maximum(m_BxGxRxT, s.max(-1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.exp(s - m_safe[..., None])
      corr = jnp.exp(m_BxGxRxT - m_safe)
      acc = acc_BxGxRxTxK * corr[..., None] + values(p, jax.lax.dynamic_slice_in_dim(cache_v, first, size, 1))
      return m_new, l_BxGxRxT * corr + p.sum(-1), acc

    init = (jnp.full((B, G, Hf // G, T), -jnp.inf, f32), jnp.zeros((B, G, Hf // G, T), f32),
            jnp.zeros((B, G, Hf // G, T, K), f32))
    if T == 1:
      m_old, l_old, acc_old = old_block(init, 0, S, 0)
    else:
      blk = min(S, cached_key_block(T))
      m_old, l_old, acc_old = jax.lax.fori_loop(  # only the blocks holding slots < length; the last one clamped
          0, (length + blk - 1) // blk, lambda i, c: old_block(c, jnp.minimum(i * blk, S - blk), blk, i * blk), init)
    causal_TxT = jnp.tril(jnp.ones((T, T), bool))
    new_Bx1x1xTxT = (causal_TxT & (valid_BxT[:, None, :] | jnp.eye(T, dtype=bool)))[:, None, None]
    s_new = jnp.where(new_Bx1x1xTxT, scores(k_BxTxGfxK), -jnp.inf)
    m_BxGxRxT = jnp.maximum(m_old, s_new.max(-1))  # finite: every query sees itself
    p_new = jnp.exp(s_new - m_BxGxRxT[..., None])
    corr = jnp.exp(m_old - m_BxGxRxT)
    denom_BxGxRxT = l_old * corr + p_new.sum(-1)
    o_BxGxRxTxK = (acc_old * corr[..., None] + values(p_new, v_BxTxGfxK)) / denom_BxGxRxT[..., None]
    o_BxTxHfxK = jnp.transpose(o_BxGxRxTxK, (0, 3, 1, 2, 4)).reshape(B, T, Hf, K).astype(q.dtype)
    return constrain(o_BxTxHfxK, HEADS_NAMES), k_BxTxGfxK, v_BxTxGfxK
