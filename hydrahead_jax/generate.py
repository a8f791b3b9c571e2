"""Greedy decoding without a cache (re-runs the full forward per token)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _bucket(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def generate(model, prompt_ids: Sequence[int], max_new_tokens: int = 16, *, eos_id: int | None = None,
             bucket: int = 64, compiler_options: dict | None = None) -> list[int]:
  """Greedy decoding: returns the new token ids (stops after ``eos_id``).

  No KV cache: every step re-runs the model on the whole sequence, padded at the end to a fixed length
  (a multiple of ``bucket``) so one compiled forward serves every step; causal attention keeps the padding
  invisible. Fine for tests and short answers; cost is ``max_new_tokens`` full forwards.
  ``compiler_options`` go to XLA (e.g. ``{"xla_backend_optimization_level": 3}`` where a test session
  lowered it globally).
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx

  prompt = [int(t) for t in prompt_ids]
  if not prompt:
    raise ValueError("generate: prompt_ids is empty")
  if max_new_tokens < 1:
    return []
  length = _bucket(len(prompt) + max_new_tokens, bucket)
  buf = np.zeros((1, length), np.int32)
  buf[0, : len(prompt)] = prompt
  graphdef, state = nnx.split(model)

  def next_token(state, tokens, pos):
    logits = nnx.merge(graphdef, state)(tokens)
    return jnp.argmax(logits[0, pos], axis=-1)

  step = jax.jit(next_token).lower(state, buf, jnp.int32(0)).compile(compiler_options)
  out: list[int] = []
  cur = len(prompt)
  for _ in range(max_new_tokens):
    tok = int(step(state, jnp.asarray(buf), jnp.int32(cur - 1)))
    out.append(tok)
    if eos_id is not None and tok == eos_id:
      break
    if cur == length:
      break
    buf[0, cur] = tok
    cur += 1
  return out
