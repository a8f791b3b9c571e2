"""The reference every backend of the fused head fusion matches: pure JAX, written from the math of
``hydrahead_jax.mixer.ScaleNormFusion``.

Per head h of a layer's raw outputs o [B, T, H, K] (FA heads [0, fa_heads), LA heads after), in float32:
  scale_norm : FA  y = s_h o                       LA  y = gamma_h * o / rms(o)
  rmsnorm_all: FA  y = gamma_h * o / rms(o)        LA  y = gamma_h * o / rms(o)
  none       : FA  y = o                           LA  y = o
with rms(o) = sqrt(mean_k o_k^2 + eps); the optional LA output gate multiplies after the normalisation.
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


def check_args(o, fa_heads, variant, fa_scale, fa_norm_scale, la_norm_scale, gate) -> None:
  """One ValueError naming the bad field; unused scales must be None."""
  if o.ndim != 4:
    raise ValueError(f"o must be [B, T, H, K], got shape {tuple(o.shape)}")
  B, T, H, K = o.shape
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  if not 0 <= fa_heads <= H:
    raise ValueError(f"fa_heads must be in [0, {H}], got {fa_heads}")
  Hf, Hl = fa_heads, H - fa_heads
  want = {
      "fa_scale": (Hf,) if variant == "scale_norm" and Hf else None,
      "fa_norm_scale": (Hf, K) if variant == "rmsnorm_all" and Hf else None,
      "la_norm_scale": (Hl, K) if variant != "none" and Hl else None,
  }
  for name, x in (("fa_scale", fa_scale), ("fa_norm_scale", fa_norm_scale), ("la_norm_scale", la_norm_scale)):
    if want[name] is None:
      if x is not None:
        raise ValueError(f"{name} must be None for variant={variant!r}, fa_heads={Hf}, H={H}")
    else:
      _check_shape(name, x, want[name])
  if gate is not None:
    if not Hl:
      raise ValueError("gate must be None when there are no LA heads (fa_heads == H)")
    _check_shape("gate", gate, (B, T, Hl, K))


def rms_norm(x: Array, eps: float) -> Array:
  x = x.astype(f32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def fused_head_fusion_reference(o_BxTxHxK: Array, fa_heads: int, variant: str, fa_scale_H: Array | None = None,
                                fa_norm_scale_HxK: Array | None = None, la_norm_scale_HxK: Array | None = None,
                                gate_BxTxHlxK: Array | None = None, eps: float = 1e-6) -> Array:
  """Fused heads [B, T, H, K] in o's dtype (float32 math)."""
  check_args(o_BxTxHxK, fa_heads, variant, fa_scale_H, fa_norm_scale_HxK, la_norm_scale_HxK, gate_BxTxHlxK)
  x = o_BxTxHxK.astype(f32)
  fa, la = x[:, :, :fa_heads], x[:, :, fa_heads:]
  if variant == "scale_norm" and fa_heads:
    fa = fa * fa_scale_H.astype(f32)[:, None]
  if variant == "rmsnorm_all" and fa_heads:
    fa = rms_norm(fa, eps) * fa_norm_scale_HxK.astype(f32)
  if variant != "none" and la.shape[2]:
    la = rms_norm(la, eps) * la_norm_scale_HxK.astype(f32)
  if gate_BxTxHlxK is not None:
    la = la * gate_BxTxHlxK.astype(f32)
  return jnp.concatenate([fa, la], axis=2).astype(o_BxTxHxK.dtype)
