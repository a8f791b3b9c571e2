"""Cross-checks of the patching scores: the Wu et al. retrieval (copy-paste) score and rank agreement.

Retrieval score (Wu et al., "Retrieval Head Mechanistically Explains the Long-Context Factuality"): at each
scored answer step, a head *copy-pastes* when its most-attended key position lies inside the needle and
holds the very token being produced. The head's score on a probe is the fraction of answer tokens it
copy-pastes; we report the mean over probes (teacher-forced, so every answer token is an opportunity).
Attention weights are recomputed outside the model from the layer's FA parameters and the layer input
(the ``mixer_in`` intermediate): q/k projections, QK-norm when the model has it, RoPE, causal softmax.
Only full-attention heads have attention weights; LA heads of a hybrid model get NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from hydrahead_jax.nn.layers import apply_rope, rms_normalize, rope_angles


@functools.partial(jax.jit, static_argnames=("start", "heads_per_group", "qk_norm", "theta", "eps"))
def attention_at_answers(x_BxSxD, wq_DxHxK, wk_DxGxK, q_scale_K, k_scale_K, *, start, heads_per_group, qk_norm,
                         theta, eps):
  """Attention probabilities of the answer-window queries [B, H, A, S] (A = S - start)."""
  B, S, _ = x_BxSxD.shape
  K = wq_DxHxK.shape[-1]
  x = x_BxSxD.astype(jnp.float32)
  q_BxAxHxK = jnp.einsum("bad,dhk->bahk", x[:, start:], wq_DxHxK.astype(jnp.float32))
  k_BxSxGxK = jnp.einsum("bsd,dgk->bsgk", x, wk_DxGxK.astype(jnp.float32))
  if qk_norm:
    q_BxAxHxK = rms_normalize(q_BxAxHxK, eps) * q_scale_K
    k_BxSxGxK = rms_normalize(k_BxSxGxK, eps) * k_scale_K
  pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  cos, sin = rope_angles(pos, K, theta)
  q_BxAxHxK = apply_rope(q_BxAxHxK, cos[:, start:], sin[:, start:])
  k_BxSxGxK = apply_rope(k_BxSxGxK, cos, sin)
  k_BxSxHxK = jnp.repeat(k_BxSxGxK, heads_per_group, axis=2)
  logits_BxHxAxS = jnp.einsum("bahk,bshk->bhas", q_BxAxHxK, k_BxSxHxK) * K**-0.5
  causal_AxS = jnp.arange(S)[None, :] <= jnp.arange(start, S)[:, None]
  logits_BxHxAxS = jnp.where(causal_AxS, logits_BxHxAxS, -jnp.inf)
  return jax.nn.softmax(logits_BxHxAxS, axis=-1)


@functools.partial(jax.jit, static_argnames=("start",))
def _copy_stats(probs_BxHxAxS, tokens_BxS, targets_BxS, weights_BxS, needle_BxS, *, start):
  """Per probe and head: fraction of answer tokens copy-pasted [B, H]; attention mass on the needle [B, H]."""
  top_BxHxA = jnp.argmax(probs_BxHxAxS, axis=-1)
  tgt_BxA, w_BxA = targets_BxS[:, start:], weights_BxS[:, start:]
  src_BxHxA = jnp.take_along_axis(tokens_BxS[:, None, :], top_BxHxA.reshape(top_BxHxA.shape[0], -1)[:, None],
                                  axis=-1).reshape(top_BxHxA.shape)
  in_needle_BxHxA = jnp.take_along_axis(needle_BxS[:, None, :], top_BxHxA.reshape(top_BxHxA.shape[0], -1)[:, None],
                                        axis=-1).reshape(top_BxHxA.shape)
  hit = (src_BxHxA == tgt_BxA[:, None]) & in_needle_BxHxA
  denom_B = jnp.maximum(jnp.sum(w_BxA, axis=-1), 1e-9)
  copy_BxH = jnp.sum(hit * w_BxA[:, None], axis=-1) / denom_B[:, None]
  mass_BxHxA = jnp.sum(probs_BxHxAxS * needle_BxS[:, None, None, :], axis=-1)
  mass_BxH = jnp.sum(mass_BxHxA * w_BxA[:, None], axis=-1) / denom_B[:, None]
  return copy_BxH, mass_BxH


def layer_fa_params(flat: dict, cfg, layer: int):
  """(wq, wk, q_scale, k_scale) of a layer's FA heads, or None when the layer has none."""
  p = f"layers.{layer}.mixer.fa."
  if p + "wq" not in flat:
    return None
  K = cfg.head_dim
  ones = np.ones(K, np.float32)
  return (flat[p + "wq"], flat[p + "wk"], flat.get(p + "q_norm.scale", ones), flat.get(p + "k_norm.scale", ones))


