"""In-kernel math of one chunk of the gated delta rule, shared by the Pallas backends.

Every function works on values already loaded from refs (2-D tiles and 1-D vectors), using only ops that
the Pallas Triton, Mosaic TPU and interpret lowerings all accept (iota, where, exp, dot_general, sums).

Per chunk of C tokens (gc = chunk-local cumsum of g, sid = chunk-local count of segment resets, L = C-1):
  Gam_ij = exp(gc_i - gc_j) [j <= i, sid_i == sid_j]      intra-chunk decay
  d_i    = exp(gc_i) [sid_i == 0]                          decay of the entering state to token i
  e_j    = exp(gc_L - gc_j) [sid_j == sid_L]               decay of token j's write to the chunk end
  gam    = exp(gc_L) [sid_L == 0]                          decay of the entering state to the chunk end
  A      = StrictTril(diag(beta) K K^T * Gam),  T = (I + A)^-1
  W = T diag(beta d) K,  U = T diag(beta) V,  Vn = U - W S
  O = scale (d Q) S + P Vn with P = scale (Q K^T * Gam),   S' = gam S + (e K)^T Vn
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
f32 = jnp.float32


def mm(a: Array, b: Array, *, ta: bool = False, tb: bool = False, precision=None) -> Array:
  """a @ b (a^T if ta, b^T if tb) with a float32 result; a and b must share a dtype."""
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=f32)


def iotas(C: int) -> tuple[Array, Array]:
  return lax.broadcasted_iota(jnp.int32, (C, C), 0), lax.broadcasted_iota(jnp.int32, (C, C), 1)


class Decay(NamedTuple):
  gam_CxC: Array  # masked intra-chunk decay, zero above the diagonal
  d_C: Array
  e_C: Array
  gam_last: Array  # scalar


def chunk_decay(gc_C: Array, gc_last: Array, sid_C: Array | None, sid_last: Array | None) -> Decay:
  """Decay factors of one chunk; never exponentiates a positive number (safe for g down to -inf)."""
  C = gc_C.shape[0]
  row_CxC, col_CxC = iotas(C)
  keep_CxC = row_CxC >= col_CxC
  if sid_C is not None:
    keep_CxC = keep_CxC & (sid_C[:, None] == sid_C[None, :])
  gam_CxC = jnp.exp(jnp.where(keep_CxC, gc_C[:, None] - gc_C[None, :], -jnp.inf))
  d_C = jnp.exp(gc_C)
  e_C = jnp.exp(gc_last - gc_C)
  gam_last = jnp.exp(gc_last)
  if sid_C is not None:
    d_C = jnp.where(sid_C == 0, d_C, 0.0)
    e_C = jnp.where(sid_C == sid_last, e_C, 0.0)
    gam_last = jnp.where(sid_last == 0, gam_last, 0.0)
  return Decay(gam_CxC, d_C, e_C, gam_last)


def chunk_vectors(gc_C: Array, gc_last: Array, sid_C: Array | None, sid_last: Array | None):
  """(d_C, e_C, gam_last) of ``chunk_decay`` without the C x C matrix (for the sequential state passes)."""
  d_C, e_C, gam_last = jnp.exp(gc_C), jnp.exp(gc_last - gc_C), jnp.exp(gc_last)
  if sid_C is not None:
    d_C = jnp.where(sid_C == 0, d_C, 0.0)
    e_C = jnp.where(sid_C == sid_last, e_C, 0.0)
    gam_last = jnp.where(sid_last == 0, gam_last, 0.0)
  return d_C, e_C, gam_last


def strict_lower(x_CxC: Array) -> Array:
  row_CxC, col_CxC = iotas(x_CxC.shape[0])
  return jnp.where(row_CxC > col_CxC, x_CxC, 0.0)


def unit_lower_inverse(a_CxC: Array, precision=None, block: int = 4) -> Array:
  """(I + A)^-1 for strictly lower-triangular A, numerically stable for every A the gated delta rule makes.

  Diagonal blocks of ``block`` rows by forward substitution (row s of every block at once: block - 1 masked
  C x C matmuls), then blocks merged pairwise (4 -> 8 -> ... -> C): with X = D + E, D block-diagonal and E the
  blocks just below it inside the merged block (so E D^-1 E = 0), X^-1 = D^-1 - D^-1 E D^-1 (two matmuls a
  level). Every intermediate is a block of the true inverse, so nothing cancels. Matmuls for C = 64: block 4 (the
  default) 3 + 4 x 2 = 11; block 16 (before 2026-11-30) 15 + 2 x 2 = 19: the substitution's matmuls are as
  dear as the merges' and do less.

  (The Neumann product prod_k (I + (-A)^(2^k)) used before is exact in exact arithmetic, but its powers grow
  to ~binom(C, C/2) |a|^(C/2): with correlated keys and little decay -- a student right after conversion from a
  softmax teacher: beta 0.5, g ~ -0.002, k k^T ~ 0.8 -- float32 lost every digit and the outputs reached 1e8.)
  """
  C = a_CxC.shape[0]
  b = min(block, C)
  row_CxC, col_CxC = iotas(C)
  t_CxC = jnp.where(row_CxC == col_CxC, 1.0, 0.0).astype(a_CxC.dtype)
  in_block = lax.div(row_CxC, b) == lax.div(col_CxC, b)
  row_in_block = lax.rem(row_CxC, b)
  for s in range(1, b):  # rows s of every diagonal block; their earlier rows are final
    t_CxC = t_CxC - mm(jnp.where(in_block & (row_in_block == s), a_CxC, 0.0), t_CxC, precision=precision)
  size = b
  while size < C:  # merge pairs of diagonal blocks of `size` rows
    below = ((lax.div(row_CxC, size) == lax.div(col_CxC, size) + 1)
             & (lax.div(row_CxC, 2 * size) == lax.div(col_CxC, 2 * size)))
    e_CxC = jnp.where(below, a_CxC, 0.0)
    t_CxC = t_CxC - mm(mm(t_CxC, e_CxC, precision=precision), t_CxC, precision=precision)
    size *= 2
  return t_CxC


def wy_matrix(k_CxK: Array, beta_C: Array, dec: Decay, precision=None, inv_precision=None, inv_block: int = 4):
  """K K^T (float32), the strict-lower A and T = (I + A)^-1."""
  kk_CxC = mm(k_CxK, k_CxK, tb=True, precision=precision)
  a_CxC = strict_lower(beta_C[:, None] * kk_CxC * dec.gam_CxC)
  return kk_CxC, a_CxC, unit_lower_inverse(a_CxC, inv_precision, inv_block)


def one_hot_last(C: int, x: Array) -> Array:
  """A [C] vector holding scalar x at position C-1."""
  return jnp.where(lax.broadcasted_iota(jnp.int32, (C,), 0) == C - 1, x, 0.0)
