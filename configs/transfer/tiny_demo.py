"""The embedded CPU demo of the whole transfer path (docs/transfer.md has its output and timings).

  python train.py --config configs/transfer/tiny_demo.py      # a few minutes on 2 CPU cores; rerun = resume

1. teacher: an all-FA byte-level model trained by the train.py loop on the synthetic corpus
   (configs/transfer/tiny_teacher.py, 400 steps, cached in <workdir>/teacher); its window is 42 tokens;
2. selection: exact patching of every head on MQAR probes, global policy at 3:1 (1 FA group of 4 is kept);
3. conversion with fusion-scale calibration;
4. align (stage 1), distil (stage 2: mixers first, then everything) and long (stage 3: 128-token rows, three
   times the teacher's window: 40% real text from installed packages (positions up to 127), 60% the teacher's
   retrieval documents; KL inside the window, CE beyond it; RoPE kept: raising its base broke this teacher's
   retrieval head within the stage, see docs/transfer.md; try --set stages.long.rope=raise_base
   --set stages.long.rope_theta=40000);
5. the before/after table: held-out MQAR probes (32 tokens, inside the window) and held-out real text (CE inside
   and beyond the teacher's window, KL to the teacher inside it).
"""

import os

from hydrahead_jax.data.pipeline import DataConfig
from hydrahead_jax.train.config_lib import CheckpointConfig, OptimConfig
from hydrahead_jax.transfer.config import (ALIGN_TRAINABLE, ConvertConfig, CorpusConfig, EvalConfig, LayoutConfig,
                                           TeacherConfig, TransferConfig, align_stage, distil_stage, long_stage)

HERE = os.path.dirname(os.path.abspath(__file__))
SHORT = {"task_weights": {"mqar": 0.85, "grammar": 0.15}, "min_doc_len": 37, "max_doc_len": 42}


def get_config() -> TransferConfig:
  return TransferConfig(
      teacher=TeacherConfig(source="train", train_config=os.path.join(HERE, "tiny_teacher.py"), dtype="float32",
                            compute_dtype="bfloat16"),
      layout=LayoutConfig(policy="global", budget="3:1", lengths=(32,), tasks=("mqar",), per_task=16,
                          methods=("exact",), batch_size=16),
      convert=ConvertConfig(calib_num=32, calib_length=128, calib_batch=16, heldout_num=16),
      corpus=CorpusConfig(max_tokens=400_000, doc_chars=20_000, heldout_docs=8),
      stages=(
          align_stage(steps=100, data=DataConfig(seq_len=128, batch_size=8, seed=1, **SHORT),
                      optim=OptimConfig(lr=3e-3, warmup_steps=10, weight_decay=0.0, trainable=ALIGN_TRAINABLE),
                      log_every=20, checkpoint_every=50),
          distil_stage(steps=200, data=DataConfig(seq_len=128, batch_size=8, seed=2, **SHORT),
                       optim=OptimConfig(lr=2e-3, warmup_steps=10, weight_decay=0.01),
                       trainable_schedule=((0, ("*.mixer.*",)), (100, ("*",))), temperature=1.0,
                       log_every=20, checkpoint_every=50),
          long_stage(steps=100, data=DataConfig(source="corpus", seq_len=128, batch_size=8, seed=3,
                                                synthetic_fraction=0.6, **SHORT),
                     optim=OptimConfig(lr=1e-4, warmup_steps=5, weight_decay=0.01), ce_weight=1.0,
                     rope="keep", log_every=10, checkpoint_every=50),
      ),
      eval=EvalConfig(tasks=("mqar",), lengths=(32,), per_task=64, seed=7, batch_size=32, text_batches=1,
                      text_length=128),
      checkpoint=CheckpointConfig(keep=2),
      workdir="runs/transfer_tiny", progress=False,
      xla_flags="--xla_backend_optimization_level=1")
