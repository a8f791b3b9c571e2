"""A ~300M-parameter head-level hybrid (7:1 LA:FA) on one GPU (H100 80GB), same code as tiny.py.

24 layers, d_model 1024, 16 query heads in 8 KV groups of 2 (head_dim 64); in every layer group 0 is
full attention and groups 1-7 are Gated DeltaNet heads. SwiGLU 2816, tied embeddings.
Data: the embedded synthetic mixture at T=2048 (byte tokenizer) by default; for real text, prepare
shards with ``python -m hydrahead_jax.data.prepare`` and pass
``--set data.source=DIR --set data.tokenizer=... --set model.vocab_size=...``.

  python train.py --config configs/gpu_300m.py --workdir runs/gpu_300m
"""

from hydrahead_jax.config import HeadLayout, ModelConfig
from hydrahead_jax.data.pipeline import DataConfig
from hydrahead_jax.train.config_lib import CheckpointConfig, Config, OptimConfig, TrainConfig


def get_config() -> Config:
  layers = 24
  model = ModelConfig(
      vocab_size=320, d_model=1024, num_layers=layers, num_heads=16, num_kv_heads=8, head_dim=64,
      mlp_dim=2816, layout=HeadLayout.per_layer(layers, [0]), qk_norm=True, rope_theta=500_000.0,
      la_chunk_size=64, dtype="bfloat16", param_dtype="float32",  # kernels: the automatic choice (Pallas on GPU)
      remat="none", scan_layers=True)
  data = DataConfig(seq_len=2048, batch_size=16, seed=0, read_threads=4, prefetch_buffer=4)
  return Config(
      model=model, data=data,
      optim=OptimConfig(lr=6e-4, warmup_steps=500, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0),
      train=TrainConfig(steps=20_000, grad_accum=2, answer_loss_weight=1.0, log_every=10,
                        eval_every=1000, eval_tasks=("mqar", "niah_single", "niah_multikey"),
                        eval_examples=64, eval_batch_size=16),
      checkpoint=CheckpointConfig(every=1000, keep=3),
      workdir="runs/gpu_300m")
