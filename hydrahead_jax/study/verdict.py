"""The four claims, decided from the arm results (never hard-coded).

Retrieval score of an arm over a set of lengths: the mean over (task, length) cells of the generation accuracy
(RULER's string match) of the study's retrieval tasks. Its standard error: sqrt(sum_c var_c / n_c) / cells, var_c
the per-example variance of the cell, at least p(1-p) of the add-one-smoothed accuracy p = (hits + 1) / (n + 2) (so
a cell of few examples that are all right or all wrong is never taken as certain). A comparison of two arms uses
the lengths both were evaluated at; the interval is difference +- z * SE.

  claim 1 (head-level 7:1 keeps retrieval about as well as layer-wise 3:1) - an equivalence test, lengths inside
          the teacher's window: reproduced if the interval's lower end >= -margin; not reproduced if its upper
          end < -margin; else inconclusive.
  claim 2 (interpretability-chosen FA heads beat random), claim 3 (scale-normalized fusion matters: with it beats
          without), claim 4 (the hybrid extends retrieval past the teacher's window: it beats the teacher at lengths
          beyond the window) - superiority: reproduced if the lower end > 0 and the difference >= min_gain; not
          reproduced if the upper end < min_gain; else inconclusive. Claim 2 holds for both chosen arms (exact
          patching, retrieval score) against the pooled random arms; mixed outcomes are inconclusive.
  Claims 1-3 are inconclusive when both arms score below ``floor`` (nothing to keep at this budget), when an arm
  is missing, or when the student arms were trained on different token budgets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from hydrahead_jax.study.config import Thresholds

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
CLAIMS = {
    1: "head-level 7:1 keeps retrieval about as well as layer-wise 3:1",
    2: "interpretability-chosen FA heads beat random ones",
    3: "scale-normalized fusion matters",
    4: "the hybrid extends retrieval past the teacher's window",
}


@dataclasses.dataclass(frozen=True)
class Score:
  mean: float
  se: float
  cells: int
  n: int  # examples in all cells
  lengths: tuple[int, ...]


def _cell_var(cell: dict) -> tuple[float, float, int]:
  """(mean, variance, n) of one cell's per-example generation scores."""
  n = int(cell["n"])
  scores = cell.get("scores") or []
  mean = float(cell["acc"])
  p = (mean * n + 1) / (n + 2)
  var = p * (1 - p)
  if len(scores) > 1:
    m = sum(scores) / len(scores)
    var = max(var, sum((s - m) ** 2 for s in scores) / (len(scores) - 1))
  return mean, var, max(n, 1)


def lengths_of(result: dict, tasks: Sequence[str]) -> set[int]:
  """Lengths at which the arm has a cell for every one of ``tasks``."""
  cells = result.get("eval", {}).get("cells", {})
  if not all(t in cells for t in tasks):
    return set()
  return set.intersection(*({int(L) for L in cells[t]} for t in tasks)) if tasks else set()


def retrieval_score(result: dict, tasks: Sequence[str], lengths: Sequence[int]) -> Score | None:
  cells = result.get("eval", {}).get("cells", {})
  got = [_cell_var(cells[t][str(L)]) for t in tasks for L in lengths if str(L) in cells.get(t, {})]
  if not got or len(got) != len(tasks) * len(lengths):
    return None
  k = len(got)
  mean = sum(m for m, _, _ in got) / k
  se = math.sqrt(sum(v / n for _, v, n in got)) / k
  return Score(mean, se, k, sum(n for _, _, n in got), tuple(sorted(lengths)))


def pooled(scores: Sequence[Score]) -> Score:
  """The mean of several arms' scores (e.g. random seeds) and its standard error."""
  k = len(scores)
  return Score(sum(s.mean for s in scores) / k, math.sqrt(sum(s.se ** 2 for s in scores)) / k,
               sum(s.cells for s in scores), sum(s.n for s in scores), scores[0].lengths)


