"""Teacher + head layout -> calibrated HydraHead student (parameter reuse, then fusion-scale calibration)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from hydrahead_jax.config import HeadLayout
from hydrahead_jax.transfer.surgery import convert_flat, student_config
from hydrahead_jax.interop.names import model_from_flat, model_to_flat
from hydrahead_jax.transfer.calibrate import calibrate_fusion, rms_match


def calibration_batches(tokenizer, *, num: int, length: int, batch_size: int, seed: int,
                        tasks: Sequence[str] = ("grammar", "niah_single", "mqar")) -> list[np.ndarray]:
  """``num`` examples of the synthetic corpus (tasks in turn; grammar where a task needs more than ``length``
  tokens), as [batch_size, length] int32 batches."""
  from hydrahead_jax.data.synthetic import generate_example

  if num < batch_size or batch_size < 1:
    raise ValueError(f"calibration: need num >= batch_size >= 1, got num={num}, batch_size={batch_size}")
  num -= num % batch_size  # whole batches only
  def example(i):
    try:
      return generate_example(tasks[i % len(tasks)], seed, i, length, tokenizer)["tokens"]
    except ValueError:  # too short for a retrieval task: plain grammar text
      return generate_example("grammar", seed, i, length, tokenizer)["tokens"]

  rows = [example(i) for i in range(num)]
  rows = np.stack(rows).astype(np.int32)
  return [rows[i:i + batch_size] for i in range(0, num, batch_size)]


def convert_teacher(teacher, layout: HeadLayout, calib: Sequence[np.ndarray] | None = None, *,
                    heldout: Sequence[np.ndarray] | None = None, inputs: str = "teacher", iterations: int = 3,
                    free_running_check: bool = True, progress: bool = False, **overrides):
  """(student, report). FA groups reuse the teacher exactly; LA heads start from their slices; with ``calib``
  batches, fusion scales are calibrated (and checked on ``heldout`` when given)."""
  scfg = student_config(teacher.cfg, layout, **overrides)
  student = model_from_flat(scfg, convert_flat(model_to_flat(teacher), scfg))
  report: dict = {"layout": [list(x) for x in layout.fa_groups], "describe": layout.describe(scfg.num_kv_heads)}
  if calib is not None and scfg.fusion != "none" and any(scfg.num_la_heads(l) for l in range(scfg.num_layers)):
    report["calibration"] = calibrate_fusion(student, teacher, calib, inputs=inputs, iterations=iterations,
                                             progress=progress)
    if heldout is not None:  # the criterion with the calibration's inputs, and the student's own forward
      for mode in dict.fromkeys([inputs] + (["student"] if free_running_check else [])):
        r = rms_match(student, teacher, heldout, inputs=mode)
        report["heldout" if mode == inputs else "heldout_free_running"] = {
            "inputs": mode, "max_head_rms_dev": r["max_head_dev"], "median_head_rms_dev": r["median_head_dev"],
            "median_channel_rms_dev": r["median_channel_dev"], "head_rms_ratio": r["head_ratio"].tolist()}
  return student, report
