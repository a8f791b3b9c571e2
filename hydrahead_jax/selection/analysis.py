"""The whole head analysis of one model on probe sets (one per context length), and the causal test.

Per probe set: clean/corrupt runs (feeding the retrieval cross-check and the CKA token sample), attribution
patching, exact patching (every head, or only the top ``screen_top`` heads of the attribution screen), mean
ablation. Scores of several lengths are combined as the mean over all kept probes (each length weighted by
its kept probe count).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import numpy as np

from hydrahead_jax.interop.names import model_to_flat
from hydrahead_jax.selection import crosschecks, patching, similarity
from hydrahead_jax.selection.probes import ProbeSet

METHODS = ("exact", "attribution", "retrieval", "mean_ablation")


@dataclasses.dataclass
class AnalysisConfig:
  min_delta: float = 0.5  # probes with m_clean - m_corrupt below this (nats) carry no signal
  batch_size: int = 4
  chunk: int = 8  # patched copies per vmapped forward
  grad_batch: int | None = None  # probes per attribution backward (default batch_size)
  tokens_per_forward: int | None = None  # if set, chunk = max(1, this // (batch_size * length)) per probe set
  exact_only_above: int | None = None  # longer probe sets: only exact patching + retrieval (time / memory)
  methods: tuple[str, ...] = METHODS
  screen_top: int | None = None  # exact patching only on the top-N heads of the attribution screen
  cka_tokens: int = 2048
  seed: int = 0
  progress: bool = False

  def __post_init__(self):
    bad = [m for m in self.methods if m not in METHODS]
    if bad:
      raise ValueError(f"analysis.methods: unknown {bad}; choose from {METHODS}")
    if "exact" not in self.methods and "attribution" not in self.methods:
      raise ValueError("analysis.methods: need 'exact' or 'attribution' to rank heads")
    if self.screen_top is not None and "attribution" not in self.methods:
      raise ValueError("analysis.screen_top: the screen needs 'attribution' in methods")


def _combine(grids: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
  num = sum(np.nan_to_num(g) * w for g, w in zip(grids, weights))
  den = sum(np.isfinite(g) * w for g, w in zip(grids, weights))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, num / np.maximum(den, 1e-30), np.nan)


def analyze_probes(model, probes: ProbeSet, acfg: AnalysisConfig, patcher=None, sampler=None,
                   cka_budget: int = 0) -> dict:
  """All requested scores of one probe set."""
  cfg = model.cfg
  if acfg.exact_only_above is not None and probes.prompt_len > acfg.exact_only_above:
    acfg = dataclasses.replace(acfg, methods=tuple(m for m in acfg.methods if m in ("exact", "retrieval")))
  patcher = patcher or patching.HeadPatcher(model, batch_size=acfg.batch_size, chunk=acfg.chunk,
                                            grad_batch=acfg.grad_batch, progress=acfg.progress)
  retr = crosschecks.RetrievalScorer(cfg, model_to_flat(model)) if "retrieval" in acfg.methods else None
  n_batches = -(-probes.num // acfg.batch_size)
  keep = ["heads"] + (["mixer_in"] if retr else []) + (["mixer_out"] if sampler is not None else [])
  valid = np.zeros((acfg.batch_size, probes.length), bool)
  valid[:, : probes.prompt_len] = True

  def on_batch(idx, n, ic, ix):
    if retr is not None:
      retr.add(ic["mixer_in"], probes.clean[idx], probes.targets[idx], probes.weights[idx], probes.needle[idx],
               probes.start, n)
    if sampler is not None:
      v = valid.copy()
      v[n:] = False
      sampler.add(ic["mixer_out"], v, budget=max(1, cka_budget // n_batches))

  out: dict = {"length": probes.prompt_len, "num": probes.num, "tasks": sorted(set(probes.tasks.tolist())),
               "min_delta": acfg.min_delta}
  base = patcher.base(probes, on_batch, keep_clean=tuple(keep))
  kept = base.kept(acfg.min_delta)
  out.update(kept=int(kept.sum()), clean_accuracy=float(base.correct_clean.mean()),
             corrupt_accuracy=float(base.correct_corrupt.mean()), m_clean=base.m_clean, m_corrupt=base.m_corrupt,
             seconds={"base": base.seconds})
  grids = {}
  if "attribution" in acfg.methods:
    r = patching.attribution_scores(patcher, probes, base, min_delta=acfg.min_delta)
    grids["attribution"], out["seconds"]["attribution"] = r["grid"], r["seconds"]
  if "exact" in acfg.methods:
    heads = None
    if acfg.screen_top is not None:
      heads = [(l, h) for l, h, _ in _top(grids["attribution"], acfg.screen_top)]
    patcher.batch_seconds = []
    r = patching.exact_scores(patcher, probes, base, min_delta=acfg.min_delta, heads=heads)
    grids["exact"], out["seconds"]["exact"], out["exact_forwards"] = r["grid"], r["seconds"], r["forwards"]
    bs = patcher.batch_seconds
    if len(bs) > 1:  # without the first batch (compilation): all heads of all probes at steady state
      out["seconds"]["exact_steady_estimate"] = float(np.mean(bs[1:]) * len(bs))
    out["exact_heads"] = len(heads) if heads is not None else cfg.num_layers * cfg.num_heads
    out["exact_per_probe"] = r["per_probe"]
  if "mean_ablation" in acfg.methods:
    r = patching.mean_ablation_scores(patcher, probes, base, min_delta=acfg.min_delta)
    grids["mean_ablation"], out["seconds"]["mean_ablation"] = r["grid"], r["seconds"]
  if retr is not None:
    r = retr.result()
    grids["retrieval"], grids["needle_attention"] = r["grid"], r["needle_attention"]
  out["grids"] = grids
  return out


def _top(scores: np.ndarray, k: int):
  flat = np.nan_to_num(scores, nan=-np.inf).ravel()
  H = scores.shape[1]
  return [(int(i // H), int(i % H), float(flat[i])) for i in np.argsort(-flat, kind="stable")[:k]]


def analyze(model, probe_sets: Sequence[ProbeSet], acfg: AnalysisConfig, *, name: str = "model") -> dict:
  """Scores over every probe set, combined; CKA matrix; rank agreement; timings."""
  cfg = model.cfg
  t0 = time.perf_counter()
  patcher = patching.HeadPatcher(model, batch_size=acfg.batch_size, chunk=acfg.chunk, grad_batch=acfg.grad_batch,
                                 progress=acfg.progress)
  sampler = similarity.TokenSampler(acfg.cka_tokens, acfg.seed)
  per = []
  for ps in probe_sets:  # an even share of the CKA token sample per length
    if acfg.tokens_per_forward:
      patcher.chunk = max(1, acfg.tokens_per_forward // (acfg.batch_size * ps.length))
    per.append(analyze_probes(model, ps, acfg, patcher, sampler, acfg.cka_tokens // len(probe_sets)))
  weights = [p["kept"] for p in per]
  if sum(weights) == 0:
    weights = [1] * len(per)  # nothing solved: keep the (noisy) means rather than nothing
  names = sorted(set().union(*[p["grids"] for p in per]))
  combined = {n: _combine([p["grids"][n] for p in per if n in p["grids"]],
                          [w for p, w in zip(per, weights) if n in p["grids"]]) for n in names}
  sel_name = "exact" if "exact" in combined else "attribution"
  k = max(1, int(round(cfg.num_layers * cfg.num_heads / 8)))
  agree = crosschecks.agreement(combined, sel_name, k) if len(combined) > 1 else {}
  cka = np.asarray(similarity.linear_cka(sampler.features())) if sampler.count else None
  timing = {"total": time.perf_counter() - t0, "device": str(jax.devices()[0].device_kind)}
  for p in per:
    for stage, s in p["seconds"].items():
      timing[f"{stage}@{p['length']}"] = s
  return {
      "model": {"name": name, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
                "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "d_model": cfg.d_model},
      "probes": [{k2: v for k2, v in p.items() if k2 not in ("grids", "exact_per_probe", "m_clean", "m_corrupt",
                                                             "seconds")} for p in per],
      "probe_metrics": [{"length": p["length"], "m_clean": p["m_clean"], "m_corrupt": p["m_corrupt"]} for p in per],
      "scores": combined,
      "scores_per_length": {str(p["length"]): p["grids"] for p in per},
      "selection_score_name": sel_name,
      "selection_score": combined[sel_name],
      "agreement": agree,
      "agreement_k": k,
      "cka": cka,
      "blocks": similarity.block_structure(cka) if cka is not None else None,
      "timing": timing,
  }


def causal_test(model, probes: ProbeSet, scores_LxH: np.ndarray, *, fraction: float = 1 / 8, draws: int = 5,
                seed: int = 0, batch_size: int = 4, chunk: int = 8, progress: bool = False) -> dict:
  """Mean-ablate the top ``fraction`` of query heads vs as many random heads (``draws`` draws); needle accuracy
  (every answer token greedy-correct, teacher-forced) on ``probes`` (use probes not used for scoring)."""
  cfg = model.cfg
  L, H = cfg.num_layers, cfg.num_heads
  k = max(1, int(round(L * H * fraction)))
  patcher = patching.HeadPatcher(model, batch_size=batch_size, chunk=chunk, progress=progress)
  base = patcher.base(probes)
  top = [(l, h) for l, h, _ in _top(scores_LxH, k)]
  rng = np.random.default_rng(seed)
  masks = [patching.head_masks(L, H, top).sum(0)]
  for _ in range(draws):
    pick = rng.choice(L * H, size=k, replace=False)
    masks.append(patching.head_masks(L, H, [(int(i // H), int(i % H)) for i in pick]).sum(0))
  r = patching.ablation_accuracy(patcher, probes, base, np.stack(masks))
  acc = r["accuracy"]
  return {"k": k, "total_heads": L * H, "num_probes": probes.num, "random_draws": draws,
          "baseline_accuracy": float(base.correct_clean.mean()), "baseline_logp": float(base.m_clean.mean()),
          "top_heads": top, "top_accuracy": float(acc[0]), "top_logp": float(r["logp"][0]),
          "random_accuracy": acc[1:].tolist(), "random_accuracy_mean": float(acc[1:].mean()),
          "random_accuracy_min": float(acc[1:].min()), "random_accuracy_max": float(acc[1:].max()),
          "random_logp_mean": float(r["logp"][1:].mean())}
