"""Glue of the Pallas gated delta rule: padding, gate/segment preparation, custom_vjp, backend choice.

Outside the kernels (cheap work, differentiated by XLA): T padded to the chunk with no-op tokens, the head dims K
and V zero-padded to what the backend's tiles need (``padded_dim``: Triton, a power of two >= 16), the chunk-local
cumsum of g (so the kernels return d gc and autodiff turns it into dg), beta in float32 [B, H, T], and the
chunk-local count of segment resets [B, T]. Inside ``jax.custom_vjp``: the backend's forward and backward kernels.

Zero head-dim padding is exact: zero q / k channels add nothing to any dot product (q, k keep their norms, so
L2-normalised inputs stay normalised), zero k channels leave the padded state rows at zero (the initial state is
padded with zeros), and zero v channels give zero outputs. Outputs, final state and (through the pad's transpose)
gradients are sliced back to K and V.
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
  """Pallas gated delta rule over [B, T, H, *] inputs, any T, K and V.

  Per head: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = scale * S_t^T q_t
  (``reference.gdn_recurrent``; q, k used as given, L2-normalise them beforehand). q, k [B, T, H, K], v [B, T, H, V],
  g (log decay <= 0) and beta [B, T, H], initial_state [B, H, K, V] (float32 inside), segment_ids [B, T] int
  (state zeroed where the id changes). Returns (o [B, T, H, V] in v's dtype, float32 final state [B, H, K, V] if
  output_final_state else None); differentiable in q, k, v, g, beta and initial_state.
  ``backend``: 'triton' | 'tpu' (default: ``default_backend()``), ``config`` its Config.
  """
  B, T, H, K = q.shape
  V = v.shape[-1]
  scale = K**-0.5 if scale is None else float(scale)
  if backend is None:
    backend, default_cfg = default_backend()
    config = default_cfg if config is None else config
  elif config is None:
    config = _backend_module(backend).Config()
  mod = _backend_module(backend)
  Kp, Vp = mod.padded_dim(K), mod.padded_dim(V)
  C = _chunk_size(chunk_size)
  pad = -T % C
  cd = jnp.promote_types(jnp.promote_types(q.dtype, k.dtype), v.dtype)

  def prep(x, dtype, last=0):
    x = x.astype(dtype)
    widths = ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 3) + ((0, last),)
    return jnp.pad(x, widths) if pad or last else x

  q_p, k_p, v_p = prep(q, cd, Kp - K), prep(k, cd, Kp - K), prep(v, cd, Vp - V)
  gc = _chunk_cumsum(prep(g, f32), C)
  beta_p = prep(beta, f32).transpose(0, 2, 1)
  sid = None if segment_ids is None else _segment_counts(segment_ids, T + pad, C)
  h0 = jnp.zeros((B, H, Kp, Vp), f32)
  if initial_state is not None:
    h0 = jnp.pad(initial_state.astype(f32), ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V)))
  st = Static(scale, C, backend, config, jnp.dtype(v.dtype))
  o, ht = _core(q_p, k_p, v_p, gc, beta_p, sid, h0, st)
  return o[:, :T, :, :V], (ht[:, :, :K, :V] if output_final_state else None)
