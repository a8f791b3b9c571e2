"""The HydraHead mixer: FA and Gated DeltaNet heads inside one layer, one shared output projection.

Head order inside a layer: the ``n_fa`` FA groups come first (their ``n_fa * r`` query heads
contiguous), then the LA heads. Each path runs once on its slice; no Python loop over heads.

Shape letters: B batch, T length, D model, H query heads (Hf FA, Hl LA), K head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hydrahead_jax.config import ModelConfig
from hydrahead_jax.nn.attention import FullAttention
from hydrahead_jax.nn.fusion import ScaleNormFusion, use_fusion_kernel
from hydrahead_jax.nn.gated_deltanet import GatedDeltaNet
from hydrahead_jax.nn.layers import fan_in_normal, make_param, project


class HydraHeadMixer(nnx.Module):
  """One layer's attention: FA groups [0, n_fa) and LA heads for the rest, fused, then W_o."""

  def __init__(self, cfg: ModelConfig, num_fa_groups: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.num_fa_heads = num_fa_groups * cfg.heads_per_group
    self.num_la_heads = cfg.num_heads - self.num_fa_heads
    self.fa = FullAttention(cfg, num_fa_groups, rngs=rngs) if self.num_fa_heads else None
    self.la = GatedDeltaNet(cfg, self.num_la_heads, rngs=rngs) if self.num_la_heads else None
    self.fusion = ScaleNormFusion(cfg, self.num_fa_heads, self.num_la_heads, rngs=rngs)
    H, K, D = cfg.num_heads, cfg.head_dim, cfg.d_model
    self.wo = make_param(rngs, fan_in_normal(H * K), (H, K, D), ("heads", "head_dim", "embed"), cfg.param_dtype)

  def __call__(self, x_BxTxD, cos_sin, segment_ids_BxT, patch=None):
    """Returns (y [B, T, D], raw head outputs [B, T, H, K] before fusion).

    ``patch`` = (mask [H], values [B, T, H, K]) replaces raw head outputs where mask is 1
    (activation patching for head selection).
    """
    dt, Hf = self.cfg.dtype, self.num_fa_heads
    o_fa = o_la = z = None
    if self.fa is not None:
      o_fa = self.fa.attend(**project(x_BxTxD, self.fa.projections(), dt), cos_sin=cos_sin,
                            segment_ids_BxT=segment_ids_BxT)
    if self.la is not None:
      o_la, z = self.la.mix(**project(x_BxTxD, self.la.projections(), dt), segment_ids_BxT=segment_ids_BxT)
      o_la = o_la.astype(dt)
    raw_BxTxHxK = jnp.concatenate([o for o in (o_fa, o_la) if o is not None], axis=2)
    if patch is not None:
      mask_H, values_BxTxHxK = patch
      m = mask_H.astype(raw_BxTxHxK.dtype)[:, None]
      raw_BxTxHxK = raw_BxTxHxK * (1 - m) + values_BxTxHxK.astype(raw_BxTxHxK.dtype) * m
      o_fa = raw_BxTxHxK[:, :, :Hf] if o_fa is not None else None
      o_la = raw_BxTxHxK[:, :, Hf:] if o_la is not None else None
    return self.project_out(self.fuse(o_fa, o_la, z)), raw_BxTxHxK

  def fuse(self, o_fa_BxTxHfxK, o_la_BxTxHlxK, z_BxTxHlxK):
    """Scale-normalized fusion of the raw FA / LA head outputs (either may be None) -> [B, T, H, K]."""
    z_bias = None if z_BxTxHlxK is None else self.la.z_bias[...]
    if use_fusion_kernel(self.cfg):
      return self.fusion.fused(o_fa_BxTxHfxK, o_la_BxTxHlxK, z_BxTxHlxK, z_bias)
    parts = [] if o_fa_BxTxHfxK is None else [self.fusion.fa(o_fa_BxTxHfxK)]
    if o_la_BxTxHlxK is not None:
      parts.append(self.fusion.la(o_la_BxTxHlxK, None if z_BxTxHlxK is None else self.la.gate(z_BxTxHlxK)))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=2)

  def project_out(self, fused_BxTxHxK) -> jax.Array:
    """The shared output projection W_o: [B, T, H, K] -> [B, T, D]."""
    dt = self.cfg.dtype
    return jnp.einsum("bthk,hkd->btd", fused_BxTxHxK.astype(dt), self.wo[...].astype(dt))

  def cached(self, x_BxTxD, cos_sin, cache, length, start_B, valid_BxT):
    """__call__ for T new tokens continuing from this layer's cache (``generation.LayerCache``: FA keys/values
    ``k``, ``v`` [B, S, Gf, K]; LA ``state`` [B, Hl, K, K] and conv tails ``conv_q/k/v`` [B, W-1, Hl, K]).

    The new tokens occupy slots [length, length + T); ``start_B`` [B] is each row's first real slot (left
    padding before it), ``valid_BxT`` marks the new tokens that are not padding. Returns (y [B, T, D], update):
    ``update`` is a LayerCache whose LA fields are the new state and tails and whose ``k``, ``v`` are only the T
    new rows [B, T, Gf, K] (``HydraHeadLM.extend`` writes them, in place, into the full cache).
    """
    dt = self.cfg.dtype
    o_fa = o_la = z = None
    if self.fa is not None:
      o_fa, k, v = self.fa.attend_cached(**project(x_BxTxD, self.fa.projections(), dt), cos_sin=cos_sin,
                                         cache_k=cache.k, cache_v=cache.v, length=length, start_B=start_B,
                                         valid_BxT=valid_BxT)
      cache = cache._replace(k=k, v=v)
    if self.la is not None:
      o_la, z, state, (tq, tk, tv) = self.la.mix_cached(
          **project(x_BxTxD, self.la.projections(), dt), state=cache.state,
          conv_tails=(cache.conv_q, cache.conv_k, cache.conv_v), valid_BxT=valid_BxT)
      o_la = o_la.astype(dt)
      cache = cache._replace(state=state, conv_q=tq, conv_k=tk, conv_v=tv)
    return self.project_out(self.fuse(o_fa, o_la, z)), cache