class RetrievalScorer:
  """Accumulates Wu et al. retrieval scores over probe batches (feed it the clean runs' ``mixer_in``)."""

  def __init__(self, cfg, flat: dict):
    self.cfg = cfg
    self.params = [layer_fa_params(flat, cfg, l) for l in range(cfg.num_layers)]
    self.copy: list[np.ndarray] = []  # [B, L, H] per batch
    self.mass: list[np.ndarray] = []

  def add(self, mixer_in_LxBxSxD, tokens_BxS, targets_BxS, weights_BxS, needle_BxS, start: int, n: int) -> None:
    cfg = self.cfg
    B = tokens_BxS.shape[0]
    copy = np.full((B, cfg.num_layers, cfg.num_heads), np.nan)
    mass = np.full((B, cfg.num_layers, cfg.num_heads), np.nan)
    for l, prm in enumerate(self.params):
      if prm is None:
        continue
      wq, wk, qs, ks = prm
      probs = attention_at_answers(mixer_in_LxBxSxD[l], wq, wk, qs, ks, start=start,
                                   heads_per_group=cfg.heads_per_group, qk_norm=cfg.qk_norm,
                                   theta=float(cfg.rope_theta), eps=float(cfg.rms_eps))
      c, m = _copy_stats(probs, tokens_BxS, targets_BxS, weights_BxS, needle_BxS, start=start)
      copy[:, l, : wq.shape[1]], mass[:, l, : wq.shape[1]] = np.asarray(c), np.asarray(m)
    self.copy.append(copy[:n])
    self.mass.append(mass[:n])

  def result(self) -> dict:
    copy, mass = np.concatenate(self.copy), np.concatenate(self.mass)
    return {"grid": copy.mean(axis=0), "needle_attention": mass.mean(axis=0), "per_probe": copy}


# -- rank agreement ------------------------------------------------------------------------------------
def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman rank correlation over the entries finite in both (NaN if fewer than 3 or a constant side)."""
  a, b = np.ravel(a), np.ravel(b)
  ok = np.isfinite(a) & np.isfinite(b)
  if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
    return float("nan")
  return float(scipy.stats.spearmanr(a[ok], b[ok]).statistic)


def top_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
  """Fraction of the top-k entries of ``a`` that are also in the top-k of ``b``."""
  a, b = np.nan_to_num(np.ravel(a), nan=-np.inf), np.nan_to_num(np.ravel(b), nan=-np.inf)
  ta, tb = set(np.argsort(-a)[:k].tolist()), set(np.argsort(-b)[:k].tolist())
  return len(ta & tb) / max(k, 1)


def agreement(grids: dict[str, np.ndarray], reference: str, k: int) -> dict[str, dict[str, float]]:
  """Spearman and top-k overlap of every score grid against ``reference``."""
  ref = grids[reference]
  return {name: {"spearman": spearman(ref, g), f"top{k}_overlap": top_overlap(ref, g, k)}
          for name, g in grids.items() if name != reference}
