"""Causal (activation) patching of every attention head, batched; attribution patching as a screen.

For a probe with clean / corrupted prompts and metric ``m = log p(clean answer)`` (teacher-forced):

- exact patching score of head (l, h): ``(m_clean - m_patched) / (m_clean - m_corrupt)`` where ``m_patched`` is
  the clean run with that head's raw output (before fusion and W_o) replaced by its corrupted-run value at every
  position. Heads are patched through the model's ``head_patch`` argument; the one-hot head masks are mapped
  with ``jax.lax.map(..., batch_size=chunk)``, i.e. ``chunk`` patched copies of a probe batch run as one
  vmapped forward; there is no Python loop over heads.
- attribution patching: the first-order estimate ``-(dm/dmask) / (m_clean - m_corrupt)``. With
  ``out = raw * (1 - mask) + corrupt * mask``, ``dm/dmask`` at mask = 0 is exactly gradient x (corrupt - clean)
  summed over positions and channels, i.e. one forward + backward per probe for all heads.
- mean ablation: the head's output replaced by its mean over the clean probe tokens (a cross-check; the
  same machinery with a broadcast value).

Scores are averaged over the probes whose ``m_clean - m_corrupt >= min_delta`` (probes that the model does
not solve carry no signal and would divide by ~0); the kept count is reported.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hydrahead_jax.selection.probes import ProbeSet


# -- jitted cores ------------------------------------------------------------------------------------
def _merge_here(graphdef, state):
  """``nnx.merge`` with Variables re-created in the current trace (needed inside vmap / lax.map bodies,
  where nnx refuses Variables created at the outer jit level)."""
  return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))


def answer_stats(logits_BxAxV, targets_BxA, weights_BxA):
  """(sum of weighted log p(target) [B], all weighted targets are the argmax [B])."""
  logp = jax.nn.log_softmax(logits_BxAxV.astype(jnp.float32), axis=-1)
  tok_BxA = jnp.take_along_axis(logp, targets_BxA[..., None], axis=-1)[..., 0]
  hit_BxA = jnp.argmax(logits_BxAxV, axis=-1) == targets_BxA
  m_B = jnp.sum(tok_BxA * weights_BxA, axis=-1)
  correct_B = jnp.all(hit_BxA | (weights_BxA == 0), axis=-1)
  return m_B, correct_B


@functools.partial(jax.jit, static_argnames=("graphdef", "start", "keep"))
def _run(graphdef, state, tokens_BxS, targets_BxS, weights_BxS, *, start, keep):
  model = nnx.merge(graphdef, state)
  logits, inter = model.intermediates(tokens_BxS, keep) if keep else (model(tokens_BxS), {})
  m, ok = answer_stats(logits[:, start:], targets_BxS[:, start:], weights_BxS[:, start:])
  return m, ok, inter


@functools.partial(jax.jit, static_argnames=("graphdef", "start", "chunk"))
def _patched(graphdef, state, tokens_BxS, targets_BxS, weights_BxS, values, masks_MxLxH, *, start, chunk):
  """Metric of every patched copy: [M, B] (log p) and [M, B] (correct). ``values`` broadcasts to [L,B,S,H,K]."""
  def one(mask_LxH):
    model = _merge_here(graphdef, state)
    logits = model(tokens_BxS, head_patch=(mask_LxH, values))
    return answer_stats(logits[:, start:], targets_BxS[:, start:], weights_BxS[:, start:])

  return jax.lax.map(one, masks_MxLxH, batch_size=chunk)


@functools.partial(jax.jit, static_argnames=("graphdef", "start"))
def _attribution(graphdef, state, tokens_BxS, targets_BxS, weights_BxS, corrupt_LxBxSxHxK, *, start):
  """Per probe, d m / d mask at mask = 0 with corrupted values: [B, L, H]."""
  L, _, _, H, _ = corrupt_LxBxSxHxK.shape

  def metric(mask_LxH, tok_S, tgt_S, w_S, val_LxSxHxK):
    model = _merge_here(graphdef, state)
    logits = model(tok_S[None], head_patch=(mask_LxH, val_LxSxHxK[:, None]))
    m, _ = answer_stats(logits[:, start:], tgt_S[None, start:], w_S[None, start:])
    return m[0]

  grad = jax.grad(metric)
  zeros = jnp.zeros((L, H), jnp.float32)
  return jax.vmap(grad, in_axes=(None, 0, 0, 0, 1))(zeros, tokens_BxS, targets_BxS, weights_BxS, corrupt_LxBxSxHxK)


# -- batching ----------------------------------------------------------------------------------------
def batches(n: int, batch_size: int) -> list[np.ndarray]:
  """Row indices per batch; the last batch is padded with row 0 (its results are dropped)."""
  out = []
  for s in range(0, n, batch_size):
    idx = np.arange(s, min(s + batch_size, n))
    out.append(np.concatenate([idx, np.zeros(batch_size - len(idx), int)]) if len(idx) < batch_size else idx)
  return out


def _take(probes: ProbeSet, idx: np.ndarray):
  return (jnp.asarray(probes.clean[idx]), jnp.asarray(probes.corrupt[idx]), jnp.asarray(probes.targets[idx]),
          jnp.asarray(probes.weights[idx]))


def head_masks(num_layers: int, num_heads: int, heads: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
  """One-hot [M, L, H] masks (all heads by default, in row-major (layer, head) order)."""
  heads = [(l, h) for l in range(num_layers) for h in range(num_heads)] if heads is None else list(heads)
  masks = np.zeros((len(heads), num_layers, num_heads), np.float32)
  for i, (l, h) in enumerate(heads):
    masks[i, l, h] = 1.0
  return masks


@dataclasses.dataclass
class BaseRuns:
  """Clean and corrupted runs of every probe (metrics, accuracy) and the per-head mean output."""

  m_clean: np.ndarray  # [N]
  m_corrupt: np.ndarray  # [N]
  correct_clean: np.ndarray  # [N] bool
  correct_corrupt: np.ndarray  # [N] bool
  head_mean: np.ndarray  # [L, H, K] mean raw head output over clean prompt tokens
  seconds: float

  @property
  def delta(self) -> np.ndarray:
    return self.m_clean - self.m_corrupt

  def kept(self, min_delta: float) -> np.ndarray:
    return self.delta >= min_delta


def _progress(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=desc, leave=False)


class HeadPatcher:
  """Batched patching experiments on one model (``model`` is split once; jitted per batch shape).

  ``on_batch(name, idx, result)`` hooks let callers (e.g. the retrieval cross-check) reuse each batch.
  """

  def __init__(self, model, *, batch_size: int = 4, chunk: int = 8, grad_batch: int | None = None,
               progress: bool = False):
    if batch_size < 1 or chunk < 1:
      raise ValueError(f"patching: batch_size and chunk must be >= 1, got {batch_size}, {chunk}")
    self.cfg = model.cfg
    self.graphdef, self.state = nnx.split(model)
    self.batch_size, self.chunk, self.progress = batch_size, chunk, progress
    self.grad_batch = batch_size if grad_batch is None else max(1, min(grad_batch, batch_size))
    self.batch_seconds: list[float] = []  # wall time of each patched batch (the first includes compilation)

  # -- runs ----------------------------------------------------------------------------------------
  def run(self, tokens_BxS, targets_BxS, weights_BxS, start: int, keep=("heads",)):
    return _run(self.graphdef, self.state, tokens_BxS, targets_BxS, weights_BxS, start=start, keep=tuple(keep))

  def base(self, probes: ProbeSet, on_batch: Callable | None = None, keep_clean=("heads",)) -> BaseRuns:
    """Clean + corrupted runs of every probe; ``on_batch(idx, n_real, inter_clean, inter_corrupt)``."""
    t0 = time.perf_counter()
    N, L, H, K = probes.num, self.cfg.num_layers, self.cfg.num_heads, self.cfg.head_dim
    out = {k: np.zeros(N) for k in ("mc", "mx")}
    okc, okx = np.zeros(N, bool), np.zeros(N, bool)
    head_sum, count = np.zeros((L, H, K)), 0
    keep_clean = tuple(sorted(set(keep_clean) | {"heads"}))
    bar = _progress(N, "clean/corrupt runs", self.progress)
    for idx in batches(N, self.batch_size):
      n = min(len(idx), N - int(idx[0]))
      clean, corrupt, tgt, w = _take(probes, idx)
      mc, oc, ic = self.run(clean, tgt, w, probes.start, keep_clean)
      mx, ox, ix = self.run(corrupt, tgt, w, probes.start, ("heads",))
      sl = idx[:n]
      out["mc"][sl], out["mx"][sl] = np.asarray(mc)[:n], np.asarray(mx)[:n]
      okc[sl], okx[sl] = np.asarray(oc)[:n], np.asarray(ox)[:n]
      heads = ic["heads"][:, :n, : probes.prompt_len].astype(jnp.float32)
      head_sum += np.asarray(jnp.sum(heads, axis=(1, 2)), np.float64)
      count += n * probes.prompt_len
      if on_batch is not None:
        on_batch(idx, n, ic, ix)
      if bar:
        bar.update(n)
    if bar:
      bar.close()
    return BaseRuns(out["mc"], out["mx"], okc, okx, (head_sum / count).astype(np.float32),
                    time.perf_counter() - t0)

  def patched_metrics(self, probes: ProbeSet, masks_MxLxH: np.ndarray, values: str | np.ndarray = "corrupt",
                      desc: str = "patching") -> tuple[np.ndarray, np.ndarray]:
    """m and correctness [M, N] of the clean runs patched by each mask.

    ``values``: 'corrupt' (the corrupted run's head outputs: activation patching) or an array
    broadcastable to [L, B, S, H, K] (e.g. per-head means [L, 1, 1, H, K]: mean ablation).
    """
    N = probes.num
    M = masks_MxLxH.shape[0]
    m_out, ok_out = np.zeros((M, N)), np.zeros((M, N), bool)
    masks = jnp.asarray(masks_MxLxH, jnp.float32)
    fixed = None if isinstance(values, str) else jnp.asarray(values)
    if fixed is None and values != "corrupt":
      raise ValueError(f"patching.values: 'corrupt' or an array, got {values!r}")
    bar = _progress(N, desc, self.progress)
    for idx in batches(N, self.batch_size):
      n = min(len(idx), N - int(idx[0]))
      clean, corrupt, tgt, w = _take(probes, idx)
      if fixed is None:
        _, _, inter = self.run(corrupt, tgt, w, probes.start, ("heads",))
        vals = inter["heads"]
      else:
        vals = fixed
      t0 = time.perf_counter()
      m, ok = _patched(self.graphdef, self.state, clean, tgt, w, vals, masks, start=probes.start,
                       chunk=min(self.chunk, M))
      m_out[:, idx[:n]], ok_out[:, idx[:n]] = np.asarray(m)[:, :n], np.asarray(ok)[:, :n]
      self.batch_seconds.append(time.perf_counter() - t0)
      if bar:
        bar.update(n)
    if bar:
      bar.close()
    return m_out, ok_out

  def attribution(self, probes: ProbeSet) -> np.ndarray:
    """d m / d mask at mask = 0 (corrupted values) per probe: [N, L, H]."""
    N, L, H = probes.num, self.cfg.num_layers, self.cfg.num_heads
    out = np.zeros((N, L, H))
    bar = _progress(N, "attribution", self.progress)
    for idx in batches(N, self.batch_size):
      n = min(len(idx), N - int(idx[0]))
      clean, corrupt, tgt, w = _take(probes, idx)
      _, _, inter = self.run(corrupt, tgt, w, probes.start, ("heads",))
      gb = self.grad_batch  # backward memory grows with the probes differentiated at once
      g = np.concatenate([np.asarray(_attribution(self.graphdef, self.state, clean[i:i + gb], tgt[i:i + gb],
                                                  w[i:i + gb], inter["heads"][:, i:i + gb], start=probes.start))
                          for i in range(0, len(idx), gb)])
      out[idx[:n]] = g[:n]
      if bar:
        bar.update(n)
    if bar:
      bar.close()
    return out


# -- scores ------------------------------------------------------------------------------------------
def normalized_drop(base: BaseRuns, m_patched_MxN: np.ndarray) -> np.ndarray:
  """Per probe (m_clean - m_patched) / (m_clean - m_corrupt): [N, M]."""
  return ((base.m_clean[None] - m_patched_MxN) / base.delta[None]).T


def masked_mean(per_probe_NxX: np.ndarray, kept_N: np.ndarray) -> np.ndarray:
  if not kept_N.any():
    return np.full(per_probe_NxX.shape[1:], np.nan)
  return per_probe_NxX[kept_N].mean(axis=0)


def to_grid(values_M: np.ndarray, heads: Sequence[tuple[int, int]], L: int, H: int) -> np.ndarray:
  grid = np.full((L, H), np.nan)
  for v, (l, h) in zip(values_M, heads):
    grid[l, h] = v
  return grid


def exact_scores(patcher: HeadPatcher, probes: ProbeSet, base: BaseRuns, *, min_delta: float,
                 heads: Sequence[tuple[int, int]] | None = None) -> dict:
  """Exact activation-patching score of every head in ``heads`` (default all): grid [L, H] (nan = not run)."""
  L, H = patcher.cfg.num_layers, patcher.cfg.num_heads
  heads = [(l, h) for l in range(L) for h in range(H)] if heads is None else [tuple(x) for x in heads]
  t0 = time.perf_counter()
  m, _ = patcher.patched_metrics(probes, head_masks(L, H, heads), "corrupt", desc="exact patching")
  per_probe = normalized_drop(base, m)  # [N, M]
  kept = base.kept(min_delta)
  return {"grid": to_grid(masked_mean(per_probe, kept), heads, L, H),
          "per_probe": np.stack([to_grid(p, heads, L, H) for p in per_probe]),
          "seconds": time.perf_counter() - t0, "forwards": len(heads) * probes.num}


def attribution_scores(patcher: HeadPatcher, probes: ProbeSet, base: BaseRuns, *, min_delta: float) -> dict:
  t0 = time.perf_counter()
  g = patcher.attribution(probes)  # [N, L, H]
  per_probe = -g / base.delta[:, None, None]
  return {"grid": masked_mean(per_probe, base.kept(min_delta)), "per_probe": per_probe,
          "seconds": time.perf_counter() - t0}


def mean_ablation_scores(patcher: HeadPatcher, probes: ProbeSet, base: BaseRuns, *, min_delta: float) -> dict:
  """Each head replaced by its mean output over clean prompt tokens; same normalisation as exact patching."""
  L, H = patcher.cfg.num_layers, patcher.cfg.num_heads
  t0 = time.perf_counter()
  heads = [(l, h) for l in range(L) for h in range(H)]
  m, _ = patcher.patched_metrics(probes, head_masks(L, H), base.head_mean[:, None, None], desc="mean ablation")
  per_probe = normalized_drop(base, m)
  return {"grid": to_grid(masked_mean(per_probe, base.kept(min_delta)), heads, L, H),
          "seconds": time.perf_counter() - t0}


def ablation_accuracy(patcher: HeadPatcher, probes: ProbeSet, base: BaseRuns, masks_MxLxH: np.ndarray) -> dict:
  """Needle accuracy (every scored answer token is the argmax, i.e. greedy decoding would answer) with the
  heads of each mask replaced by their mean output; [M] accuracies and mean log p."""
  m, ok = patcher.patched_metrics(probes, masks_MxLxH, base.head_mean[:, None, None], desc="ablation")
  return {"accuracy": ok.mean(axis=1), "logp": m.mean(axis=1), "num_probes": probes.num}
