"""train.py at 512K tokens per sequence: the Qwen3-0.6B-shape 7:1 head-level hybrid, one sequence split over two
GPUs (issue #15, docs/parallelism.md).

28 layers, d_model 1024, 16 query heads in 8 KV groups (head_dim 128), SwiGLU 3072, vocabulary 151,936 tied (the
shapes of benchmarks/train_step.py and benchmarks/train_cp.py); in every layer KV group 0 is full attention and
groups 1-7 are Gated DeltaNet heads. bf16 compute, f32 parameters, AdamW, full remat, the chunked cross entropy.
Data: the embedded synthetic mixture, one document of 524,288 tokens per row (byte tokenizer; the model's vocabulary
keeps the Qwen3 size so the loss head costs what it costs a real model). One document per row keeps the FA heads on
cuDNN without a mask; rows packed from several documents take the segment-aware Pallas kernel at this length, which
measured ~3x slower (2026-11-30: 4.6K tok/s with 4K-512K documents vs 13.4K tok/s for one document,
docs/parallelism.md).

  python train.py --config configs/long_512k.py                                  # 2 x H200: CP = 2
  python train.py --config configs/long_512k.py --set train.context_parallel=1 \\
      --set data.seq_len=262144                                                  # one H200 (largest that fits)
"""

from hydrahead_jax.config import HeadLayout, ModelConfig
from hydrahead_jax.data.pipeline import DataConfig
from hydrahead_jax.train.config_lib import CheckpointConfig, Config, OptimConfig, TrainConfig


def get_config() -> Config:
  layers = 28
  model = ModelConfig(
      vocab_size=151_936, d_model=1024, num_layers=layers, num_heads=16, num_kv_heads=8, head_dim=128,
      mlp_dim=3072, layout=HeadLayout.per_layer(layers, [0]), qk_norm=True, rope_theta=1_000_000.0,
      tie_embeddings=True, dtype="bfloat16", param_dtype="float32", remat="full")
  data = DataConfig(seq_len=524_288, batch_size=1, seed=0, min_doc_len=524_289, max_doc_len=524_289)
  return Config(
      model=model, data=data,
      optim=OptimConfig(lr=1e-4, warmup_steps=2, weight_decay=0.1, clip_norm=1.0),
      train=TrainConfig(steps=6, log_every=1, context_parallel=2, eval_tasks=("niah_single",), eval_examples=2,
                        eval_len=8192, eval_batch_size=1),  # a short check at the end: the point is the step
      checkpoint=CheckpointConfig(every=1000, keep=1),
      workdir="runs/long_512k")
