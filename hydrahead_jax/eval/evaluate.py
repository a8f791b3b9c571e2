"""``evaluate_model``: every task at every length, and perplexity, for one loaded model."""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

from hydrahead_jax.eval.corpus import tokenized
from hydrahead_jax.eval.report import length_label
from hydrahead_jax.eval.runner import RunSettings, evaluate_examples, log, perplexity, suite_slots
from hydrahead_jax.eval.tasks import TASKS, build_examples, chat_parts

ALL_TASKS = TASKS + ("ppl",)


def evaluate_model(model, tokenizer, *, tasks: Sequence[str] = ALL_TASKS, lengths: Sequence[int] = (1024,),
                   examples: int = 8, seed: int = 0, chat: str = "auto", ppl_docs: int = 2,
                   settings: RunSettings = RunSettings(), name: str = "model", verbose: bool = True) -> dict:
  """{'tasks': {task: {str(length): cell}}, 'ppl': {...} or None, 'chat_template': bool, 'seconds'}.

  A cell: gen_acc, lp_acc, logprob, n, seconds and per-example details (runner.evaluate_examples). Every
  length uses one cache size (``settings.cache_slots``, default: the longest length's), so the suite compiles
  its prefill chunk and decode step once. Perplexity is measured on documents of the longest length."""
  bad = [t for t in tasks if t not in ALL_TASKS]
  if bad:
    raise ValueError(f"unknown task(s) {', '.join(bad)}; choose from {', '.join(ALL_TASKS)}")
  if examples < 1:
    raise ValueError(f"--examples must be >= 1, got {examples}")
  if settings.cache_slots is None:
    settings = dataclasses.replace(settings, cache_slots=suite_slots(lengths, settings.max_new_tokens))
  t0 = time.perf_counter()
  corpus = tokenized(tokenizer)
  parts = chat_parts(tokenizer, chat)
  out: dict = {"tasks": {}, "ppl": None, "chat_template": parts is not None}
  for length in lengths:
    for task in tasks:
      if task == "ppl":
        continue
      exs = build_examples(task, tokenizer, corpus, length, examples, seed=seed, chat=parts)
      cell = evaluate_examples(model, tokenizer, exs, settings)
      out["tasks"].setdefault(task, {})[str(length)] = cell
      if verbose:
        log(f"[{name}] {task} @ {length_label(length)}: generation {cell['gen_acc']:.2f}, answer log-prob "
            f"{cell['logprob']:.3f} (teacher-forced exact {cell['lp_acc']:.2f}), {cell['n']} examples, "
            f"{cell['seconds']:.1f}s")
  if "ppl" in tasks:
    out["ppl"] = perplexity(model, tokenizer, corpus, max(lengths), ppl_docs, settings, seed)
    if verbose:
      log(f"[{name}] perplexity @ {length_label(max(lengths))}: {out['ppl']['ppl']:.2f} "
          f"({ppl_docs} documents, {out['ppl']['seconds']:.1f}s)")
  out["seconds"] = round(time.perf_counter() - t0, 2)
  return out