@dataclasses.dataclass
class Claim:
  number: int
  verdict: str
  why: str
  numbers: dict = dataclasses.field(default_factory=dict)

  @property
  def text(self) -> str:
    return CLAIMS[self.number]


def _fmt(s: Score) -> str:
  return f"{s.mean:.3f} +- {s.se:.3f}"


def _label(results: Sequence[dict]) -> str:
  return " + ".join(f"arm {r['arm']}" for r in results)


COMPARABLE = ("seed", "chat", "corpus", "max_new_tokens")  # evaluation settings that must match (same inputs)


def _settings_differ(results: Sequence[dict]) -> str | None:
  """Evaluation settings that differ between arms (other inputs); a different example count is allowed."""
  bad = []
  for key in COMPARABLE:
    vals = {r["arm"]: r.get("eval", {}).get("settings", {}).get(key) for r in results}
    if len({str(v) for v in vals.values()}) > 1:
      bad.append(f"{key}: " + ", ".join(f"arm {a} {v!r}" for a, v in vals.items()))
  return "; ".join(bad) or None


def _budget_differs(results: Sequence[dict]) -> str | None:
  budgets = {r["arm"]: (r.get("transfer") or {}).get("tokens_per_stage") for r in results if r["kind"] == "student"}
  if len({str(sorted(b.items())) if b else None for b in budgets.values()}) > 1:
    return "; ".join(f"arm {a}: {b}" for a, b in budgets.items())
  return None


