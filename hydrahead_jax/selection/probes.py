"""Clean / corrupted probe batches for head selection, scored teacher-forced.

A probe is a pair of prompts of the same token count that differ only in the needle value(s)
(``hydrahead_jax.data.synthetic.make_probe_pair``). Both runs are fed ``prompt + clean_answer[:-1]``
and scored on the *clean* answer: ``m = sum_i w_i log p(a_i | prefix)`` over the answer tokens that
carry content (digits / letters; separators and bare spaces get weight 0). Every probe of a
``ProbeSet`` has the same prompt length, so the scored window is the same slice ``[start, S)`` of
every row (rows are right-padded when answers differ in length).

``needle`` marks the prompt positions of the asked needle value(s) (the value's tokens where they overlap
a position at which clean and corrupt differ); the Wu et al. retrieval score uses it.

This module only needs numpy and the data generators; a saved ``ProbeSet`` (``.npz``) can be
loaded where the data stack is not installed.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

DEFAULT_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "mqar")


@dataclasses.dataclass
class ProbeSet:
  """Probe rows of equal length S; the answer window is ``[start, S)`` (position ``start`` predicts
  the first answer token)."""

  clean: np.ndarray  # [N, S] int32 inputs: clean prompt + clean answer[:-1] (+ pad)
  corrupt: np.ndarray  # [N, S] int32 inputs: corrupt prompt + clean answer[:-1] (+ pad)
  targets: np.ndarray  # [N, S] int32 next-token targets (clean answer in the window, else 0)
  weights: np.ndarray  # [N, S] float32, 1 where an answer token is scored
  needle: np.ndarray  # [N, S] bool, positions of the asked needle value(s) in the prompt
  tasks: np.ndarray  # [N] str
  prompt_len: int
  seed: int = 0

  @property
  def num(self) -> int:
    return int(self.clean.shape[0])

  @property
  def length(self) -> int:
    return int(self.clean.shape[1])

  @property
  def start(self) -> int:
    return self.prompt_len - 1

  def subset(self, idx) -> "ProbeSet":
    idx = np.asarray(idx)
    return dataclasses.replace(self, clean=self.clean[idx], corrupt=self.corrupt[idx], targets=self.targets[idx],
                               weights=self.weights[idx], needle=self.needle[idx], tasks=self.tasks[idx])

  def save(self, path: str) -> None:
    np.savez_compressed(path, clean=self.clean, corrupt=self.corrupt, targets=self.targets, weights=self.weights,
                        needle=self.needle, tasks=self.tasks.astype("U32"), prompt_len=self.prompt_len,
                        seed=self.seed)

  @classmethod
  def load(cls, path: str) -> "ProbeSet":
    with np.load(path) as z:
      missing = {"clean", "corrupt", "targets", "weights", "needle", "tasks", "prompt_len"} - set(z.files)
      if missing:
        raise ValueError(f"probe file {path}: missing arrays {sorted(missing)}")
      return cls(z["clean"], z["corrupt"], z["targets"], z["weights"].astype(np.float32), z["needle"].astype(bool),
                 z["tasks"], int(z["prompt_len"]), int(z["seed"]) if "seed" in z.files else 0)


def content_weights(tokenizer, ids: Sequence[int]) -> np.ndarray:
  """1 for tokens whose text has a letter or digit (the value itself), 0 for spaces / separators."""
  return np.asarray([float(any(c.isalnum() for c in tokenizer.decode([int(t)]))) for t in ids], np.float32)


def _value_runs(ans: np.ndarray, w: np.ndarray) -> list[np.ndarray]:
  """The answer's values: maximal runs of consecutive scored tokens."""
  runs, cur = [], []
  for t, x in zip(ans, w):
    if x > 0:
      cur.append(int(t))
    elif cur:
      runs.append(np.asarray(cur))
      cur = []
  if cur:
    runs.append(np.asarray(cur))
  return runs


