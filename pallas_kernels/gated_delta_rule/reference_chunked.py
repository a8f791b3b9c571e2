"""Chunked (WY / UT-transform) gated delta rule in pure JAX (XLA), with an analytic ``custom_vjp``.

The second reference form: the same math as ``reference.gdn_recurrent`` in chunks, the default implementation
where no Pallas backend runs.

Per chunk of C tokens and per head (gc = within-chunk cumsum of g, S = state entering the chunk):
  Gam_ij = exp(gc_i - gc_j) for j <= i in the same segment, else 0      (decay matrix, Gam_ii = 1)
  gam_i  = exp(gc_i) if no reset at chunk positions 0..i, else 0      (decay of the carried state)
  A      = I + StrictTril(diag(beta) K K^T * Gam)
  [u | w] = A^-1 [beta*v | beta*gam*k]
  delta  = u - w S                                                      (the "new values")
  o      = scale * ((gam*q) S + (Q K^T * Gam) delta)
  S'     = gam_{C-1} S + (Gam_{C-1,:} * k)^T delta
A reset before token t is a zero decay (exp(g_t) -> 0), which the masks above encode exactly.

Backward (per chunk, dS' carried by a reverse scan over chunks):
  d delta = scale (Q K^T * Gam)^T dO + (Gam_{C-1,:} * k) dS'
  dS      = scale (gam*q)^T dO + gam_{C-1} dS' - w^T d delta
then everything else is chunk-parallel: [d(beta v) | d(beta gam k)] = A^-T [d delta | -d delta S^T],
dA = -[d(beta v) | d(beta gam k)] [u | w]^T on the strict lower triangle, and the gate gradient
flows into gc through Gam and gam, then dg = reverse cumsum of dgc. The backward recomputes A, u, w
from the inputs; the only saved intermediates are the chunk-entry states [B, N, H, K, V]. A^-1 comes from the
kernels' block-merge inverse (``chunk_math.unit_lower_inverse``, matmuls only), applied by einsum.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.gated_delta_rule.chunk_math import unit_lower_inverse
from pallas_kernels.gated_delta_rule.reference import einsum, segment_resets

Array = jax.Array
f32 = jnp.float32


def _to_chunks(x: Array, C: int) -> Array:
  """[B, T, H, ...] -> float32 [B, N, H, C, ...]."""
  B, T, H = x.shape[:3]
  x = x.astype(f32).reshape(B, T // C, C, H, *x.shape[3:])
  return jnp.swapaxes(x, 2, 3)


def _from_chunks(x: Array, dtype) -> Array:
  """[B, N, H, C, ...] -> [B, N*C, H, ...] in ``dtype``."""
  x = jnp.swapaxes(x, 2, 3)
  B, N, C, H = x.shape[:4]
  return x.reshape(B, N * C, H, *x.shape[4:]).astype(dtype)


def _decays(g_BxNxHxC: Array, resets_BxNxC: Array | None) -> tuple[Array, Array]:
  """Masked decay matrix Gam [B, N, H, C, C] and carried-state decay gam [B, N, H, C]."""
  C = g_BxNxHxC.shape[-1]
  gc_BxNxHxC = jnp.cumsum(g_BxNxHxC, axis=-1)
  same_CxC = jnp.tril(jnp.ones((C, C), bool))
  first = None
  if resets_BxNxC is not None:
    seg_BxNx1xC = jnp.cumsum(resets_BxNxC.astype(jnp.int32), axis=-1)[:, :, None]
    same_CxC = same_CxC & (seg_BxNx1xC[..., :, None] == seg_BxNx1xC[..., None, :])
    first = seg_BxNx1xC == 0
  diff_BxNxHxCxC = gc_BxNxHxC[..., :, None] - gc_BxNxHxC[..., None, :]
  decay_BxNxHxCxC = jnp.where(same_CxC, jnp.exp(jnp.where(same_CxC, diff_BxNxHxCxC, 0.0)), 0.0)
  gamma_BxNxHxC = jnp.exp(gc_BxNxHxC)
  if first is not None:
    gamma_BxNxHxC = jnp.where(first, gamma_BxNxHxC, 0.0)
  return decay_BxNxHxCxC, gamma_BxNxHxC


class _Chunks(NamedTuple):
  """Chunk-layout float32 inputs and the recomputable intra-chunk quantities."""
  q: Array  # [B, N, H, C, K]
  k: Array  # [B, N, H, C, K]
  v: Array  # [B, N, H, C, V]
  beta: Array  # [B, N, H, C]
  decay: Array  # Gam [B, N, H, C, C]
  gamma: Array  # gam [B, N, H, C]
  kk: Array  # K K^T [B, N, H, C, C]
  inv: Array  # A^-1 [B, N, H, C, C] (unit lower triangular)
  uw: Array  # [u | w] [B, N, H, C, V + K]


def _inverse(lower: Array) -> Array:
  """(I + lower)^-1 of every chunk: the kernels' block-merge inverse (matmuls only). Not LAPACK's trsm: on the
  CPU, jax's trsm splits its batch over the intra-op thread pool and blocks on it, which deadlocked when several
  devices of one process (context parallelism on fake CPU devices) solved at once on a 2-core machine."""
  C = lower.shape[-1]
  inv = jax.vmap(lambda a: unit_lower_inverse(a, lax.Precision.HIGHEST))(lower.reshape(-1, C, C))
  return inv.reshape(lower.shape)


def _intra_chunk(q, k, v, g, beta, resets, C: int) -> _Chunks:
  """Chunk the inputs and build Gam, gam and the WY factors (all chunks in parallel)."""
  B, T = q.shape[:2]
  q_c, k_c, v_c = _to_chunks(q, C), _to_chunks(k, C), _to_chunks(v, C)
  g_c, beta_c = _to_chunks(g, C), _to_chunks(beta, C)
  resets_BxNxC = None if resets is None else resets.reshape(B, T // C, C)
  decay, gamma = _decays(g_c, resets_BxNxC)
  kk = einsum("bnhik,bnhjk->bnhij", k_c, k_c)
  strict_CxC = jnp.tril(jnp.ones((C, C), bool), -1)
  lower = jnp.where(strict_CxC, beta_c[..., :, None] * kk * decay, 0.0)
  rhs = jnp.concatenate([beta_c[..., None] * v_c, (beta_c * gamma)[..., None] * k_c], axis=-1)
  inv = _inverse(lower)
  uw = einsum("bnhij,bnhjx->bnhix", inv, rhs)
  return _Chunks(q_c, k_c, v_c, beta_c, decay, gamma, kk, inv, uw)


def _time_major(*xs: Array) -> tuple[Array, ...]:
  return tuple(jnp.moveaxis(x, 1, 0) for x in xs)


def _state_pass(c: _Chunks, state_BxHxKxV: Array) -> tuple[Array, Array, Array]:
  """Sequential pass over chunks: final state, chunk-entry states [B,N,H,K,V], delta [B,N,H,C,V]."""
  V = c.v.shape[-1]
  u, w = c.uw[..., :V], c.uw[..., V:]
  rho_k = c.decay[..., -1, :, None] * c.k
  lam = c.gamma[..., -1]

  def step(state_BxHxKxV, x):
    u_BxHxCxV, w_BxHxCxK, rho_k_BxHxCxK, lam_BxH = x
    delta_BxHxCxV = u_BxHxCxV - einsum("bhck,bhkv->bhcv", w_BxHxCxK, state_BxHxKxV)
    nxt_BxHxKxV = (lam_BxH[..., None, None] * state_BxHxKxV
                   + einsum("bhck,bhcv->bhkv", rho_k_BxHxCxK, delta_BxHxCxV))
    return nxt_BxHxKxV, (state_BxHxKxV, delta_BxHxCxV)

  final, (states, delta) = lax.scan(step, state_BxHxKxV, _time_major(u, w, rho_k, lam))
  return final, jnp.moveaxis(states, 0, 1), jnp.moveaxis(delta, 0, 1)


def _forward(q, k, v, g, beta, resets, state, scale: float, C: int):
  c = _intra_chunk(q, k, v, g, beta, resets, C)
  final, states_BxNxHxKxV, delta = _state_pass(c, state)
  inter = einsum("bnhck,bnhkv->bnhcv", c.gamma[..., None] * c.q, states_BxNxHxKxV)
  p_BxNxHxCxC = einsum("bnhik,bnhjk->bnhij", c.q, c.k) * c.decay
  intra = einsum("bnhij,bnhjv->bnhiv", p_BxNxHxCxC, delta)
  o = _from_chunks(scale * (inter + intra), v.dtype)
  return (o, final), states_BxNxHxKxV


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _chunked_core(q, k, v, g, beta, resets, state, scale: float, C: int):
  """T must be a multiple of C; ``state`` is float32 [B, H, K, V]; returns (o, final_state)."""
  return _forward(q, k, v, g, beta, resets, state, scale, C)[0]


def _core_fwd(q, k, v, g, beta, resets, state, scale, C):
  out, states = _forward(q, k, v, g, beta, resets, state, scale, C)
  return out, (q, k, v, g, beta, resets, states)


def _reverse_state_pass(c: _Chunks, do, states, dfinal, scale: float):
  """Reverse scan over chunks carrying dS: d(initial state), dS' per chunk, d delta per chunk."""
  V = c.v.shape[-1]
  w = c.uw[..., V:]
  p = einsum("bnhik,bnhjk->bnhij", c.q, c.k) * c.decay
  ddelta_local = scale * einsum("bnhij,bnhiv->bnhjv", p, do)
  dstate_local = scale * einsum("bnhck,bnhcv->bnhkv", c.gamma[..., None] * c.q, do)
  rho_k = c.decay[..., -1, :, None] * c.k
  lam = c.gamma[..., -1]

  def step(dnext_BxHxKxV, x):
    ddl_BxHxCxV, dsl_BxHxKxV, rho_k_BxHxCxK, lam_BxH, w_BxHxCxK = x
    ddelta_BxHxCxV = ddl_BxHxCxV + einsum("bhck,bhkv->bhcv", rho_k_BxHxCxK, dnext_BxHxKxV)
    dstate_BxHxKxV = (dsl_BxHxKxV + lam_BxH[..., None, None] * dnext_BxHxKxV
                      - einsum("bhck,bhcv->bhkv", w_BxHxCxK, ddelta_BxHxCxV))
    return dstate_BxHxKxV, (dnext_BxHxKxV, ddelta_BxHxCxV)

  xs = _time_major(ddelta_local, dstate_local, rho_k, lam, w)
  dstate0, (dnext, ddelta) = lax.scan(step, dfinal, xs, reverse=True)
  return dstate0, jnp.moveaxis(dnext, 0, 1), jnp.moveaxis(ddelta, 0, 1)


