"""The reference every backend of the fused head fusion matches: pure JAX, written from the math of
the model mixer's ``ScaleNormFusion``.

Per head h of a layer's raw outputs (FA heads o_fa [B, T, Hf, K], then LA heads o_la [B, T, Hl, K]), in float32:
  scale_norm : FA  y = s_h o                       LA  y = gamma_h * o / rms(o)
  rmsnorm_all: FA  y = gamma_h * o / rms(o)        LA  y = gamma_h * o / rms(o)
  none       : FA  y = o                           LA  y = o
with rms(o) = sqrt(mean_k o_k^2 + eps); the optional LA output gate SiLU(z + z_bias) multiplies after the
normalisation.
The result is cast to o's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
f32 = jnp.float32
VARIANTS = ("scale_norm", "rmsnorm_all", "none")


def _check_shape(name: str, x, shape) -> None:
  if x is None:
    raise ValueError(f"{name} is required (shape {shape})")
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")


def check_args(o_fa, o_la, variant, fa_scale, fa_norm_scale, la_norm_scale, z, z_bias) -> None:
  """One ValueError naming the bad field; unused scales must be None."""
  if o_fa is None and o_la is None:
    raise ValueError("o_fa and o_la are both None: give the FA and/or the LA head outputs")
  for name, o in (("o_fa", o_fa), ("o_la", o_la)):
    if o is not None and o.ndim != 4:
      raise ValueError(f"{name} must be [B, T, heads, K], got shape {tuple(o.shape)}")
  B, T, _, K = (o_fa if o_la is None else o_la).shape
  if o_fa is not None and o_la is not None and (o_fa.shape[:2] + o_fa.shape[3:]) != (B, T, K):
    raise ValueError(f"o_fa {tuple(o_fa.shape)} and o_la {tuple(o_la.shape)} differ in B, T or K")
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  Hf = 0 if o_fa is None else o_fa.shape[2]
  Hl = 0 if o_la is None else o_la.shape[2]
  want = {
      "fa_scale": (Hf,) if variant == "scale_norm" and Hf else None,
      "fa_norm_scale": (Hf, K) if variant == "rmsnorm_all" and Hf else None,
      "la_norm_scale": (Hl, K) if variant != "none" and Hl else None,
  }
  for name, x in (("fa_scale", fa_scale), ("fa_norm_scale", fa_norm_scale), ("la_norm_scale", la_norm_scale)):
    if want[name] is None:
      if x is not None:
        raise ValueError(f"{name} must be None for variant={variant!r} with {Hf} FA and {Hl} LA heads")
    else:
      _check_shape(name, x, want[name])
  if z is not None:
    if not Hl:
      raise ValueError("z (the LA output gate) must be None when there are no LA heads")
    _check_shape("z", z, (B, T, Hl, K))
  if z_bias is not None:
    if z is None:
      raise ValueError("z_bias is given without z")
    _check_shape("z_bias", z_bias, (Hl, K))


def rms_norm(x: Array, eps: float) -> Array:
  x = x.astype(f32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def fused_head_fusion_reference(o_fa_BxTxHfxK: Array | None, o_la_BxTxHlxK: Array | None, variant: str,
                                fa_scale_Hf: Array | None = None, fa_norm_scale_HfxK: Array | None = None,
                                la_norm_scale_HlxK: Array | None = None, z_BxTxHlxK: Array | None = None,
                                z_bias_HlxK: Array | None = None, eps: float = 1e-6) -> Array:
  """Fused heads [B, T, Hf + Hl, K] in the outputs' dtype (float32 math); gate = SiLU(z + z_bias)."""
  check_args(o_fa_BxTxHfxK, o_la_BxTxHlxK, variant, fa_scale_Hf, fa_norm_scale_HfxK, la_norm_scale_HlxK,
             z_BxTxHlxK, z_bias_HlxK)
  parts = []
  if o_fa_BxTxHfxK is not None:
    fa = o_fa_BxTxHfxK.astype(f32)
    if variant == "scale_norm":
      fa = fa * fa_scale_Hf.astype(f32)[:, None]
    if variant == "rmsnorm_all":
      fa = rms_norm(fa, eps) * fa_norm_scale_HfxK.astype(f32)
    parts.append(fa)
  if o_la_BxTxHlxK is not None:
    la = o_la_BxTxHlxK.astype(f32)
    if variant != "none":
      la = rms_norm(la, eps) * la_norm_scale_HlxK.astype(f32)
    if z_BxTxHlxK is not None:
      u = z_BxTxHlxK.astype(f32) + (0.0 if z_bias_HlxK is None else z_bias_HlxK.astype(f32))
      la = la * jax.nn.silu(u)
    parts.append(la)
  dtype = (o_fa_BxTxHfxK if o_la_BxTxHlxK is None else o_la_BxTxHlxK).dtype
  return (parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=2)).astype(dtype)
