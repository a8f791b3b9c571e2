"""Data layer: tokenizers, the synthetic retrieval corpus, grain pipelines and the prepare step.

``pipeline`` (grain) and ``prepare`` (array_record) are imported lazily on first attribute access.
"""

from hydrahead_jax.data.synthetic import (
    PROBE_TASKS, TASKS, MixtureConfig, SyntheticSource, generate_example, make_probe_pair)
from hydrahead_jax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

_LAZY = {
    "DataConfig": "pipeline", "make_train_iterator": "pipeline", "make_train_dataset": "pipeline",
    "make_eval_batches": "pipeline", "retrieval_accuracy": "pipeline", "example_accuracy": "pipeline",
    "PrepareError": "prepare",
}

__all__ = ["ByteTokenizer", "HFTokenizer", "MixtureConfig", "PROBE_TASKS", "SyntheticSource", "TASKS",
           "Tokenizer", "generate_example", "load_tokenizer", "make_probe_pair", *_LAZY]


def __getattr__(name: str):
  if name in _LAZY:
    import importlib

    mod = importlib.import_module(f"hydrahead_jax.data.{_LAZY[name]}")
    return getattr(mod, name)
  raise AttributeError(f"module 'hydrahead_jax.data' has no attribute {name!r}")