def _needle_positions(clean: np.ndarray, corrupt: np.ndarray, runs: list[np.ndarray]) -> np.ndarray:
  """Prompt positions holding an asked value: occurrences of a value's tokens that overlap a position where
  clean and corrupt differ (falls back to the differing positions if a value is tokenized differently)."""
  diff = clean != corrupt
  out = np.zeros(len(clean), bool)
  for run in runs:
    n = len(run)
    if n == 0 or n > len(clean):
      continue
    win = np.lib.stride_tricks.sliding_window_view(clean, n)
    for s in np.nonzero((win == run).all(axis=1))[0]:
      if diff[s:s + n].any():
        out[s:s + n] = True
  return out if out.any() else diff


def make_probes(tokenizer, length: int, *, tasks: Sequence[str] = DEFAULT_TASKS, per_task: int = 4,
                seed: int = 0, pad_id: int | None = None) -> ProbeSet:
  """``per_task`` probes of each task, all with prompts of exactly ``length`` tokens.

  Probe ``i`` of a task uses generator seed ``seed * 100003 + i`` and needle depth ``(i + 0.5) / per_task``
  (NIAH tasks), so depths are spread evenly over the context.
  """
  from hydrahead_jax.data.synthetic import PROBE_TASKS, make_probe_pair  # data stack only needed to build

  bad = [t for t in tasks if t not in PROBE_TASKS]
  if bad:
    raise ValueError(f"probes.tasks: unknown probe tasks {bad}; choose from {PROBE_TASKS}")
  if per_task < 1:
    raise ValueError(f"probes.per_task: must be >= 1, got {per_task}")
  pad = tokenizer.pad_id if pad_id is None else pad_id
  rows = []
  for task in tasks:
    for i in range(per_task):
      depth = (i + 0.5) / per_task if task.startswith("niah") else None
      c, x, start, a_clean, _ = make_probe_pair(task, seed * 100003 + i, length, tokenizer, depth=depth)
      rows.append((task, c, x, np.asarray(a_clean, np.int32)))
  max_ans = max(len(r[3]) for r in rows)
  S = length + max_ans - 1
  N = len(rows)
  clean = np.full((N, S), pad, np.int32)
  corrupt = np.full((N, S), pad, np.int32)
  targets = np.zeros((N, S), np.int32)
  weights = np.zeros((N, S), np.float32)
  needle = np.zeros((N, S), bool)
  for n, (task, c, x, ans) in enumerate(rows):
    A = len(ans)
    clean[n, :length], corrupt[n, :length] = c, x
    clean[n, length:length + A - 1] = ans[:-1]
    corrupt[n, length:length + A - 1] = ans[:-1]
    targets[n, length - 1:length - 1 + A] = ans
    w = content_weights(tokenizer, ans)
    weights[n, length - 1:length - 1 + A] = w
    needle[n, :length] = _needle_positions(np.asarray(c), np.asarray(x), _value_runs(ans, w))
  return ProbeSet(clean, corrupt, targets, weights, needle, np.asarray([r[0] for r in rows]), length, seed)


def concat(sets: Sequence[ProbeSet]) -> ProbeSet:
  """Stacks probe sets of the same prompt length (answer windows padded to the longest)."""
  if len({s.prompt_len for s in sets}) != 1:
    raise ValueError("probes.concat: all sets need the same prompt length; score lengths separately")
  S = max(s.length for s in sets)

  def pad(a, value=0):
    return np.concatenate([np.pad(x, ((0, 0), (0, S - x.shape[1])), constant_values=value) for x in a])

  return ProbeSet(pad([s.clean for s in sets]), pad([s.corrupt for s in sets]), pad([s.targets for s in sets]),
                  pad([s.weights for s in sets]), pad([s.needle for s in sets], False),
                  np.concatenate([s.tasks for s in sets]), sets[0].prompt_len, sets[0].seed)
