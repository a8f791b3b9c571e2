"""HydraHead-JAX: head-level hybrid attention (softmax FA + Gated DeltaNet LA) in Flax NNX."""

from hydrahead_jax.config import HeadLayout, ModelConfig

__all__ = ["HeadLayout", "ModelConfig"]
