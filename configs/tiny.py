"""The embedded default: a small head-level hybrid that learns in-context retrieval on CPU in minutes.

Model: 2 layers, d_model 64, 4 query heads in 2 KV groups per layer; group 0 is full attention (FA),
group 1 is Gated DeltaNet (LA) - a head-level 1:1 hybrid in every layer. Byte tokenizer.
Data: the embedded synthetic corpus, mostly multi-query associative recall (MQAR) with short
documents (one key-value pair, a few filler bytes before the recall) packed into 128-token rows,
plus grammar text. Answer tokens weigh 10x in the loss, which is what makes retrieval emerge within
a few hundred CPU steps (measured: at weight 1, or with filler gaps up to 17 bytes, accuracy stays at
chance for 1500 steps). Evaluation: teacher-forced accuracy on the answer digits of 64 held-out MQAR
examples (make_eval_batches); chance is ~0.1.

  python train.py --config configs/tiny.py            # ~2-3 min on 2 CPU cores, including compile
"""

from hydrahead_jax.config import HeadLayout, ModelConfig
from hydrahead_jax.data.pipeline import DataConfig
from hydrahead_jax.train.config_lib import CheckpointConfig, Config, OptimConfig, TrainConfig


def get_config() -> Config:
  layers = 2
  model = ModelConfig(
      vocab_size=320, d_model=64, num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16,
      mlp_dim=192, layout=HeadLayout.per_layer(layers, [0]), qk_norm=False, rope_theta=10_000.0,
      # On CPU the chunked GDN is fastest with chunks <= 16 (larger chunks hit a slow triangular solve).
      la_implementation="chunked", la_chunk_size=16,
      dtype="bfloat16", param_dtype="float32")
  data = DataConfig(
      seq_len=128, batch_size=8, seed=0, min_doc_len=37, max_doc_len=42,
      task_weights={"mqar": 0.85, "grammar": 0.15})
  return Config(
      model=model, data=data,
      optim=OptimConfig(lr=3e-3, warmup_steps=30, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0),
      train=TrainConfig(steps=400, answer_loss_weight=10.0, log_every=10, eval_every=100,
                        eval_tasks=("mqar",), eval_len=40, eval_examples=64, eval_batch_size=64,
                        data_parallel=1,
                        # faster CPU compiles at the same step time (applied by train.py before JAX starts)
                        xla_flags="--xla_backend_optimization_level=1"),
      checkpoint=CheckpointConfig(every=200, keep=2),
      workdir="runs/tiny")
