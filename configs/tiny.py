"""The embedded default: a small head-level hybrid trained on CPU in a few minutes.

2 layers, 4 KV groups per layer of which group 0 is full attention (FA) and groups 1-3 are Gated
DeltaNet heads (3:1 LA:FA), byte tokenizer, a synthetic mixture dominated by multi-query associative
recall and needle-in-a-haystack. Evaluates teacher-forced retrieval accuracy on held-out MQAR and
needle examples at the end (chance is ~0.1: answers are random digits).

  python train.py --config configs/tiny.py
"""

from hydrahead_jax.config import HeadLayout, ModelConfig
from hydrahead_jax.data.pipeline import DataConfig
from hydrahead_jax.train.config_lib import CheckpointConfig, Config, OptimConfig, TrainConfig


def get_config() -> Config:
  layers = 2
  model = ModelConfig(
      vocab_size=320, d_model=128, num_layers=layers, num_heads=4, num_kv_heads=4, head_dim=32,
      mlp_dim=256, layout=HeadLayout.per_layer(layers, [0]), rope_theta=10_000.0,
      la_chunk_size=64, la_implementation="recurrent",  # the token-by-token scan is fastest on CPU
      dtype="bfloat16", param_dtype="float32")
  data = DataConfig(
      seq_len=192, batch_size=16, seed=0, min_doc_len=160, max_doc_len=193,
      task_weights={"mqar": 0.6, "niah_single": 0.3, "grammar": 0.1})
  return Config(
      model=model, data=data,
      optim=OptimConfig(lr=3e-3, warmup_steps=30, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0),
      train=TrainConfig(steps=300, log_every=10, eval_every=100, eval_tasks=("mqar", "niah_single"),
                        eval_examples=64, eval_batch_size=32, data_parallel=1),
      checkpoint=CheckpointConfig(every=100, keep=2),
      workdir="runs/tiny")
