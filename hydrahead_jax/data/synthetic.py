"""Deterministic synthetic corpus where retrieval matters, for any ``Tokenizer``.

Every example is a pure function of ``(task, seed, index, length, tokenizer)``: its generator is
``np.random.default_rng([seed, index, task_code])``, so any example can be re-generated at random
access. Text is generated in *pieces* (a sentence, `` abc:``, `` 417``); each piece is tokenized on
its own and the ids concatenated, so a value has the same ids in the context and in the answer, and
the answer mask is exact. Pieces start at word boundaries (leading space), which matches the
canonical tokenization of GPT-2-style byte-level BPEs. Lengths are exact: ``length`` tokens,
including bos (first) and eos (last) when the tokenizer has them; the haystack / gap is grammar
filler whose first sentence is cut from the left to hit the budget.

Tasks: ``mqar`` (key-value pairs, a filler gap, then every key queried), ``niah_single``,
``niah_multikey`` (several needles, one asked), ``niah_multivalue`` (one key, several values, all
asked) and ``grammar`` (a small probabilistic grammar with number agreement, arithmetic and fixed
facts; no answers). ``answer_mask`` is 1 on answer-piece tokens that are not pure whitespace.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from hydrahead_jax.data.tokenizer import Tokenizer, encode_many

TASKS = ("grammar", "mqar", "niah_single", "niah_multikey", "niah_multivalue")
PROBE_TASKS = ("mqar", "niah_single", "niah_multikey", "niah_multivalue")
_TASK_CODE = {t: i for i, t in enumerate(TASKS)}

# -- the grammar ---------------------------------------------------------------------------------
_NOUNS = (("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("child", "children"),
          ("teacher", "teachers"), ("farmer", "farmers"), ("robot", "robots"), ("king", "kings"),
          ("doctor", "doctors"), ("student", "students"), ("fox", "foxes"), ("wolf", "wolves"))
_VERBS = (("sees", "see"), ("likes", "like"), ("follows", "follow"), ("helps", "help"),
          ("finds", "find"), ("watches", "watch"), ("calls", "call"), ("carries", "carry"))
_ADJS = ("small", "old", "quiet", "happy", "red", "clever", "tired", "brave")
_PLACES = ("near the river", "in the garden", "behind the house", "on the hill", "by the school")
_NAMES = (("Tom", "his"), ("Sam", "his"), ("Leo", "his"), ("Max", "his"),
          ("Anna", "her"), ("Mia", "her"), ("Eva", "her"), ("Zoe", "her"))
_OBJECTS = ("key", "book", "hat", "ball", "map", "coat")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

# -- retrieval vocabularies ------------------------------------------------------------------------
_KEY_ADJ = ("amber", "silver", "crimson", "golden", "ivory", "jade", "scarlet", "cobalt", "violet",
            "copper", "misty", "frozen")
_KEY_NOUN = ("falcon", "river", "lantern", "harbor", "meadow", "tiger", "castle", "orchid", "comet",
             "willow", "anchor", "canyon")

Piece = tuple[list[int], bool]  # (token ids, is answer)
Override = Mapping[str, list[str]] | None  # key -> replacement values, in order of appearance
PROBE_INDEX = 1 << 33  # probes use their own random stream (training indices are < 10**9)


def _sentence(rng: np.random.Generator) -> str:
  kind = rng.integers(6)
  if kind <= 1:  # number agreement, optionally across a prepositional phrase
    pl = int(rng.integers(2))
    subj, verb, obj = _NOUNS[rng.integers(len(_NOUNS))][pl], _VERBS[rng.integers(len(_VERBS))][pl], \
        _NOUNS[rng.integers(len(_NOUNS))][int(rng.integers(2))]
    mid = f" {_ADJS[rng.integers(len(_ADJS))]} {subj}" if kind == 0 else \
        f" {subj} {_PLACES[rng.integers(len(_PLACES))]}"
    return f" The{mid} {verb} the {obj}."
  if kind == 2:
    a, b = rng.integers(0, 50, 2)
    return f" {a} plus {b} is {a + b}."
  if kind == 3:
    a, b = rng.integers(0, 13, 2)
    return f" {a} times {b} is {a * b}."
  if kind == 4:
    name, pron = _NAMES[rng.integers(len(_NAMES))]
    return f" {name} lost {pron} {_OBJECTS[rng.integers(len(_OBJECTS))]}."
  d = int(rng.integers(7))
  return f" After {_DAYS[d]} comes {_DAYS[(d + 1) % 7]}."


def _filler(rng: np.random.Generator, tok: Tokenizer, budget: int) -> list[list[int]]:
  """Tokenized grammar sentences totalling exactly ``budget`` tokens (first one cut from the left)."""
  sents: list[list[int]] = []
  total = 0
  while total < budget:
    batch = encode_many(tok, [_sentence(rng) for _ in range(32)])
    for ids in batch:
      if total >= budget:
        break
      sents.append(ids)
      total += len(ids)
  if total > budget:
    sents[-1] = sents[-1][total - budget:]
    sents.insert(0, sents.pop())  # the cut sentence opens the text
  return [s for s in sents if s]


def _ids(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
  return encode_many(tok, list(texts))


def _specials(tok: Tokenizer) -> tuple[list[int], list[int]]:
  bos = [tok.bos_id] if tok.bos_id is not None else []
  eos = [tok.eos_id] if tok.eos_id is not None else []
  return bos, eos


def _too_short(task: str, need: int, length: int) -> ValueError:
  return ValueError(f"synthetic task {task!r}: length {length} is too short; this example needs at "
                    f"least {need} tokens with this tokenizer")


@dataclasses.dataclass
class Built:
  """A generated example split at the answer: ``prompt + answer + tail`` has ``length`` tokens."""

  prompt: list[Piece]
  answer: list[Piece]
  tail: list[Piece]
  answers: list[str]  # the answer strings (values), in order
  asked: str | None = None  # the queried key (probes)


def _count(pieces: Sequence[Piece]) -> int:
  return sum(len(p[0]) for p in pieces)


# -- grammar ------------------------------------------------------------------------------------
def _build_grammar(rng: np.random.Generator, length: int, tok: Tokenizer, override: Override = None,
                   probe: bool = False) -> Built:
  bos, eos = _specials(tok)
  budget = length - len(bos) - len(eos)
  if budget < 1:
    raise _too_short("grammar", len(bos) + len(eos) + 1, length)
  pieces = [(bos, False)] + [(s, False) for s in _filler(rng, tok, budget)]
  return Built(pieces, [], [(eos, False)], [])


# -- multi-query associative recall ---------------------------------------------------------------
def _mqar_keys(rng: np.random.Generator, n: int) -> list[str]:
  codes = rng.choice(26 ** 3, size=n, replace=False)
  return ["".join(chr(97 + (c // 26 ** j) % 26) for j in (2, 1, 0)) for c in codes]


def _build_mqar(rng: np.random.Generator, length: int, tok: Tokenizer, override: Override = None,
                probe: bool = False) -> Built:
  """``Remember:`` pairs `` abc: 417``, a filler gap, ``\\nRecall:``, queries `` abc:`` → `` 417``."""
  bos, eos = _specials(tok)
  n_max = int(rng.integers(8, 65))
  keys = _mqar_keys(rng, n_max)
  vals = [f"{v:03d}" for v in rng.integers(0, 1000, n_max)]
  order = rng.permutation(n_max)
  asked_pos = rng.random()
  vals = _apply_override(keys, vals, override)
  head, mid = _ids(tok, ["Remember:", "\nRecall:"])
  k_ids = _ids(tok, [f" {k}:" for k in keys])
  v_ids = _ids(tok, [f" {v}" for v in vals])
  fixed = len(bos) + len(head) + len(mid) + (0 if probe else len(eos))
  pair_cost = np.cumsum([len(k) + len(v) for k, v in zip(k_ids, v_ids)])
  # Probes: all pairs, one query (key only); training: all pairs, every key queried with its value.
  extra = max(len(k) for k in k_ids) if probe else 0
  fits = np.nonzero(fixed + (1 if probe else 2) * pair_cost + extra <= length)[0]
  if len(fits) == 0:
    raise _too_short("mqar", fixed + (1 if probe else 2) * int(pair_cost[0]) + extra, length)
  n = int(fits[-1]) + 1
  queries = [int(q) for q in order if q < n]
  if probe:
    queries = [queries[min(int(asked_pos * n), n - 1)]]
    used = int(pair_cost[n - 1]) + len(k_ids[queries[0]])
  else:
    used = 2 * int(pair_cost[n - 1])
  gap = length - fixed - used
  prompt = [(bos, False), (head, False)]
  for i in range(n):
    prompt += [(k_ids[i], False), (v_ids[i], False)]
  prompt += [(s, False) for s in _filler(rng, tok, gap)] + [(mid, False)]
  if probe:
    q = queries[0]
    return Built(prompt + [(k_ids[q], False)], [(v_ids[q], True)], [], [vals[q]], keys[q])
  for q in queries:
    prompt += [(k_ids[q], False), (v_ids[q], True)]
  return Built(prompt, [], [(eos, False)], [vals[q] for q in queries])


def _apply_override(keys: Sequence[str], vals: list[str], override: Override) -> list[str]:
  """Replaces, in order, the values of each overridden key."""
  if not override:
    return vals
  vals = list(vals)
  pending = {k: list(v) for k, v in override.items()}
  for i, k in enumerate(keys):
    if pending.get(k):
      vals[i] = pending[k].pop(0)
  return vals


# -- needle in a haystack -------------------------------------------------------------------------
def _niah_spec(rng: np.random.Generator, task: str) -> tuple[list[str], list[str], str]:
  """Needle keys and values (one entry per needle) and the asked key."""
  combos = rng.choice(len(_KEY_ADJ) * len(_KEY_NOUN), size=4, replace=False)
  names = [f"{_KEY_ADJ[c // len(_KEY_NOUN)]} {_KEY_NOUN[c % len(_KEY_NOUN)]}" for c in combos]
  n = int(rng.integers(2, 5))
  values = [f"{v:05d}" for v in rng.choice(100000, size=4, replace=False)]
  if task == "niah_single":
    return names[:1], values[:1], names[0]
  if task == "niah_multikey":
    return names[:n], values[:n], names[int(rng.integers(n))]
  return [names[0]] * n, values[:n], names[0]


def _question(task: str, key: str) -> tuple[str, str]:
  if task == "niah_multivalue":
    return (f"\nQuestion: What are all the secret codes for {key}?\n"
            f"Answer: The secret codes for {key} are"), ","
  return f"\nQuestion: What is the secret code for {key}?\nAnswer: The secret code for {key} is", ""


def _build_niah(rng: np.random.Generator, length: int, tok: Tokenizer, override: Override = None,
                probe: bool = False, task: str = "niah_single", depth: float | None = None) -> Built:
  bos, eos = _specials(tok)
  keys, vals, asked = _niah_spec(rng, task)
  depths = list(rng.random(len(keys)))
  if depth is not None:
    depths[keys.index(asked)] = float(depth)
  order = np.argsort(depths, kind="stable")
  keys, depths = [keys[i] for i in order], [depths[i] for i in order]
  vals = _apply_override(keys, [vals[i] for i in order], override)
  needles = [[(ids, False) for ids in _ids(tok, [f" The secret code for {k} is", f" {v}", "."])]
             for k, v in zip(keys, vals)]
  q_text, sep = _question(task, asked)
  q_ids, dot, sep_ids = _ids(tok, [q_text, ".", sep or "."])
  asked_vals = [v for k, v in zip(keys, vals) if k == asked]
  answer: list[Piece] = []
  for i, v_ids in enumerate(_ids(tok, [f" {v}" for v in asked_vals])):
    answer += ([(sep_ids, False)] if i else []) + [(v_ids, True)]
  tail = [(dot, False)] + ([] if probe else [(eos, False)])
  prompt_fixed = len(bos) + sum(_count(nd) for nd in needles) + len(q_ids)
  budget = length - prompt_fixed - (0 if probe else _count(answer) + _count(tail))
  if budget < 0:
    raise _too_short(task, length - budget, length)
  hay = _filler(rng, tok, budget)
  bounds = np.concatenate([[0], np.cumsum([len(s) for s in hay])]) if hay else np.zeros(1)
  slots = [int(np.argmin(np.abs(bounds - d * budget))) for d in depths]
  prompt: list[Piece] = [(bos, False)]
  for j in range(len(hay) + 1):
    for nd, slot in zip(needles, slots):
      if slot == j:
        prompt += nd
    if j < len(hay):
      prompt.append((hay[j], False))
  prompt.append((q_ids, False))
  return Built(prompt, answer, [] if probe else tail, asked_vals, asked)


_BUILDERS = {"grammar": _build_grammar, "mqar": _build_mqar}


def _check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f"unknown synthetic task {task!r}; expected one of {TASKS}")


def _build(task: str, rng: np.random.Generator, length: int, tok: Tokenizer,
           override: Override = None, probe: bool = False, depth: float | None = None) -> Built:
  if task.startswith("niah"):
    return _build_niah(rng, length, tok, override, probe, task=task, depth=depth)
  return _BUILDERS[task](rng, length, tok, override, probe)


def _rng(task: str, seed: int, index: int) -> np.random.Generator:
  _check_task(task)
  return np.random.default_rng([int(seed), int(index), _TASK_CODE[task]])


def _answer_flags(tok: Tokenizer, ids: Sequence[int]) -> list[int]:
  return [int(bool(tok.decode([t]).strip())) for t in ids]


def _render(tok: Tokenizer, pieces: Sequence[Piece]) -> tuple[np.ndarray, np.ndarray]:
  toks, mask = [], []
  for ids, is_answer in pieces:
    toks += ids
    mask += _answer_flags(tok, ids) if is_answer else [0] * len(ids)
  return np.asarray(toks, np.int32), np.asarray(mask, np.uint8)


def generate_example(task: str, seed: int, index: int, length: int, tokenizer: Tokenizer
                     ) -> dict[str, Any]:
  """One example of exactly ``length`` tokens: ``tokens`` (int32), ``answer_mask`` (uint8),
  ``answers`` (answer strings in order) and ``task``."""
  b = _build(task, _rng(task, seed, index), int(length), tokenizer)
  tokens, mask = _render(tokenizer, b.prompt + b.answer + b.tail)
  assert len(tokens) == length, (task, len(tokens), length)
  return {"tokens": tokens, "answer_mask": mask, "answers": b.answers, "task": task}


def _corrupt_values(rng, tok: Tokenizer, clean: Sequence[str], digits: int) -> list[str]:
  """New values with the same token count each; the first value's first non-space token differs."""
  out = []
  for i, v in enumerate(clean):
    ref = tok.encode(f" {v}")
    k = _answer_flags(tok, ref).index(1) if i == 0 else 0
    for _ in range(2000):
      cand = f"{int(rng.integers(10 ** digits)):0{digits}d}"
      ids = tok.encode(f" {cand}")
      if cand not in clean and len(ids) == len(ref) and (i or ids[k] != ref[k]):
        out.append(cand)
        break
    else:
      raise RuntimeError(f"probe: no corrupt value with the token length of {v!r} found")
  return out


