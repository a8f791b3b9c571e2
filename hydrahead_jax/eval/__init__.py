"""Evaluation: RULER-style retrieval over a natural-text haystack, MQAR and perplexity by token position,
scored by generation and by answer log-probability through the hybrid cache. CLI: ``python -m
hydrahead_jax.eval`` (``eval.cli``); design and numbers: docs/evaluation.md."""

from hydrahead_jax.eval.evaluate import ALL_TASKS, evaluate_model
from hydrahead_jax.eval.runner import RunSettings, evaluate_examples, perplexity, position_buckets
from hydrahead_jax.eval.tasks import TASKS, Example, build_example, build_examples, chat_parts, match_values

__all__ = ["ALL_TASKS", "Example", "RunSettings", "TASKS", "build_example", "build_examples", "chat_parts",
           "evaluate_examples", "evaluate_model", "match_values", "perplexity", "position_buckets"]
