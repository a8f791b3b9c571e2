"""Glue of the fused short convolution: argument checks, custom_vjp, backend choice.

Inside ``jax.custom_vjp``: the backend's forward kernel and its backward kernel, which recomputes everything
from the residuals (x, w, segment_ids) and returns dx and per-program dw partials (float32, summed here, then
cast to w's dtype). segment_ids is not differentiable. No padding: the kernels mask ragged T and C.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.short_conv import gpu_triton
from pallas_kernels.short_conv.reference import check_args

Array = jax.Array


class Static(NamedTuple):
  head_dim: int | None
  cfg: gpu_triton.Config


def default_config() -> gpu_triton.Config:
  """Triton on GPU; Pallas interpret mode elsewhere (CPU tests)."""
  return gpu_triton.Config() if jax.default_backend() == "gpu" else gpu_triton.INTERPRET


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _core(x, w, sid, st: Static):
  return gpu_triton.forward(x, w, sid, head_dim=st.head_dim, cfg=st.cfg)


def _core_fwd(x, w, sid, st: Static):
  return _core(x, w, sid, st), (x, w, sid)


def _core_bwd(st: Static, res, dy):
  x, w, sid = res
  dx, dw_part = gpu_triton.backward(x, w, sid, dy.astype(x.dtype), head_dim=st.head_dim, cfg=st.cfg)
  return dx, dw_part.sum(axis=(0, 1)).astype(w.dtype), None


_core.defvjp(_core_fwd, _core_bwd)


def short_conv(x_BxTxC: Array, w_WxC: Array, segment_ids_BxT: Array | None = None, *, head_dim: int | None = None,
               config: gpu_triton.Config | None = None) -> Array:
  """SiLU(causal depthwise conv of x with w), L2-normalised per head of ``head_dim`` channels when given.

  Same contract as ``reference.short_conv_reference`` (float32 math, output in x's dtype); gradients for x and w
  (in their dtypes) through the fused backward kernel. ``config``: the Triton tiling (default:
  ``default_config()``: Triton on GPU, interpret mode elsewhere).
  """
  check_args(x_BxTxC, w_WxC, segment_ids_BxT, head_dim)
  cfg = default_config() if config is None else config
  sid = None if segment_ids_BxT is None else segment_ids_BxT.astype(jnp.int32)
  return _core(x_BxTxC, w_WxC, sid, Static(None if head_dim is None else int(head_dim), cfg))