def make_probe_pair(task: str, seed: int, length: int, tokenizer: Tokenizer,
                    depth: float | None = None
                    ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]:
  """Clean/corrupt prompts of exactly ``length`` tokens that differ only in the needle value(s).

  Returns ``(clean_tokens, corrupt_tokens, answer_start, answer_tokens_clean, answer_tokens_corrupt)``.
  The prompts end right before the answer, so ``answer_start == length``: score teacher-forced on
  ``concat(prompt, answer_tokens)``. ``depth`` (0..1) places the asked needle (NIAH tasks).
  """
  if task not in PROBE_TASKS:
    raise ValueError(f"probe task must be one of {PROBE_TASKS}, got {task!r}")
  clean = _build(task, _rng(task, seed, PROBE_INDEX), int(length), tokenizer, probe=True, depth=depth)
  asked = clean.asked
  digits = 3 if task == "mqar" else 5
  rng = np.random.default_rng([seed, PROBE_INDEX + 1, _TASK_CODE[task]])
  new_vals = _corrupt_values(rng, tokenizer, clean.answers, digits)
  corrupt = _build(task, _rng(task, seed, PROBE_INDEX), int(length), tokenizer,
                   override={asked: new_vals}, probe=True, depth=depth)
  c_tok, _ = _render(tokenizer, clean.prompt)
  x_tok, _ = _render(tokenizer, corrupt.prompt)
  a_clean, _ = _render(tokenizer, clean.answer)
  a_corrupt, _ = _render(tokenizer, corrupt.answer)
  if len(c_tok) != length or len(x_tok) != length:
    raise AssertionError(f"probe {task}: prompt lengths {len(c_tok)}/{len(x_tok)} != {length}")
  return c_tok, x_tok, len(c_tok), a_clean, a_corrupt


