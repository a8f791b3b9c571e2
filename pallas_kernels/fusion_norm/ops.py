"""Glue of the fused head fusion: argument checks, per-head scale matrix, row padding, custom_vjp, backend choice.

Outside the kernels (tiny [H, K] work, differentiated by XLA): the per-head scale matrix w [H, K] in float32 —
FA rows are the scalar s_h repeated ('scale_norm') or gamma_h ('rmsnorm_all'), LA rows gamma_h — so autodiff of
that assembly maps the kernel's dw back onto fa_scale / fa_norm_scale / la_norm_scale. Inside ``jax.custom_vjp``:
the backend's forward and analytic backward kernels on [B*T, H, K] rows padded to the row block (zero rows:
finite, zero cotangent, sliced off) and, for Triton's power-of-two tensor sizes, the head dim K zero-padded to
``padded_dim(K)`` (exact: padded lanes of o, z and the scales are zero, so they add nothing to the norm's sum of
squares, whose mean the kernels take over the true K, and their outputs, zero, are sliced off with their gradients).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.fusion_norm import gpu_triton
from pallas_kernels.fusion_norm.reference import check_args

Array = jax.Array
f32 = jnp.float32


class Static(NamedTuple):
  hs: gpu_triton.Heads
  cfg: gpu_triton.Config


def padded_dim(K: int) -> int:
  """Head dim the kernels run at: the next power of two (Triton's tensor sizes)."""
  return 1 << (K - 1).bit_length()


def default_config() -> gpu_triton.Config:
  """Triton on GPU; Pallas interpret mode elsewhere (CPU tests)."""
  return gpu_triton.Config() if jax.default_backend() == "gpu" else gpu_triton.INTERPRET


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _core(o_fa, o_la, w, z, zb, st: Static):
  return gpu_triton.forward(o_fa, o_la, w, z, zb, hs=st.hs, cfg=st.cfg)


def _core_fwd(o_fa, o_la, w, z, zb, st: Static):
  return _core(o_fa, o_la, w, z, zb, st), (o_fa, o_la, w, z, zb)


def _core_bwd(st: Static, res, dy):
  o_fa, o_la, w, z, zb = res
  do_fa, do_la, dw, dz, dzb = gpu_triton.backward(o_fa, o_la, w, z, zb, dy, hs=st.hs, cfg=st.cfg)
  total = lambda part, like: None if part is None else part.sum(axis=0).astype(like.dtype)  # noqa: E731
  return do_fa, do_la, total(dw, w), dz, total(dzb, zb)


_core.defvjp(_core_fwd, _core_bwd)


def _scale_matrix(Hf, Hl, K, variant, fa_scale, fa_norm_scale, la_norm_scale) -> Array | None:
  """float32 [Hf + Hl, K]: per-head, per-channel multiplier (None for 'none')."""
  if variant == "none":
    return None
  rows = []
  if Hf:
    if variant == "scale_norm":
      rows.append(jnp.broadcast_to(fa_scale.astype(f32)[:, None], (Hf, K)))
    else:
      rows.append(fa_norm_scale.astype(f32))
  if Hl:
    rows.append(la_norm_scale.astype(f32))
  return rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=0)


def fused_head_fusion(o_fa_BxTxHfxK: Array | None, o_la_BxTxHlxK: Array | None, variant: str,
                      fa_scale_Hf: Array | None = None, fa_norm_scale_HfxK: Array | None = None,
                      la_norm_scale_HlxK: Array | None = None, z_BxTxHlxK: Array | None = None,
                      z_bias_HlxK: Array | None = None, eps: float = 1e-6, *,
                      config: gpu_triton.Config | None = None) -> Array:
  """One pass over a layer's raw head outputs: per-head RMSNorm + learned scale / FA scalar / LA gate.

  Same contract as ``reference.fused_head_fusion_reference`` (float32 math, output [B, T, Hf + Hl, K] in the
  outputs' dtype, gate = SiLU(z + z_bias)); gradients for both outputs, the scales, z and z_bias through the
  analytic backward kernel. ``config``: the Triton tiling (default: ``default_config()``).
  """
  check_args(o_fa_BxTxHfxK, o_la_BxTxHlxK, variant, fa_scale_Hf, fa_norm_scale_HfxK, la_norm_scale_HlxK,
             z_BxTxHlxK, z_bias_HlxK)
  cfg = default_config() if config is None else config
  B, T, _, K = (o_fa_BxTxHfxK if o_la_BxTxHlxK is None else o_la_BxTxHlxK).shape
  Hf = 0 if o_fa_BxTxHfxK is None else o_fa_BxTxHfxK.shape[2]
  Hl = 0 if o_la_BxTxHlxK is None else o_la_BxTxHlxK.shape[2]
  N, R = B * T, cfg.block_rows
  pad, kpad = -N % R, padded_dim(K) - K

  def rows(x):
    if x is None:
      return None
    x = x.reshape(N, x.shape[2], K)
    return jnp.pad(x, ((0, pad), (0, 0), (0, kpad))) if pad or kpad else x

  def lanes(x):  # [heads, K] parameters
    return x if x is None or not kpad else jnp.pad(x, ((0, 0), (0, kpad)))

  w_HxK = _scale_matrix(Hf, Hl, K, variant, fa_scale_Hf, fa_norm_scale_HfxK, la_norm_scale_HlxK)
  hs = gpu_triton.Heads(fa_heads=Hf, la_heads=Hl, norm_fa=variant == "rmsnorm_all", norm_la=variant != "none",
                        scaled=w_HxK is not None, gated=z_BxTxHlxK is not None, eps=float(eps), dim=K)
  y = _core(rows(o_fa_BxTxHfxK), rows(o_la_BxTxHlxK), lanes(w_HxK), rows(z_BxTxHlxK), lanes(z_bias_HlxK),
            Static(hs, cfg))
  return y[:N, :, :K].reshape(B, T, Hf + Hl, K)
