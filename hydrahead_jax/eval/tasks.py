"""RULER-style long-context tasks over a natural-text haystack, plus MQAR (``data.synthetic``).

Every example is a prompt of EXACTLY ``length`` tokens (instruction, haystack with needles, question, the
answer's lead-in; inside the chat template when one is used) and its expected answer values. Its content (keys,
values, needle depths, where the haystack starts in the corpus) is a function of (seed, task, length, index)
only, so every model sees the same examples; token ids differ only between tokenizers. Pieces (template
parts, paragraphs, needles, question) are tokenized on their own and concatenated.

Tasks (RULER, Hsieh et al. 2024):
  niah_single      one needle "One of the special magic numbers for <key> is: <7 digits>." at an evenly
                   spread depth; asked for it.
  niah_multikey    four needles with different keys, one asked (three distractors).
  niah_multivalue  four needles with the same key, all four values asked.
  niah_multiquery  four needles with different keys, all four asked.
  vt               variable tracking: a chain "VAR AAAAA = 12345", "VAR BBBBB = VAR AAAAA", ... (five
                   variables) hidden in the text; asked which variables hold the value.
  mqar             multi-query associative recall (``data.synthetic``'s probe: key-value pairs, a grammar
                   gap, one key queried); raw format, never chat-wrapped.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from hydrahead_jax.data.tokenizer import encode_many
from hydrahead_jax.eval.corpus import TokenizedCorpus

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "mqar")
_TASK_CODE = {t: i for i, t in enumerate(TASKS)}

_ADJ = ("amber", "ancient", "bitter", "brave", "calm", "clever", "crimson", "curious", "distant", "eager",
        "fierce", "gentle", "golden", "hollow", "humble", "icy", "jolly", "lively", "lucky", "mellow", "misty",
        "noble", "olive", "proud", "quiet", "rapid", "rustic", "scarlet", "silent", "silver", "sleepy", "smooth",
        "sturdy", "swift", "tender", "tiny", "velvet", "vivid", "wild", "witty")
_NOUN = ("anchor", "badger", "banjo", "beacon", "canyon", "castle", "cedar", "comet", "compass", "falcon",
         "feather", "garden", "glacier", "harbor", "helmet", "island", "jacket", "kettle", "lantern", "lemon",
         "meadow", "mirror", "needle", "orchid", "otter", "pepper", "pillow", "quartz", "rabbit", "ribbon",
         "saddle", "spider", "teapot", "thistle", "tiger", "tulip", "violin", "walrus", "willow", "zebra")

NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                    "I will quiz you about the numbers afterwards.\n")
VT_INSTRUCTION = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n")


@dataclasses.dataclass
class Example:
  task: str
  length: int
  index: int
  prompt: list[int]  # exactly ``length`` token ids
  answer: list[int]  # the expected continuation's ids (teacher-forced log-probability)
  values: list[str]  # expected values; generation must produce each one (whole-number / whole-word match)
  depths: list[float]  # needle depths in the haystack (0 = start), NIAH / VT


def chat_parts(tokenizer, mode: str = "auto") -> tuple[str, str] | None:
  """(text before, text after) the user message in the tokenizer's chat template, or None (no template).

  mode 'auto': the template a tokenizer carries (GGUF ``tokenizer.chat_template``); 'on': that, else a ChatML
  fallback; 'off': none. Rendered with jinja2 when installed, else the ChatML fallback."""
  if mode == "off":
    return None
  if mode not in ("auto", "on"):
    raise ValueError(f"chat template: mode must be auto, on or off, got {mode!r}")
  template = getattr(tokenizer, "chat_template", None)
  if not template and mode == "auto":
    return None
  mark = "\x00MESSAGE\x00"
  if template:
    try:
      import jinja2.sandbox

      env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
      text = env.from_string(template).render(messages=[{"role": "user", "content": mark}],
                                              add_generation_prompt=True, bos_token="", eos_token="")
      if mark in text:
        before, after = text.split(mark, 1)
        return before, after
    except Exception:  # noqa: BLE001 - an unrenderable template: use the fallback
      pass
  return "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"


def _rng(seed: int, task: str, length: int, index: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), _TASK_CODE[task], int(length), int(index)])


def _keys(rng, n: int) -> list[str]:
  combos = rng.choice(len(_ADJ) * len(_NOUN), size=n, replace=False)
  return [f"{_ADJ[c // len(_NOUN)]}-{_NOUN[c % len(_NOUN)]}" for c in combos]


def _numbers(rng, n: int, digits: int = 7) -> list[str]:
  vals = rng.choice(9 * 10 ** (digits - 1), size=n, replace=False) + 10 ** (digits - 1)
  return [str(int(v)) for v in vals]


def _var_names(rng, n: int) -> list[str]:
  names: list[str] = []
  while len(names) < n:
    name = "".join(chr(65 + int(c)) for c in rng.integers(0, 26, 5))
    if name not in names:
      names.append(name)
  return names


def _join(values: Sequence[str]) -> str:
  return ", ".join(values)


def _spec(task: str, rng, index: int, n: int):
  """(needle texts, their depths, question, answer lead-in, answer values, instruction)."""
  if task == "vt":
    names = _var_names(rng, 5)
    value = str(int(rng.integers(10000, 100000)))
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
    depths = sorted(rng.uniform(0.05, 0.95, 5).tolist())  # in chain order
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    lead = (f"Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
            f"assigned the value {value}, they are:")
    return needles, depths, question, lead, names, VT_INSTRUCTION
  needle = "One of the special magic numbers for {} is: {}."
  if task == "niah_single":
    key, = _keys(rng, 1)
    value, = _numbers(rng, 1)
    depth = (index + 0.5) / n
    return ([needle.format(key, value)], [depth],
            f"What is the special magic number for {key} mentioned in the provided text?",
            f"The special magic number for {key} mentioned in the provided text is", [value], NIAH_INSTRUCTION)
  keys, values = _keys(rng, 4), _numbers(rng, 4)
  depths = rng.uniform(0.0, 1.0, 4).tolist()
  if task == "niah_multivalue":
    keys = [keys[0]] * 4
    order = np.argsort(depths, kind="stable")
    values = [values[i] for i in order]  # asked in order of appearance
    depths = [depths[i] for i in order]
    return ([needle.format(k, v) for k, v in zip(keys, values)], depths,
            f"What are all the special magic numbers for {keys[0]} mentioned in the provided text?",
            f"The special magic numbers for {keys[0]} mentioned in the provided text are", values, NIAH_INSTRUCTION)
  needles = [needle.format(k, v) for k, v in zip(keys, values)]
  if task == "niah_multikey":
    ask = int(rng.integers(4))
    return (needles, depths, f"What is the special magic number for {keys[ask]} mentioned in the provided text?",
            f"The special magic number for {keys[ask]} mentioned in the provided text is", [values[ask]],
            NIAH_INSTRUCTION)
  if task == "niah_multiquery":
    asked = _join(keys[:3]) + f", and {keys[3]}"
    return (needles, depths, f"What are all the special magic numbers for {asked} mentioned in the provided text?",
            f"The special magic numbers for {asked} mentioned in the provided text are", values, NIAH_INSTRUCTION)
  raise ValueError(f"unknown task {task!r}")


def _mqar(tokenizer, seed: int, length: int, index: int) -> Example:
  from hydrahead_jax.data.synthetic import make_probe_pair

  prompt, _, _, answer, _ = make_probe_pair("mqar", seed * 100003 + index, length, tokenizer)
  value = tokenizer.decode([int(t) for t in answer]).strip()
  return Example("mqar", length, index, [int(t) for t in prompt], [int(t) for t in answer], [value], [])


def build_example(task: str, tokenizer, corpus: TokenizedCorpus, length: int, index: int, *, num_examples: int,
                  seed: int = 0, chat: tuple[str, str] | None = None) -> Example:
  """Example ``index`` (of ``num_examples``: NIAH-single depths are spread evenly over them) of ``task`` with
  a prompt of exactly ``length`` tokens."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
  if task == "mqar":
    return _mqar(tokenizer, seed, length, index)
  rng = _rng(seed, task, length, index)
  needles, depths, question, lead, values, instruction = _spec(task, rng, index, num_examples)
  start = int(rng.integers(len(corpus.ids)))
  before, after = chat if chat is not None else ("", "")
  bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None else []
  head_ids, tail_ids, lead_ids, answer_ids, *needle_ids = encode_many(
      tokenizer, [before + instruction, "\n" + question + after, lead if chat else "\n" + lead,
                  " " + _join(values) + ".", *[n + "\n" for n in needles]])
  fixed = len(bos) + len(head_ids) + len(tail_ids) + len(lead_ids) + sum(map(len, needle_ids))
  budget = length - fixed
  if budget < 16:
    raise ValueError(f"task {task}: length {length} is too short for this tokenizer (the prompt around the "
                     f"haystack takes {fixed} tokens)")
  hay = corpus.take(start, budget)
  bounds = np.cumsum([0] + [len(p) for p in hay])
  slots = [int(np.argmin(np.abs(bounds - d * budget))) for d in depths]
  order = sorted(range(len(needles)), key=lambda i: (slots[i], i))  # keep chain order at equal slots
  prompt = bos + list(head_ids)
  k = 0
  for j in range(len(hay) + 1):
    while k < len(order) and slots[order[k]] == j:
      prompt += needle_ids[order[k]]
      k += 1
    if j < len(hay):
      prompt += hay[j]
  prompt += list(tail_ids) + list(lead_ids)
  assert len(prompt) == length, (task, len(prompt), length)
  return Example(task, length, index, prompt, list(answer_ids), list(values), [float(d) for d in depths])


def build_examples(task: str, tokenizer, corpus: TokenizedCorpus, length: int, num_examples: int, *,
                   seed: int = 0, chat: tuple[str, str] | None = None) -> list[Example]:
  chat = None if task == "mqar" else chat
  return [build_example(task, tokenizer, corpus, length, i, num_examples=num_examples, seed=seed, chat=chat)
          for i in range(num_examples)]


def match_values(text: str, values: Sequence[str]) -> float:
  """Fraction of ``values`` that occur in ``text`` as whole numbers / words (RULER's string match, without
  crediting a value inside a longer number or word)."""
  if not values:
    return 0.0
  hits = [re.search(rf"(?<![0-9A-Za-z]){re.escape(v)}(?![0-9A-Za-z])", text) is not None for v in values]
  return float(np.mean(hits))
