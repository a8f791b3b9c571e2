"""Glue of the Pallas gated delta rule: padding, gate/segment preparation, custom_vjp, backend choice.

Outside the kernels (cheap [B, T, H] work, differentiated by XLA): the chunk-local cumsum of g (so the kernels
return d gc and autodiff turns it into dg), beta in float32 [B, H, T], and the chunk-local count of segment
resets [B, T]. Inside ``jax.custom_vjp``: the backend's forward and backward kernels.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import gpu_triton

Array = jax.Array
f32 = jnp.float32


class Static(NamedTuple):
  scale: float
  C: int
  backend: str  # 'triton' (GPU, or interpret mode on CPU) | 'tpu'
  cfg: object  # the backend's hashable Config
  out_dtype: object


def _backend_module(name: str):
  if name == "tpu":
    from pallas_kernels.gated_delta_rule import tpu
    return tpu
  return gpu_triton


def default_backend() -> tuple[str, object]:
  """(backend, config) for the default JAX platform: Triton on GPU, Mosaic on TPU, interpret elsewhere."""
  platform = jax.default_backend()
  if platform == "gpu":
    return "triton", gpu_triton.Config()
  if platform == "tpu":
    from pallas_kernels.gated_delta_rule import tpu
    return "tpu", tpu.Config()
  return "triton", gpu_triton.INTERPRET


def _forward(q, k, v, gc, beta, sid, h0, st: Static, save: bool):
  mod = _backend_module(st.backend)
  return mod.forward(q, k, v, gc, beta, sid, h0, C=st.C, scale=st.scale, out_dtype=st.out_dtype, cfg=st.cfg,
                     save=save)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _core(q, k, v, gc, beta, sid, h0, st: Static):
  return _forward(q, k, v, gc, beta, sid, h0, st, save=False)[:2]


def _core_fwd(q, k, v, gc, beta, sid, h0, st: Static):
  o, ht, extra = _forward(q, k, v, gc, beta, sid, h0, st, save=True)
  return (o, ht), (q, k, v, gc, beta, sid, h0, extra)


def _core_bwd(st: Static, res, cts):
  q, k, v, gc, beta, sid, h0, extra = res
  do, dht = cts
  mod = _backend_module(st.backend)
  dq, dk, dv, dgc, dbeta, dh0 = mod.backward(q, k, v, gc, beta, sid, h0, extra, do.astype(k.dtype),
                                             dht.astype(f32), C=st.C, scale=st.scale, cfg=st.cfg)
  return dq, dk, dv, dgc, dbeta, None, dh0


_core.defvjp(_core_fwd, _core_bwd)


def _chunk_size(chunk_size: int) -> int:
  """Kernel chunk: the requested one if a power of two in [16, 64], else 64 (results do not depend on it)."""
  if 16 <= chunk_size <= 64 and chunk_size & (chunk_size - 1) == 0:
    return chunk_size
  return 64


def _chunk_cumsum(x_BxTxH: Array, C: int) -> Array:
  """float32 [B, H, T]: cumsum of x within each chunk of C tokens."""
  B, T, H = x_BxTxH.shape
  x = x_BxTxH.astype(f32).reshape(B, T // C, C, H).cumsum(axis=2)
  return x.reshape(B, T, H).transpose(0, 2, 1)


def _segment_counts(segment_ids_BxT: Array, T_pad: int, C: int) -> Array:
  """int32 [B, T_pad]: number of segment starts in the chunk up to each token (0 = still the entering segment)."""
  B, T = segment_ids_BxT.shape
  resets_BxT = jnp.pad(segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1], ((0, 0), (1, T_pad - T)))
  return resets_BxT.astype(jnp.int32).reshape(B, T_pad // C, C).cumsum(axis=2).reshape(B, T_pad)


def gated_delta_rule_pallas(
    q: Array,
    k: Array,
    v: Array,
    g: Array,
    beta: Array,
    *,
    scale: float | None = None,
    initial_state: Array | None = None,
    segment_ids: Array | None = None,
    chunk_size: int = 64,
    output_final_state: bool = False,
    backend: str | None = None,
    config: object | None = None,
) -> tuple[Array, Array | None]:
  """Pallas gated delta rule with the contract of the library's gated delta rule op (``reference.gdn_recurrent``)."""
  B, T, H, K = q.shape
  V = v.shape[-1]
  scale = K**-0.5 if scale is None else float(scale)
  if backend is None:
    backend, default_cfg = default_backend()
    config = default_cfg if config is None else config
  elif config is None:
    config = _backend_module(backend).Config()
  C = _chunk_size(chunk_size)
  pad = -T % C
  cd = jnp.promote_types(jnp.promote_types(q.dtype, k.dtype), v.dtype)

  def prep(x, dtype):
    x = x.astype(dtype)
    return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)) if pad else x

  q_p, k_p, v_p = prep(q, cd), prep(k, cd), prep(v, cd)
  gc = _chunk_cumsum(prep(g, f32), C)
  beta_p = prep(beta, f32).transpose(0, 2, 1)
  sid = None if segment_ids is None else _segment_counts(segment_ids, T + pad, C)
  h0 = jnp.zeros((B, H, K, V), f32) if initial_state is None else initial_state.astype(f32)
  st = Static(scale, C, backend, config, jnp.dtype(v.dtype))
  o, ht = _core(q_p, k_p, v_p, gc, beta_p, sid, h0, st)
  return o[:, :T], (ht if output_final_state else None)

