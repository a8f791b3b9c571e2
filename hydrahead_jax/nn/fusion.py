"""Scale-normalized fusion of FA and LA head outputs, before the shared output projection.

Shape letters: B batch, T length, Hf FA heads, Hl LA heads, K head dim.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from hydrahead_jax.config import ModelConfig
from hydrahead_jax.nn.layers import make_param, rms_normalize
from hydrahead_jax.sharding import per_shard

SHARD_B = ("batch", None, None, None)  # batch rows only (heads whole)


def use_fusion_kernel(cfg: ModelConfig) -> bool:
  """``cfg.fusion_implementation``: 'pallas' or 'xla'; None = 'xla' (the Pallas kernel measured no faster than
  XLA's own fusion of the same math on an H100, docs/kernels.md)."""
  return cfg.fusion_implementation == "pallas"


class ScaleNormFusion(nnx.Module):
  """scale_norm : LA heads gamma_h * RMSNorm(o_h) (gamma per head and channel), FA heads s_h * o_h.
  rmsnorm_all: every head gamma_h * RMSNorm(o_h).
  none       : raw outputs.
  The LA output gate SiLU(W_z x) multiplies after the normalisation.
  """

  def __init__(self, cfg: ModelConfig, num_fa_heads: int, num_la_heads: int, *, rngs: nnx.Rngs):
    K, pd = cfg.head_dim, cfg.param_dtype
    self.variant, self.eps = cfg.fusion, cfg.rms_eps
    ones = nnx.initializers.ones
    has_fa, has_la = num_fa_heads > 0, num_la_heads > 0
    self.fa_scale = (make_param(rngs, ones, (num_fa_heads,), ("heads",), pd)
                     if self.variant == "scale_norm" and has_fa else None)
    self.fa_norm_scale = (make_param(rngs, ones, (num_fa_heads, K), ("heads", "head_dim"), pd)
                          if self.variant == "rmsnorm_all" and has_fa else None)
    self.la_norm_scale = (make_param(rngs, ones, (num_la_heads, K), ("heads", "head_dim"), pd)
                          if self.variant != "none" and has_la else None)

  def fa(self, o_BxTxHxK):
    if self.variant == "scale_norm":
      return o_BxTxHxK * self.fa_scale[...].astype(o_BxTxHxK.dtype)[:, None]
    if self.variant == "rmsnorm_all":
      return (rms_normalize(o_BxTxHxK, self.eps) * self.fa_norm_scale[...]).astype(o_BxTxHxK.dtype)
    return o_BxTxHxK

  def la(self, o_BxTxHxK, gate_BxTxHxK):
    out = o_BxTxHxK.astype(jnp.float32)
    if self.variant != "none":
      out = rms_normalize(out, self.eps) * self.la_norm_scale[...]
    if gate_BxTxHxK is not None:
      out = out * gate_BxTxHxK.astype(jnp.float32)
    return out.astype(o_BxTxHxK.dtype)

  def fused(self, o_fa_BxTxHfxK, o_la_BxTxHlxK, z_BxTxHlxK, z_bias_HlxK):
    """fa() and la() of all heads in one Pallas kernel (same math, float32 inside; gate SiLU(z + z_bias))."""
    from pallas_kernels.fusion_norm import fused_head_fusion
    get = lambda p: None if p is None else p[...]  # noqa: E731
    # Per shard of batch rows only: the output concatenates FA and LA heads, so a head split of each input would
    # not be a contiguous block of the output's heads.
    fn = per_shard(lambda o_fa, o_la, fs, fns, lns, z, zb: (fused_head_fusion(
        o_fa, o_la, self.variant, fs, fns, lns, z, zb, self.eps),), (SHARD_B, SHARD_B, None, None, None, SHARD_B, None),
                   (SHARD_B,))
    return fn(o_fa_BxTxHfxK, o_la_BxTxHlxK, get(self.fa_scale), get(self.fa_norm_scale), get(self.la_norm_scale),
              z_BxTxHlxK, z_bias_HlxK)[0]
