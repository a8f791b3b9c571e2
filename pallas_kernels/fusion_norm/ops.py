"""Glue of the fused head fusion: argument checks, per-head scale matrix, row padding, custom_vjp, backend choice.

Outside the kernels (tiny [H, K] work, differentiated by XLA): the per-head scale matrix w [H, K] in float32 —
FA rows are the scalar s_h repeated ('scale_norm') or gamma_h ('rmsnorm_all'), LA rows gamma_h — so autodiff of
that assembly maps the kernel's dw back onto fa_scale / fa_norm_scale / la_norm_scale. Inside ``jax.custom_vjp``:
the backend's forward and analytic backward kernels on [B*T, H, K] rows padded to the row block (zero rows:
finite, zero cotangent, sliced off).
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


def default_config() -> gpu_triton.Config:
  """Triton on GPU; Pallas interpret mode elsewhere (CPU tests)."""
  return gpu_triton.Config() if jax.default_backend() == "gpu" else gpu_triton.INTERPRET


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _core(o, w, g, st: Static):
  return gpu_triton.forward(o, w, g, hs=st.hs, cfg=st.cfg)


def _core_fwd(o, w, g, st: Static):
  return _core(o, w, g, st), (o, w, g)


def _core_bwd(st: Static, res, dy):
  o, w, g = res
  dx, dw, dg = gpu_triton.backward(o, w, g, dy.astype(o.dtype), hs=st.hs, cfg=st.cfg)
  return dx, (None if dw is None else dw.sum(axis=0)), dg


_core.defvjp(_core_fwd, _core_bwd)


def _scale_matrix(H, K, fa_heads, variant, fa_scale, fa_norm_scale, la_norm_scale) -> Array | None:
  """float32 [H, K]: per-head, per-channel multiplier (None for 'none')."""
  if variant == "none":
    return None
  rows = []
  if fa_heads:
    if variant == "scale_norm":
      rows.append(jnp.broadcast_to(fa_scale.astype(f32)[:, None], (fa_heads, K)))
    else:
      rows.append(fa_norm_scale.astype(f32))
  if H - fa_heads:
    rows.append(la_norm_scale.astype(f32))
  return rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=0)


def fused_head_fusion(o_BxTxHxK: Array, fa_heads: int, variant: str, fa_scale_H: Array | None = None,
                      fa_norm_scale_HxK: Array | None = None, la_norm_scale_HxK: Array | None = None,
                      gate_BxTxHlxK: Array | None = None, eps: float = 1e-6, *,
                      config: gpu_triton.Config | None = None) -> Array:
  """One pass over a layer's raw head outputs: per-head RMSNorm + learned scale / FA scalar / LA gate.

  Same contract as ``reference.fused_head_fusion_reference`` (float32 math, output in o's dtype); gradients for
  o, the scales and the gate through the analytic backward kernel. ``config``: the Triton tiling (default:
  ``default_config()``).
  """
  check_args(o_BxTxHxK, fa_heads, variant, fa_scale_H, fa_norm_scale_HxK, la_norm_scale_HxK, gate_BxTxHlxK)
  cfg = default_config() if config is None else config
  B, T, H, K = o_BxTxHxK.shape
  N, R = B * T, cfg.block_rows
  pad = -N % R

  def rows(x):
    x = x.reshape(N, x.shape[2], K)
    return jnp.pad(x, ((0, pad), (0, 0), (0, 0))) if pad else x

  w_HxK = _scale_matrix(H, K, fa_heads, variant, fa_scale_H, fa_norm_scale_HxK, la_norm_scale_HxK)
  gate = None if gate_BxTxHlxK is None else rows(gate_BxTxHlxK)
  hs = gpu_triton.Heads(fa_heads=fa_heads, norm_fa=variant == "rmsnorm_all", norm_la=variant != "none",
                        scaled=w_HxK is not None, gated=gate is not None, eps=float(eps))
  y = _core(rows(o_BxTxHxK), w_HxK, gate, Static(hs, cfg))
  return y[:N].reshape(B, T, H, K)
