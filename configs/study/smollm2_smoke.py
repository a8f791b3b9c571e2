"""CPU smoke of the SmolLM2 study's arms, to run before a GPU stretch: the real teacher (the GGUF), each arm's
layout, conversion with calibration, the three stages for 2 steps each on short rows, the suite at 1K with one
example, the short-context proxy. It catches an arm that would fail on the GPU (a layout, a conversion or fusion
path, a trainable pattern) for ~10 CPU minutes an arm; its numbers say nothing.

  python -m hydrahead_jax.study --config configs/study/smollm2_smoke.py --arms 7,8,9

Everything else is configs/study/smollm2.py's: the arms, layouts and head scores. Runs and results stay under
runs/study/smollm2_smoke/ (its own small corpus: 200K tokens).
"""

import dataclasses
import os

from hydrahead_jax.study.config import StudyEval, load

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORK = os.path.join(ROOT, "runs", "study", "smollm2_smoke")

SMOKE = (
    f"corpus.out={os.path.join(WORK, 'corpus')}", "corpus.max_tokens=200000", "corpus.heldout_docs=2",
    "convert.calib_num=4", "convert.heldout_num=2", "checkpoint.keep=1",
    "stages.align.steps=2", "stages.align.data.seq_len=512", "stages.align.data.batch_size=2",
    "stages.align.data.min_doc_len=256", "stages.align.data.max_doc_len=513",
    "stages.distil.steps=2", "stages.distil.data.seq_len=512", "stages.distil.data.batch_size=2",
    "stages.distil.data.min_doc_len=256", "stages.distil.data.max_doc_len=513",
    "stages.distil.trainable_schedule=((0, ('*.mixer.*',)), (1, ('*',)))",
    "stages.long.steps=2", "stages.long.data.seq_len=1024", "stages.long.data.min_doc_len=512",
    "stages.long.data.max_doc_len=1025", "stages.long.teacher_window=512",
)


def get_config():
  base = load(os.path.join(HERE, "smollm2.py"))
  overrides = tuple(o for o in base.transfer_overrides if not o.startswith("corpus.out="))
  return dataclasses.replace(
      base, name="smollm2_smoke", transfer_overrides=overrides, budgets={"smoke": SMOKE}, budget="smoke",
      minutes_per_arm=10.0,
      eval=StudyEval(tasks=("niah_single", "ppl"), retrieval_tasks=("niah_single",), lengths=(1024,), examples=1,
                     seed=0, chat="auto", ppl_docs=1, batch_size=1, chunk_size=512, max_new_tokens=16,
                     proxy_length=256, proxy_docs=1, proxy_batch=1),
      workroot=os.path.join(WORK, "arms"), out_dir=os.path.join(WORK, "results"),
      report=os.path.join(WORK, "results.md"))