class Judge:
  def __init__(self, results: dict[str, dict], roles: dict[str, list[str]], tasks: Sequence[str],
               thresholds: Thresholds, window: int | None):
    """``results``: arm id -> result; ``roles``: role -> arm ids in the study config (present or not)."""
    self.results, self.roles, self.tasks, self.t = results, roles, tuple(tasks), thresholds
    self.window = window or next((r.get("teacher_window") for r in results.values() if r.get("teacher_window")), None)

  def arms(self, role: str) -> tuple[list[dict], list[str]]:
    """(results present, ids missing) of the arms with ``role``."""
    ids = self.roles.get(role, [])
    return [self.results[i] for i in ids if i in self.results], [i for i in ids if i not in self.results]

  def _pair(self, number: int, role_a: str, role_b: str):
    """(arms of role_a, arms of role_b), or an INCONCLUSIVE claim when one is missing or their budgets differ."""
    missing = self._need(role_a, role_b)
    if missing:
      return Claim(number, INCONCLUSIVE, missing)
    a, b = self.arms(role_a)[0], self.arms(role_b)[0]
    if (why := _budget_differs(a + b)):
      return Claim(number, INCONCLUSIVE, f"training budgets differ ({why})")
    return a, b

  def _need(self, *roles: str) -> str | None:
    why = []
    for role in roles:
      got, missing = self.arms(role)
      if not self.roles.get(role):
        why.append(f"this study has no {role} arm")
      elif missing and (role != "random" or not got):
        why.append(f"arm {', '.join(missing)} ({role}) missing")
    return "; ".join(why) or None

  def _lengths(self, results: Sequence[dict], beyond: bool) -> list[int]:
    common = set.intersection(*(lengths_of(r, self.tasks) for r in results))
    if self.window is None:
      return sorted(common)
    return sorted(L for L in common if (L > self.window) == beyond)

  def _compare(self, a: Sequence[dict], b: Sequence[dict], beyond: bool = False):
    """(score a, score b, lengths) or a reason string."""
    lengths = self._lengths(list(a) + list(b), beyond)
    if not lengths:
      where = "beyond" if beyond else "inside"
      return f"no common evaluated lengths {where} the teacher's window ({self.window})"
    sa = pooled([retrieval_score(r, self.tasks, lengths) for r in a])
    sb = pooled([retrieval_score(r, self.tasks, lengths) for r in b])
    return sa, sb, lengths

  def _numbers(self, a, b, sa: Score, sb: Score, lengths) -> tuple[dict, float, float, float]:
    d = sa.mean - sb.mean
    se = math.hypot(sa.se, sb.se)
    lo, hi = d - self.t.z * se, d + self.t.z * se
    nums = {"a": _label(a), "b": _label(b), "a_score": sa.mean, "a_se": sa.se, "b_score": sb.mean, "b_se": sb.se,
            "diff": d, "interval": [lo, hi], "lengths": list(lengths), "examples": [sa.n, sb.n]}
    return nums, d, lo, hi

  def _text(self, a, b, sa, sb, d, lo, hi, lengths) -> str:
    return (f"{_label(a)} {_fmt(sa)} vs {_label(b)} {_fmt(sb)} (retrieval accuracy at {_lens(lengths)}, "
            f"{sa.n} vs {sb.n} examples): difference {d:+.3f}, {self.t.z:g}-SE interval [{lo:+.3f}, {hi:+.3f}]")

  def superiority(self, number: int, a: Sequence[dict], b: Sequence[dict], beyond: bool = False,
                  use_floor: bool = True) -> Claim:
    if (why := _settings_differ(list(a) + list(b))):
      return Claim(number, INCONCLUSIVE, f"evaluated on different inputs ({why})")
    got = self._compare(a, b, beyond)
    if isinstance(got, str):
      return Claim(number, INCONCLUSIVE, got)
    sa, sb, lengths = got
    nums, d, lo, hi = self._numbers(a, b, sa, sb, lengths)
    text = self._text(a, b, sa, sb, d, lo, hi, lengths)
    if use_floor and max(sa.mean, sb.mean) < self.t.floor:
      return Claim(number, INCONCLUSIVE, f"{text}; both below the floor {self.t.floor:g}: nothing to compare at "
                                         "this budget", nums)
    if lo > 0 and d >= self.t.min_gain:
      return Claim(number, REPRODUCED, f"{text}: better by at least the minimum gain {self.t.min_gain:g}, beyond "
                                       "noise", nums)
    if hi < self.t.min_gain:
      return Claim(number, NOT_REPRODUCED, f"{text}: any advantage is below the minimum gain {self.t.min_gain:g}",
                   nums)
    return Claim(number, INCONCLUSIVE, f"{text}: the interval straddles 0 or the minimum gain {self.t.min_gain:g}",
                 nums)

  def claim1(self) -> Claim:
    pair = self._pair(1, "head_exact", "layerwise_3to1")
    if isinstance(pair, Claim):
      return pair
    a, b = pair
    if (why := _settings_differ(a + b)):
      return Claim(1, INCONCLUSIVE, f"evaluated on different inputs ({why})")
    got = self._compare(a, b)
    if isinstance(got, str):
      return Claim(1, INCONCLUSIVE, got)
    sa, sb, lengths = got
    nums, d, lo, hi = self._numbers(a, b, sa, sb, lengths)
    text = self._text(a, b, sa, sb, d, lo, hi, lengths)
    m = self.t.margin
    text += self._teacher_context(lengths, (sa, a), (sb, b))
    if max(sa.mean, sb.mean) < self.t.floor:
      return Claim(1, INCONCLUSIVE, f"{text}; both below the floor {self.t.floor:g}: nothing to keep at this budget",
                   nums)
    if lo >= -m:
      return Claim(1, REPRODUCED, f"{text}: at most {m:g} below layer-wise", nums)
    if hi < -m:
      return Claim(1, NOT_REPRODUCED, f"{text}: more than {m:g} below layer-wise", nums)
    return Claim(1, INCONCLUSIVE, f"{text}: the interval straddles the margin -{m:g}", nums)

  def _teacher_context(self, lengths, *arms: tuple[Score, Sequence[dict]]) -> str:
    """How much of the teacher's retrieval at ``lengths`` each arm keeps ('' without a teacher result)."""
    teacher = self.arms("teacher")[0]
    st = retrieval_score(teacher[0], self.tasks, lengths) if teacher else None
    if st is None or st.mean <= 0:
      return ""
    kept = ", ".join(f"{_label(r)} {s.mean / st.mean:.0%}" for s, r in arms)
    return f" (context: the teacher scores {st.mean:.3f} here; kept: {kept})"

  def _ppl_beyond(self, result: dict) -> dict[tuple[int, int], float]:
    """Held-out perplexity of the position buckets past the teacher's window."""
    buckets = (result.get("eval", {}).get("ppl") or {}).get("buckets", [])
    return {(b["start"], b["end"]): b["ppl"] for b in buckets if self.window and b["start"] >= self.window}

  def claim2(self) -> Claim:
    missing = self._need("head_exact", "head_retrieval", "random")
    rnd = self.arms("random")[0]
    chosen_roles = (("head_exact", "exact", "exact patching"), ("head_retrieval", "retrieval", "retrieval score"))
    parts = []
    for role, _, _ in chosen_roles:
      chosen = self.arms(role)[0]
      if not chosen or not rnd:
        parts.append(None)
      elif (why := _budget_differs(chosen + rnd)):
        parts.append(Claim(2, INCONCLUSIVE, f"training budgets differ ({why})"))
      else:
        parts.append(self.superiority(2, chosen, rnd))
    if missing:  # inconclusive; the comparison that exists so far is shown
      so_far = [f"so far, {label} vs random: {c.verdict}: {c.why}" for (_, _, label), c in zip(chosen_roles, parts)
                if c is not None]
      return Claim(2, INCONCLUSIVE, " | ".join([missing] + so_far),
                   {key: c.numbers for (_, key, _), c in zip(chosen_roles, parts) if c is not None})
    verdicts = {c.verdict for c in parts}
    verdict = next(iter(verdicts)) if len(verdicts) == 1 else INCONCLUSIVE
    why = " | ".join(f"{label}: {c.verdict}: {c.why}" for (_, _, label), c in zip(chosen_roles, parts))
    if len(verdicts) > 1:
      why = "mixed outcomes | " + why
    absent = self.arms("random")[1]
    if absent:
      why += f" (random arm {', '.join(absent)} missing: {len(rnd)} random layout(s) pooled)"
    return Claim(2, verdict, why, {key: c.numbers for (_, key, _), c in zip(chosen_roles, parts)})

  def claim3(self) -> Claim:
    pair = self._pair(3, "head_exact", "no_fusion")
    if isinstance(pair, Claim):
      return pair
    a, b = pair
    c = self.superiority(3, a, b)
    pa, pb = a[0].get("proxy") or {}, b[0].get("proxy") or {}
    if pa.get("kl") is not None and pb.get("kl") is not None:
      c.why += f" (context: short-context KL to the teacher {pa['kl']:.4f} with vs {pb['kl']:.4f} without fusion)"
    return c

  def claim4(self) -> Claim:
    missing = self._need("head_exact", "teacher")
    if missing:
      return Claim(4, INCONCLUSIVE, missing)
    (a,), (b,) = self.arms("head_exact")[0][:1], self.arms("teacher")[0][:1]
    c = self.superiority(4, [a], [b], beyond=True, use_floor=False)
    pa, pb = self._ppl_beyond(a), self._ppl_beyond(b)
    if (both := [k for k in pa if k in pb]):
      c.why += (f" (context: held-out perplexity past the window, {_label([a])} vs {_label([b])}: " + ", ".join(
          f"{_len(s)}-{_len(e)} {pa[(s, e)]:.1f} vs {pb[(s, e)]:.1f}" for s, e in both) + ")")
    return c

  def all(self) -> list[Claim]:
    return [self.claim1(), self.claim2(), self.claim3(), self.claim4()]


def _len(L: int) -> str:
  from hydrahead_jax.eval.report import length_label

  return length_label(L)


def _lens(lengths) -> str:
  return ",".join(_len(L) for L in lengths)
