"""The reference every backend of the fused short convolution matches: pure JAX, written from the math of
the model layers' ``causal_depthwise_conv`` + SiLU (+ ``l2_normalize`` per head), as the model's Gated DeltaNet
heads apply it to q, k (normalised) and v (not).

For x [B, T, C], w [W, C] and optional segment_ids [B, T], in float32:
  u_t = sum_{j<W} w[W-1-j] x_{t-j}   (taps before t=0 or across a segment boundary read zero)
  s_t = SiLU(u_t)
  y_t = s_t * rsqrt(sum over each head's K channels of s_t^2 + 1e-6)   (head_dim=K; head_dim=None: y = s)
C = H*K with heads as contiguous groups of K channels. The result is cast to x's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
f32 = jnp.float32
EPS = 1e-6


def check_args(x_BxTxC, w_WxC, segment_ids_BxT=None, head_dim: int | None = None) -> None:
  """One ValueError naming the bad argument."""
  if x_BxTxC.ndim != 3:
    raise ValueError(f"x must be [B, T, C], got shape {tuple(x_BxTxC.shape)}")
  if not jnp.issubdtype(x_BxTxC.dtype, jnp.floating):
    raise ValueError(f"x must be floating point, got dtype {x_BxTxC.dtype}")
  B, T, C = x_BxTxC.shape
  if w_WxC.ndim != 2:
    raise ValueError(f"w must be [W, C], got shape {tuple(w_WxC.shape)}")
  if not jnp.issubdtype(w_WxC.dtype, jnp.floating):
    raise ValueError(f"w must be floating point, got dtype {w_WxC.dtype}")
  if w_WxC.shape[0] < 1:
    raise ValueError(f"w must have a width W >= 1 (shape [W, C]), got shape {tuple(w_WxC.shape)}")
  if w_WxC.shape[1] != C:
    raise ValueError(f"w has {w_WxC.shape[1]} channels (shape {tuple(w_WxC.shape)}), x has C={C}")
  if head_dim is not None:
    if isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)) or head_dim < 1:
      raise ValueError(f"head_dim must be None or a positive int, got {head_dim!r}")
    if C % head_dim:
      raise ValueError(f"head_dim={head_dim} does not divide the channel count C={C}")
  if segment_ids_BxT is not None:
    if tuple(segment_ids_BxT.shape) != (B, T):
      raise ValueError(f"segment_ids has shape {tuple(segment_ids_BxT.shape)}, expected [B, T] = {(B, T)}")
    if not jnp.issubdtype(segment_ids_BxT.dtype, jnp.integer):
      raise ValueError(f"segment_ids must be an integer array (int32), got dtype {segment_ids_BxT.dtype}")


def short_conv_reference(x_BxTxC: Array, w_WxC: Array, segment_ids_BxT: Array | None = None, *,
                         head_dim: int | None = None) -> Array:
  """SiLU(causal depthwise conv), L2-normalised per head of ``head_dim`` channels when given; x's dtype."""
  check_args(x_BxTxC, w_WxC, segment_ids_BxT, head_dim)
  B, T, C = x_BxTxC.shape
  W = w_WxC.shape[0]
  x, w = x_BxTxC.astype(f32), w_WxC.astype(f32)
  u = x * w[W - 1]
  for j in range(1, W):
    shifted = jnp.pad(x, ((0, 0), (j, 0), (0, 0)))[:, :T]
    if segment_ids_BxT is not None:
      seg = segment_ids_BxT.astype(jnp.int32)
      seg_prev = jnp.pad(seg, ((0, 0), (j, 0)), constant_values=-1)[:, :T]
      shifted = jnp.where((seg_prev == seg)[..., None], shifted, 0.0)
    u = u + shifted * w[W - 1 - j]
  s = jax.nn.silu(u)
  if head_dim is not None:
    s_h = s.reshape(B, T, C // head_dim, head_dim)
    s = (s_h * jax.lax.rsqrt(jnp.sum(s_h * s_h, axis=-1, keepdims=True) + EPS)).reshape(B, T, C)
  return s.astype(x_BxTxC.dtype)
