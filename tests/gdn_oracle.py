"""Independent float64 NumPy oracle for the gated delta rule, and realistic random inputs (shared by GDN tests)."""

from __future__ import annotations

import numpy as np


def gdn_numpy(q, k, v, g, beta, *, scale=None, initial_state=None, segment_ids=None):
  """Plain loops with explicit matrices: S = exp(g) (I - b k k^T) S + b k v^T, o = scale S^T q (float64)."""
  q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
  B, T, H, K = q.shape
  V = v.shape[-1]
  scale = K**-0.5 if scale is None else scale
  o = np.zeros((B, T, H, V))
  final = np.zeros((B, H, K, V))
  for b in range(B):
    for h in range(H):
      S = np.zeros((K, V)) if initial_state is None else np.asarray(initial_state[b, h], np.float64).copy()
      for t in range(T):
        if segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
          S = np.zeros((K, V))
        kt = k[b, t, h][:, None]
        transition = np.exp(g[b, t, h]) * (np.eye(K) - beta[b, t, h] * kt @ kt.T)
        S = transition @ S + beta[b, t, h] * kt @ v[b, t, h][None, :]
        o[b, t, h] = scale * S.T @ q[b, t, h]
      final[b, h] = S
  return o, final


def realistic_inputs(rng: np.random.Generator, B: int, T: int, H: int, K: int, V: int, dtype=np.float32):
  """q, k L2-normalised along K; beta = sigmoid(.) in (0, 1); g = -softplus(.) < 0; state ~ N(0, 0.5^2)."""

  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  q = unit(rng.normal(size=(B, T, H, K)))
  k = unit(rng.normal(size=(B, T, H, K)))
  v = rng.normal(size=(B, T, H, V))
  g = -np.logaddexp(0.0, rng.normal(-1.0, 1.5, size=(B, T, H)))
  beta = 1.0 / (1.0 + np.exp(-rng.normal(0.0, 1.5, size=(B, T, H))))
  state = 0.5 * rng.normal(size=(B, H, K, V))
  return tuple(x.astype(dtype) for x in (q, k, v, g, beta, state))


def random_segments(rng: np.random.Generator, B: int, T: int, p: float = 0.08,
                    forced: tuple[int, ...] = ()) -> np.ndarray:
  """int32 [B, T] segment ids: random document starts (probability p per token) plus starts at ``forced``."""
  starts = rng.random((B, T)) < p
  starts[:, list(forced)] = True
  starts[:, 0] = False
  return np.cumsum(starts, axis=1).astype(np.int32) + rng.integers(0, 5, size=(B, 1)).astype(np.int32)