# -- mixtures -------------------------------------------------------------------------------------
DEFAULT_WEIGHTS = {"grammar": 0.4, "mqar": 0.2, "niah_single": 0.2, "niah_multikey": 0.1,
                   "niah_multivalue": 0.1}


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
  """Task weights (normalised) and the inclusive range of example lengths in tokens."""

  weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
  min_len: int = 256
  max_len: int = 1024

  def __post_init__(self):
    bad = [t for t in self.weights if t not in TASKS]
    if bad:
      raise ValueError(f"MixtureConfig.weights: unknown tasks {bad}; expected names from {TASKS}")
    if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
      raise ValueError("MixtureConfig.weights must be >= 0 with a positive sum, "
                       f"got {dict(self.weights)}")
    if not 2 <= self.min_len <= self.max_len:
      raise ValueError("MixtureConfig: need 2 <= min_len <= max_len, "
                       f"got {self.min_len}, {self.max_len}")

  def tasks_and_probs(self) -> tuple[list[str], np.ndarray]:
    tasks = [t for t in TASKS if self.weights.get(t, 0) > 0]
    p = np.asarray([self.weights[t] for t in tasks], np.float64)
    return tasks, p / p.sum()


class SyntheticSource:
  """A random-access source (grain ``RandomAccessDataSource``) of ``size`` virtual examples.

  Index ``i`` picks its task and length from ``default_rng([seed, i])``, then generates the example
  with ``generate_example``; items are ``{"tokens": int32[L], "answer_mask": uint8[L]}``.
  """

  def __init__(self, mixture: MixtureConfig, tokenizer: Tokenizer, seed: int, size: int = 10 ** 9):
    self.mixture, self.tokenizer, self.seed, self.size = mixture, tokenizer, int(seed), int(size)
    self._tasks, self._probs = mixture.tasks_and_probs()

  def __len__(self) -> int:
    return self.size

  def task_and_length(self, index: int) -> tuple[str, int]:
    rng = np.random.default_rng([self.seed, int(index)])
    task = self._tasks[int(rng.choice(len(self._tasks), p=self._probs))]
    return task, int(rng.integers(self.mixture.min_len, self.mixture.max_len + 1))

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    task, length = self.task_and_length(index)
    ex = generate_example(task, self.seed, int(index), length, self.tokenizer)
    return {"tokens": ex["tokens"], "answer_mask": ex["answer_mask"]}

  def __repr__(self) -> str:
    return f"SyntheticSource(seed={self.seed}, size={self.size}, mixture={self.mixture})"
