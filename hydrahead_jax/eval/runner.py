"""Scoring a model on the tasks (generation + answer log-probability) and perplexity by token position.

All through the hybrid cache (``hydrahead_jax.generation``): one chunked prefill per batch of prompts, then
  - log-probability: the expected answer teacher-forced one token per decode step on a copy of the cache
    (``logprob``: mean log p per answer token; ``lp_acc``: every answer token is the argmax);
  - generation: greedy decoding from the same cache until every row produced a stop token (EOS, end of turn)
    or, for single-value tasks, ended its first line of content (or ``max_new_tokens``); ``gen_acc`` = RULER's
    string match: the fraction of expected values found (as whole numbers / words) in the generated text.
Prompts of a batch have the same length (no padding); a short last batch is filled with copies (discarded).
Every batch's cache has ``RunSettings.cache_slots`` slots (``evaluate_model`` sets it from the longest length), so
a whole suite needs one compiled prefill chunk and one compiled decode step (per distinct last-chunk width):
slots past a prompt are masked, and a short prompt's numbers differ from a cache of its own size only by the
order of float sums.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hydrahead_jax.eval.corpus import TokenizedCorpus
from hydrahead_jax.eval.tasks import Example, match_values
from hydrahead_jax.generation import decode_step, init_cache, prefill, round_up, score, split_model


@dataclasses.dataclass(frozen=True)
class RunSettings:
  batch_size: int = 4
  chunk_size: int = 1024  # prefill chunk (XLA attention holds [batch, heads, chunk, slots] scores)
  max_new_tokens: int = 64  # generation budget
  cache_slots: int | None = None  # cache size of every batch (>= length + max_new_tokens); None: per length
  compiler_options: dict | None = None


def suite_slots(lengths: Sequence[int], max_new_tokens: int) -> int:
  """One cache size for every length of a suite: the longest prompt + the generation budget, rounded to 64."""
  return round_up(max(lengths) + max_new_tokens, 64)


def _stop_ids(tokenizer) -> set[int]:
  ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
  for special in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
    enc = tokenizer.encode(special)
    if len(enc) == 1:
      ids.add(enc[0])
  return ids


def _log_softmax_np(logits_BxV) -> np.ndarray:
  return np.asarray(jax.nn.log_softmax(jnp.asarray(logits_BxV, jnp.float32), axis=-1))


def run_batch(model, tokenizer, examples: Sequence[Example], settings: RunSettings) -> list[dict]:
  """Scores examples of one length (``len(examples) <= batch_size``); one dict per example."""
  n = len(examples)
  rows = list(examples) + [examples[-1]] * (settings.batch_size - n)
  B, L = len(rows), rows[0].length
  A = max(len(e.answer) for e in rows)
  if A > settings.max_new_tokens:
    raise ValueError(f"eval: answers of {A} tokens exceed --max-new-tokens {settings.max_new_tokens}")
  S = settings.cache_slots or suite_slots([L], settings.max_new_tokens)
  if S < L + settings.max_new_tokens:
    raise ValueError(f"eval: cache_slots {S} < prompt length {L} + max_new_tokens {settings.max_new_tokens}")
  opts = settings.compiler_options
  cache = init_cache(model, B, S)
  model = split_model(model)  # once, not per decode step
  last, cache = prefill(model, np.asarray([e.prompt for e in rows], np.int32), cache,
                        chunk_size=settings.chunk_size, compiler_options=opts)

  # teacher-forced answer log-probabilities (on a copy: the cache is donated to each step)
  answer = np.full((B, A), tokenizer.pad_id, np.int32)
  mask = np.zeros((B, A), bool)
  for b, e in enumerate(rows):
    answer[b, :len(e.answer)] = e.answer
    mask[b, :len(e.answer)] = True
  logp, hit = np.zeros((B, A), np.float32), np.zeros((B, A), bool)
  lp = _log_softmax_np(last)
  forked = jax.tree.map(jnp.copy, cache)
  for i in range(A):
    logp[:, i] = lp[np.arange(B), answer[:, i]]
    hit[:, i] = lp.argmax(-1) == answer[:, i]
    if i + 1 < A:
      logits, forked = decode_step(model, forked, answer[:, i], check=False, compiler_options=opts)
      lp = _log_softmax_np(logits)
  del forked

  # greedy generation
  stops = _stop_ids(tokenizer)
  tok = np.asarray(jnp.argmax(last, axis=-1), np.int32)
  gen = [[] for _ in range(B)]
  ended = np.zeros(B, bool)
  for step in range(settings.max_new_tokens):
    for b in range(B):
      if not ended[b]:
        gen[b].append(int(tok[b]))
        text = tokenizer.decode(gen[b])
        # a stop token; single-value tasks also end with their first line of content (the answer comes first)
        ended[b] = int(tok[b]) in stops or (len(rows[b].values) == 1 and "\n" in text.lstrip())
    if ended.all() or step + 1 == settings.max_new_tokens:
      break
    logits, cache = decode_step(model, cache, tok, check=False, compiler_options=opts)
    tok = np.asarray(jnp.argmax(logits, axis=-1), np.int32)

  out = []
  for b, e in enumerate(rows[:n]):
    text = tokenizer.decode([t for t in gen[b] if t not in stops]).strip()
    m = mask[b]
    out.append({"index": e.index, "values": e.values, "prediction": text,
                "gen_score": match_values(text, e.values), "logprob": float(logp[b, m].mean()),
                "lp_exact": bool(hit[b, m].all()), "depths": e.depths})
  return out


def evaluate_examples(model, tokenizer, examples: Sequence[Example], settings: RunSettings) -> dict:
  """Scores one (task, length) cell: per-example results and the means."""
  t0 = time.perf_counter()
  results = []
  for i in range(0, len(examples), settings.batch_size):
    results += run_batch(model, tokenizer, examples[i:i + settings.batch_size], settings)
  return {"gen_acc": float(np.mean([r["gen_score"] for r in results])),
          "lp_acc": float(np.mean([r["lp_exact"] for r in results])),
          "logprob": float(np.mean([r["logprob"] for r in results])),
          "n": len(results), "seconds": round(time.perf_counter() - t0, 2), "examples": results}


def position_buckets(length: int, first: int = 64) -> list[tuple[int, int]]:
  """[0, 64), [64, 128), [128, 256), ... doubling, the last one ending at ``length``."""
  edges = [0]
  e = first
  while e < length:
    edges.append(e)
    e *= 2
  edges.append(length)
  return list(zip(edges[:-1], edges[1:]))


def perplexity(model, tokenizer, corpus: TokenizedCorpus, length: int, num_docs: int, settings: RunSettings,
               seed: int = 0) -> dict:
  """Per-token NLL of ``num_docs`` documents of ``length`` tokens of running corpus text (seeded starting
  paragraphs), bucketed by token position; chunked through the cache (only [B, chunk, V] logits at a time)."""
  t0 = time.perf_counter()
  rng = np.random.default_rng([int(seed), 1 << 20, int(length)])
  bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None else []
  docs = np.asarray([bos + corpus.document(int(rng.integers(len(corpus.ids))), length + 1 - len(bos))
                     for _ in range(num_docs)], np.int32)
  nll = np.zeros((num_docs, length), np.float64)
  for i in range(0, num_docs, settings.batch_size):
    batch = docs[i:i + settings.batch_size]
    cache = init_cache(model, len(batch), round_up(length, settings.chunk_size))
    logp, _, _ = score(model, batch[:, :-1], batch[:, 1:], cache, chunk_size=settings.chunk_size,
                       compiler_options=settings.compiler_options)
    nll[i:i + len(batch)] = -logp
  buckets = []
  for lo, hi in position_buckets(length):
    m = float(nll[:, lo:hi].mean())
    buckets.append({"start": lo, "end": hi, "nll": m, "ppl": float(np.exp(m))})
  mean = float(nll.mean())
  return {"length": length, "docs": num_docs, "nll": mean, "ppl": float(np.exp(mean)), "buckets": buckets,
          "seconds": round(time.perf_counter() - t0, 2)}


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)
