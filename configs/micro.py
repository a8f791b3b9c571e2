"""A micro run for smoke tests: 2 layers, d_model 32, T=64, a few steps (seconds on CPU)."""

from hydrahead_jax.config import HeadLayout, ModelConfig
from hydrahead_jax.data.pipeline import DataConfig
from hydrahead_jax.train.config_lib import CheckpointConfig, Config, OptimConfig, TrainConfig


def get_config() -> Config:
  model = ModelConfig(
      vocab_size=320, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
      layout=HeadLayout.per_layer(2, [0]), la_chunk_size=16, la_implementation="recurrent")
  data = DataConfig(seq_len=64, batch_size=4, seed=0, min_doc_len=48, max_doc_len=65,
                    task_weights={"grammar": 0.5, "mqar": 0.5}, prefetch_buffer=2)
  return Config(
      model=model, data=data,
      optim=OptimConfig(lr=3e-3, warmup_steps=2),
      train=TrainConfig(steps=4, log_every=1, eval_tasks=("mqar",), eval_examples=4, eval_batch_size=4,
                        data_parallel=1),
      checkpoint=CheckpointConfig(every=2, keep=2),
      workdir="runs/micro")
