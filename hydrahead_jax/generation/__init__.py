"""Generation with the hybrid cache: FA K/V per token, a fixed-size Gated DeltaNet state per LA head.

    from hydrahead_jax.generation import generate
    new_ids = generate(model, [ids_a, ids_b], 32, temperature=0.7, top_p=0.9, stop_tokens=[tok.eos_id], seed=0)

Lower level: ``init_cache`` + ``prefill`` (chunked) + ``decode`` / ``decode_step``; ``score`` for
teacher-forced log-probs through the cache. Design notes: docs/evaluation.md.
"""

from hydrahead_jax.generation.cache import HybridCache, LayerCache, cache_bytes, cache_nbytes, init_cache
from hydrahead_jax.generation.generate import (decode, decode_step, generate, left_pad, prefill, prompt_bucket,
                                               round_up, score, split_model)
from hydrahead_jax.generation.sampling import filter_logits, sample_logits

__all__ = [
    "HybridCache", "LayerCache", "cache_bytes", "cache_nbytes", "decode", "decode_step", "filter_logits", "generate",
    "init_cache", "left_pad", "prefill", "prompt_bucket", "round_up", "sample_logits", "score", "split_model",
]
