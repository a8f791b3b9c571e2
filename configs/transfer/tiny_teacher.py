"""The CPU demo's teacher (configs/transfer/tiny_demo.py trains it with this file, in <workdir>/teacher_run).

An all-FA byte-level model (2 layers, d_model 64, 4 query heads in 2 KV groups; the plain Qwen3/Llama decoder) on
the embedded synthetic corpus: mostly MQAR with short documents packed into 128-token rows, answers weighted 10x
(the configs/tiny.py recipe, which learns in-context retrieval within a few hundred CPU steps). Documents are
37-42 tokens long and positions restart per document, so the teacher has seen positions 0..41 only:
``max_position=42`` records that window; the transfer's long-context stage trains the student beyond it.

  python train.py --config configs/transfer/tiny_teacher.py       # alone: ~2-3 min on 2 CPU cores
"""

from hydrahead_jax.config import HeadLayout, ModelConfig
from hydrahead_jax.data.pipeline import DataConfig
from hydrahead_jax.train.config_lib import CheckpointConfig, Config, OptimConfig, TrainConfig


def get_config() -> Config:
  layers, groups = 2, 2
  model = ModelConfig(
      vocab_size=320, d_model=64, num_layers=layers, num_heads=4, num_kv_heads=groups, head_dim=16, mlp_dim=192,
      layout=HeadLayout.all_fa(layers, groups), qk_norm=False, rope_theta=10_000.0, max_position=42,
      la_implementation="chunked", la_chunk_size=16, dtype="bfloat16", param_dtype="float32")
  data = DataConfig(seq_len=128, batch_size=8, seed=0, min_doc_len=37, max_doc_len=42,
                    task_weights={"mqar": 0.85, "grammar": 0.15})
  return Config(
      model=model, data=data,
      optim=OptimConfig(lr=3e-3, warmup_steps=30, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0),
      train=TrainConfig(steps=400, answer_loss_weight=10.0, log_every=50, eval_every=0, eval_tasks=("mqar",),
                        eval_len=40, eval_examples=64, eval_batch_size=64, data_parallel=1, progress=False,
                        xla_flags="--xla_backend_optimization_level=1"),
      checkpoint=CheckpointConfig(every=200, keep=1),
      workdir="runs/tiny_teacher")
