"""Layer similarity: linear CKA between per-layer attention outputs (the ``mixer_out`` intermediates).

``CKA(X, Y) = <Kx, Ky>_F / (||Kx||_F ||Ky||_F)`` with ``Kx = Xc Xc^T`` the Gram matrix of the column-centred
token features (Kornblith et al. 2019, linear kernel). Tokens are subsampled (``max_tokens``) so the cost is
``L * N^2 * D`` for the Gram matrices plus ``L^2 * N^2`` for the pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


class TokenSampler:
  """Keeps a fixed random subset of token positions from successive [L, B, S, D] batches."""

  def __init__(self, max_tokens: int = 2048, seed: int = 0):
    self.max_tokens, self.rng = max_tokens, np.random.default_rng(seed)
    self.chunks: list[np.ndarray] = []
    self.count = 0

  def add(self, feats_LxBxSxD, valid_BxS: np.ndarray, budget: int | None = None) -> None:
    """Adds up to ``budget`` (default: an even share of what is left) random valid tokens of a batch."""
    left = self.max_tokens - self.count
    if left <= 0:
      return
    b_idx, s_idx = np.nonzero(valid_BxS)
    take = min(left, len(b_idx), budget if budget is not None else left)
    pick = self.rng.choice(len(b_idx), size=take, replace=False)
    sel = np.asarray(feats_LxBxSxD[:, b_idx[pick], s_idx[pick]], np.float32)  # [L, n, D]
    self.chunks.append(sel)
    self.count += take

  def features(self) -> np.ndarray:
    if not self.chunks:
      raise ValueError("similarity: no tokens collected")
    return np.concatenate(self.chunks, axis=1)


@jax.jit
def linear_cka(feats_LxNxD: jax.Array) -> jax.Array:
  """[L, L] linear CKA between the layers' token features."""
  x = feats_LxNxD.astype(jnp.float32)
  x = x - x.mean(axis=1, keepdims=True)
  gram_LxNxN = jnp.einsum("lnd,lmd->lnm", x, x)
  flat = gram_LxNxN.reshape(gram_LxNxN.shape[0], -1)
  inner = flat @ flat.T
  norm = jnp.sqrt(jnp.diag(inner))
  return inner / jnp.maximum(norm[:, None] * norm[None, :], 1e-30)


def block_structure(cka_LxL: np.ndarray, threshold: float = 0.5) -> list[list[int]]:
  """Consecutive layers whose CKA with the block's first layer stays >= ``threshold`` (a quick summary)."""
  blocks, cur = [], [0]
  for l in range(1, cka_LxL.shape[0]):
    if cka_LxL[cur[0], l] >= threshold:
      cur.append(l)
    else:
      blocks.append(cur)
      cur = [l]
  blocks.append(cur)
  return blocks
