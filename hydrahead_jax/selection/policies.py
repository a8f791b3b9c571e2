"""Selection policies: head scores -> a ``HeadLayout`` (which KV groups of each layer stay full attention).

The unit of selection is the KV group (an FA query head needs its group's K/V cache anyway); a group's
score is the sum of its query heads' scores (NaN counts as 0). The budget is a number of FA groups, or a
ratio ``'LA:FA'`` turned into one: ``n = round_half_up(L * G * FA / (LA + FA))``, at least 1; the note in the
output says what was asked, what was taken and the resulting ratio.

Policies (all take the same budget ``n`` except where rounding to whole layers says otherwise):
- ``global``: the n best (layer, group) pairs anywhere; layers may get 0..G FA groups.
- ``per_layer``: every layer keeps its top-k groups, k = n // L; the n % L left over go to the layers whose
  next-best group scores highest (so with n < L some layers get none).
- ``layerwise_score`` / ``layerwise_even``: whole layers FA, ``round_half_up(n / G)`` of them (at least 1),
  chosen by summed score or evenly spaced (the last layer of each of that many equal blocks).
- ``random``: n groups drawn uniformly without replacement (seeded): the ablation.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

from hydrahead_jax.config import HeadLayout, parse_ratio

POLICIES = ("global", "per_layer", "layerwise_score", "layerwise_even", "random")


def _round_half_up(x: float) -> int:
  return int(math.floor(x + 0.5))


def group_scores(head_scores_LxH: np.ndarray, heads_per_group: int) -> np.ndarray:
  """[L, G] sum of the group's query-head scores (NaN -> 0)."""
  s = np.nan_to_num(np.asarray(head_scores_LxH, np.float64), nan=0.0)
  L, H = s.shape
  if H % heads_per_group:
    raise ValueError(f"policies: {H} heads per layer are not divisible by heads_per_group={heads_per_group}")
  return s.reshape(L, H // heads_per_group, heads_per_group).sum(-1)


def parse_budget(budget: str | int, num_layers: int, num_groups: int) -> tuple[int, str]:
  """Budget -> (number of FA groups, explanation)."""
  total = num_layers * num_groups
  if isinstance(budget, (int, np.integer)) or (isinstance(budget, str) and re.fullmatch(r"\s*\d+\s*", budget)):
    n = int(budget)
    if not 0 <= n <= total:
      raise ValueError(f"budget: {n} FA groups is outside [0, {total}] ({num_layers} layers x {num_groups} groups)")
    return n, f"budget {n} FA groups of {total}"
  la, fa = parse_ratio(str(budget))
  exact = total * fa / (la + fa)
  n = max(1, min(total, _round_half_up(exact)))
  got = f"{(total - n) / n:.2f}:1" if n else "all LA"
  note = (f"ratio {la}:{fa} LA:FA of {num_layers} layers x {num_groups} groups = {total} groups -> "
          f"{total} * {fa}/{la + fa} = {exact:.3g} FA groups, rounded half-up to {n} (actual {got} LA:FA)")
  return n, note


def _ranked(scores: np.ndarray) -> np.ndarray:
  """Flat indices by descending score; ties broken by index (deterministic)."""
  flat = np.ravel(scores)
  return np.lexsort((np.arange(flat.size), -flat))


def global_topk(gs_LxG: np.ndarray, n: int) -> tuple[HeadLayout, str]:
  L, G = gs_LxG.shape
  chosen = _ranked(gs_LxG)[:n]
  fa = [[] for _ in range(L)]
  for i in chosen:
    fa[i // G].append(int(i % G))
  return HeadLayout(tuple(tuple(x) for x in fa)), f"global top-{n} (layer, group) pairs"


def per_layer_topk(gs_LxG: np.ndarray, n: int) -> tuple[HeadLayout, str]:
  L, G = gs_LxG.shape
  k, extra = divmod(n, L)
  order = np.stack([_ranked(row) for row in gs_LxG])  # [L, G] group indices, best first
  ks = np.full(L, k)
  if extra:
    nxt = np.array([gs_LxG[l, order[l, k]] if k < G else -np.inf for l in range(L)])
    ks[_ranked(nxt)[:extra]] += 1
  fa = tuple(tuple(int(g) for g in order[l, : ks[l]]) for l in range(L))
  note = f"top-{k} groups in every layer" + (f", +1 in the {extra} layers with the best next group" if extra else "")
  return HeadLayout(fa), note


def layerwise(gs_LxG: np.ndarray, n: int, mode: str) -> tuple[HeadLayout, str]:
  L, G = gs_LxG.shape
  exact = n / G
  n_layers = max(1, min(L, _round_half_up(exact)))
  if mode == "score":
    layers = sorted(int(i) for i in _ranked(gs_LxG.sum(1))[:n_layers])
  elif mode == "even":
    layers = sorted({int(math.floor((i + 1) * L / n_layers)) - 1 for i in range(n_layers)})
  else:
    raise ValueError(f"layerwise mode: 'score' or 'even', got {mode!r}")
  fa = tuple(tuple(range(G)) if l in layers else () for l in range(L))
  note = (f"{n} groups / {G} per layer = {exact:.3g} layers, rounded half-up to {n_layers} whole layers "
          f"({n_layers * G} FA groups): layers {layers}")
  return HeadLayout(fa), note


def random_layout(num_layers: int, num_groups: int, n: int, seed: int) -> tuple[HeadLayout, str]:
  rng = np.random.default_rng(seed)
  chosen = rng.choice(num_layers * num_groups, size=n, replace=False)
  fa = [[] for _ in range(num_layers)]
  for i in chosen:
    fa[i // num_groups].append(int(i % num_groups))
  return HeadLayout(tuple(tuple(x) for x in fa)), f"{n} groups uniformly at random (seed {seed})"


def make_layout(policy: str, head_scores_LxH: np.ndarray | None, budget: str | int, *, num_groups: int,
                heads_per_group: int, num_layers: int | None = None, seed: int = 0) -> tuple[HeadLayout, dict]:
  """A layout and its metadata (policy, budget, rounding note, description)."""
  if policy not in POLICIES:
    raise ValueError(f"policy: unknown {policy!r}; choose one of {POLICIES}")
  if head_scores_LxH is None and policy not in ("random", "layerwise_even"):
    raise ValueError(f"policy {policy!r} needs head scores")
  if head_scores_LxH is None and num_layers is None:
    raise ValueError(f"policy {policy!r} without scores needs num_layers")
  L = num_layers if head_scores_LxH is None else np.asarray(head_scores_LxH).shape[0]
  if head_scores_LxH is None:
    head_scores_LxH = np.zeros((L, num_groups * heads_per_group))
  n, budget_note = parse_budget(budget, L, num_groups)
  if policy == "random":
    layout, note = random_layout(L, num_groups, n, seed)
  else:
    gs = group_scores(head_scores_LxH, heads_per_group)
    if gs.shape[1] != num_groups:
      raise ValueError(f"policies: scores give {gs.shape[1]} groups per layer but num_groups={num_groups}")
    if policy == "global":
      layout, note = global_topk(gs, n)
    elif policy == "per_layer":
      layout, note = per_layer_topk(gs, n)
    else:
      layout, note = layerwise(gs, n, policy.split("_")[1])
  info = {"policy": policy, "budget": str(budget), "budget_groups": n, "num_fa_groups": layout.total_fa_groups(),
          "rounding": budget_note, "selection": note, "describe": layout.describe(num_groups)}
  if policy == "random":
    info["seed"] = seed
  return layout, info


def layout_json(layout: HeadLayout, info: dict) -> str:
  """``HeadLayout.from_json`` reads this (extra keys are metadata)."""
  return json.dumps({"fa_groups": [list(x) for x in layout.fa_groups], **info}, indent=1)


def write_layout(path: str, layout: HeadLayout, info: dict) -> None:
  with open(path, "w") as f:
    f.write(layout_json(layout, info) + "\n")


def read_layout(path: str) -> HeadLayout:
  try:
    with open(path) as f:
      return HeadLayout.from_json(f.read())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"layout file {path}: cannot read ({e})") from e
