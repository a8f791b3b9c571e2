"""Causal attention of packed rows (several documents per row) without a T x T tensor, shared by the model's FA
heads (``nn.attention``) and context parallelism (``parallel.context``), which import it from here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas.ops.gpu import attention as pallas_attention

# Pallas flash attention (jax.experimental.pallas.ops.gpu.attention.mha) for packed rows: its authors' default
# tiles (forward 128 x 128, backward 32 x 32); the length is padded at the end to a multiple of PACKED_ALIGN.
PACKED_BLOCKS = pallas_attention.BlockSizes.get_default()
PACKED_ALIGN = 128
# Up to this length a packed row goes through cuDNN with the dense segment mask ([B, 1, T, T] booleans: 256 MiB per
# row at 16K), beyond it through the Pallas kernel. Measured on an H200 at 8K (16 q heads / 8 KV groups, head_dim
# 128, 4 documents, fwd + bwd): cuDNN + mask 5.9 ms, Pallas 8.6 ms, cuDNN one document 3.0 ms
# (docs/evidence/h200-2026-11-30b/packed_attention_8k.jsonl); past 16K the mask's memory grows as T^2.
PACKED_MASK_MAX_T = 16384


def segment_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """[B, 1, T, T] boolean: query and key belong to the same document."""
  return (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]


def packed_implementation(requested: str | None, T: int) -> str:
  """How the cuDNN path attends rows that hold several documents: 'mask' (cuDNN with the dense segment mask; the
  faster one where the mask is small) up to PACKED_MASK_MAX_T, else 'pallas' (segment-aware flash attention, no
  T x T tensor)."""
  if requested is not None:
    return requested
  return "mask" if T <= PACKED_MASK_MAX_T else "pallas"


def pallas_packed_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, *, scale: float,
                            interpret: bool | None = None):
  """Causal attention within documents (equal segment ids) by jax's Pallas flash attention: never a T x T tensor.

  GQA: the kernel has none, so each KV group is repeated for its query heads (group-major, as the weights are;
  its backward sums the copies' gradients). The length is padded at the end to a multiple of PACKED_ALIGN, which
  causality makes exact (no real query sees a padded key; padded queries are sliced off, so their cotangents are
  zero and add nothing to dk, dv). Triton on GPU, the Pallas interpreter elsewhere (``interpret`` None; tests).
  Runs on whole arrays: call it per shard under a mesh (a Pallas call has no SPMD partitioner).
  """
  B, T, H, K = q_BxTxHxK.shape
  r = H // k_BxTxGxK.shape[2]
  k_BxTxHxK, v_BxTxHxK = (jnp.repeat(x, r, axis=2) for x in (k_BxTxGxK, v_BxTxGxK))
  pad = -T % PACKED_ALIGN
  if pad:
    q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
                                       for x in (q_BxTxHxK, k_BxTxHxK, v_BxTxHxK))
    segment_ids_BxT = jnp.pad(segment_ids_BxT, ((0, 0), (0, pad)), mode="edge")
  o_BxTxHxK = pallas_attention.mha(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, segment_ids_BxT.astype(jnp.int32),
                                   sm_scale=scale, causal=True, block_sizes=PACKED_BLOCKS,
                                   interpret=jax.default_backend() != "gpu" if interpret is None else interpret)
  return o_BxTxHxK[:, :T]


def attend_segments(segment_ids_BxT, requested: str | None, *, no_mask, pallas, masked):
  """Causal attention with segment ids on the cuDNN path, chosen at run time: ``no_mask()`` when every row holds
  one document (the mask changes nothing there, and cuDNN would take it as a dense T x T bias), else ``pallas()``
  or ``masked()`` by ``packed_implementation(requested, T)``. The three are zero-argument closures returning the
  same structure; only the branch taken runs (the mask is built inside ``masked`` only)."""
  packed = pallas if packed_implementation(requested, segment_ids_BxT.shape[1]) == "pallas" else masked
  return lax.cond(jnp.all(segment_ids_BxT == segment_ids_BxT[:, :1]), no_mask, packed)
