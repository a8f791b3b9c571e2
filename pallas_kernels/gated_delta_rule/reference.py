"""The reference of the gated delta rule: token by token (``lax.scan`` in float32), the oracle every other form
(``reference_chunked.py``, the Pallas backends) matches. Pure JAX, no kernels.

Per head, with the state reset to zero before any token whose segment id differs from its predecessor's:
  S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale * S_t^T q_t.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

# Reference precision: full float32 matmuls on every backend (no TF32 / bf16 passes).
einsum = functools.partial(jnp.einsum, precision=lax.Precision.HIGHEST)


def segment_resets(segment_ids_BxT: Array | None) -> Array | None:
  """Bool [B, T]: True where the state is zeroed before token t (segment id changes from t-1; never at t=0)."""
  if segment_ids_BxT is None:
    return None
  change_BxT = segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]
  return jnp.pad(change_BxT, ((0, 0), (1, 0)))


def gdn_recurrent(
    q: Array,
    k: Array,
    v: Array,
    g: Array,
    beta: Array,
    *,
    scale: float,
    initial_state: Array | None,
    segment_ids: Array | None,
    chunk_size: int,
    output_final_state: bool,
) -> tuple[Array, Array | None]:
  """Recurrent form; differentiable by plain autodiff. ``chunk_size`` is ignored."""
  del chunk_size
  B, T, H, K = q.shape
  V = v.shape[-1]
  f32 = jnp.float32
  state_BxHxKxV = (jnp.zeros((B, H, K, V), f32) if initial_state is None else initial_state.astype(f32))
  resets_BxT = segment_resets(segment_ids)
  keep_BxT = jnp.ones((B, T), f32) if resets_BxT is None else 1.0 - resets_BxT.astype(f32)

  def time_major(x):
    return jnp.moveaxis(x.astype(f32), 1, 0)

  xs = tuple(time_major(x) for x in (q, k, v, g, beta, keep_BxT))

  def step(state_BxHxKxV, x):
    q_BxHxK, k_BxHxK, v_BxHxV, g_BxH, beta_BxH, keep_B = x
    decay_BxH = jnp.exp(g_BxH) * keep_B[:, None]
    state_BxHxKxV = decay_BxH[..., None, None] * state_BxHxKxV
    pred_BxHxV = einsum("bhk,bhkv->bhv", k_BxHxK, state_BxHxKxV)
    delta_BxHxV = beta_BxH[..., None] * (v_BxHxV - pred_BxHxV)
    state_BxHxKxV = state_BxHxKxV + einsum("bhk,bhv->bhkv", k_BxHxK, delta_BxHxV)
    o_BxHxV = scale * einsum("bhk,bhkv->bhv", q_BxHxK, state_BxHxKxV)
    return state_BxHxKxV, o_BxHxV

  final_BxHxKxV, o_TxBxHxV = lax.scan(step, state_BxHxKxV, xs)
  o_BxTxHxV = jnp.moveaxis(o_TxBxHxV, 0, 1).astype(v.dtype)
  return o_BxTxHxV, (final_BxHxKxV if output_final_state else None)
