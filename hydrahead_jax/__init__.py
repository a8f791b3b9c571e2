"""HydraHead-JAX: head-level hybrid attention (softmax FA + Gated DeltaNet LA) in Flax NNX."""

from hydrahead_jax.interop.load import load, load_pretrained
from hydrahead_jax.interop.orbax import save_pretrained
from hydrahead_jax.config import HeadLayout, ModelConfig, parse_ratio
from hydrahead_jax.nn.model import HydraHeadLM, create_model
from hydrahead_jax.ops import gated_delta_rule

__all__ = ["HeadLayout", "HydraHeadLM", "ModelConfig", "create_model", "gated_delta_rule", "load", "load_pretrained", "parse_ratio",
           "save_pretrained"]