def _core_bwd(scale, C, res, cts):
  q, k, v, g, beta, resets, states = res
  do_BxTxHxV, dfinal = cts
  c = _intra_chunk(q, k, v, g, beta, resets, C)
  V = c.v.shape[-1]
  do = _to_chunks(do_BxTxHxV, C)
  dstate0, dnext, ddelta = _reverse_state_pass(c, do, states, dfinal.astype(f32), scale)
  delta = c.uw[..., :V] - einsum("bnhck,bnhkv->bnhcv", c.uw[..., V:], states)
  qk = einsum("bnhik,bnhjk->bnhij", c.q, c.k)

  # Read-out o = scale * ((gam*q) S + (QK^T * Gam) delta).
  dos = einsum("bnhcv,bnhkv->bnhck", do, states)
  dp = scale * einsum("bnhiv,bnhjv->bnhij", do, delta)
  dp_decay = dp * c.decay
  dq = scale * c.gamma[..., None] * dos + einsum("bnhij,bnhjk->bnhik", dp_decay, c.k)
  dk = einsum("bnhij,bnhik->bnhjk", dp_decay, c.q)
  dgamma = scale * jnp.sum(c.q * dos, -1)
  ddecay = dp * qk

  # Hand-off S' = gam_{C-1} S + (Gam_{C-1,:} * k)^T delta.
  dgamma = dgamma.at[..., -1].add(jnp.sum(states * dnext, (-2, -1)))
  drk = einsum("bnhcv,bnhkv->bnhck", delta, dnext)
  dk = dk + c.decay[..., -1, :, None] * drk
  ddecay = ddecay.at[..., -1, :].add(jnp.sum(c.k * drk, -1))

  # delta = u - w S, [u | w] = A^-1 [beta v | beta gam k].
  dw = -einsum("bnhcv,bnhkv->bnhck", ddelta, states)
  drhs = einsum("bnhji,bnhjx->bnhix", c.inv, jnp.concatenate([ddelta, dw], -1))  # A^-T [d delta | dw]
  strict_CxC = jnp.tril(jnp.ones((C, C), bool), -1)
  da = jnp.where(strict_CxC, -einsum("bnhix,bnhjx->bnhij", drhs, c.uw), 0.0)
  dbv, dbgk = drhs[..., :V], drhs[..., V:]
  k_dbgk = jnp.sum(c.k * dbgk, -1)
  dv = c.beta[..., None] * dbv
  dbeta = jnp.sum(c.v * dbv, -1) + c.gamma * k_dbgk
  dgamma = dgamma + c.beta * k_dbgk
  dk = dk + (c.beta * c.gamma)[..., None] * dbgk

  # A_ij = beta_i (k_i . k_j) Gam_ij on the strict lower triangle.
  da_kk = da * c.kk
  dbeta = dbeta + jnp.sum(da_kk * c.decay, -1)
  ddecay = ddecay + c.beta[..., None] * da_kk
  e = da * c.beta[..., None] * c.decay
  dk = dk + einsum("bnhij,bnhjk->bnhik", e, c.k) + einsum("bnhij,bnhik->bnhjk", e, c.k)

  # Gates: Gam_ij = exp(gc_i - gc_j), gam_i = exp(gc_i); g = diff of gc.
  x = ddecay * c.decay
  dgc = jnp.sum(x, -1) - jnp.sum(x, -2) + dgamma * c.gamma
  dg = jnp.flip(jnp.cumsum(jnp.flip(dgc, -1), -1), -1)

  return (_from_chunks(dq, q.dtype), _from_chunks(dk, k.dtype), _from_chunks(dv, v.dtype),
          _from_chunks(dg, g.dtype), _from_chunks(dbeta, beta.dtype), None, dstate0)


_chunked_core.defvjp(_core_fwd, _core_bwd)


def gdn_chunked(
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
  """Chunked form; pads T to a multiple of the chunk with no-op tokens (g=0, beta=0, k=v=q=0)."""
  B, T, H, K = q.shape
  V = v.shape[-1]
  C = min(chunk_size, T)
  pad = -T % C
  resets = segment_resets(segment_ids)
  if pad:
    def pad_t(x):
      return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    q, k, v, g, beta = (pad_t(x) for x in (q, k, v, g, beta))
    resets = None if resets is None else pad_t(resets)
  state = jnp.zeros((B, H, K, V), f32) if initial_state is None else initial_state.astype(f32)
  o, final = _chunked_core(q, k, v, g, beta, resets, state, float(scale), C)
  return o[:, :T], (final if output_final_state else None)
