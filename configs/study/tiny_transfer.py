"""The CPU demo recipe of the tiny study (configs/study/tiny.py): configs/transfer/tiny_demo.py with a handful of
steps per stage, a smaller corpus and the transfer's own before/after evaluation off (the study evaluates)."""

import dataclasses
import importlib.util
import os

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "transfer", "tiny_demo.py")

STEPS = {"align": 6, "distil": 6, "long": 4}


def get_config():
  spec = importlib.util.spec_from_file_location("hydrahead_study_tiny_demo", DEMO)
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  cfg = demo.get_config()
  stages = tuple(dataclasses.replace(s, steps=STEPS[s.name], log_every=2, checkpoint_every=STEPS[s.name],
                                     optim=dataclasses.replace(s.optim, warmup_steps=1),
                                     trainable_schedule=((0, ("*.mixer.*",)), (3, ("*",))) if s.trainable_schedule
                                     else ())
                 for s in cfg.stages)
  return cfg.replace(stages=stages, corpus=dataclasses.replace(cfg.corpus, max_tokens=20_000, doc_chars=4_000,
                                                               heldout_docs=2),
                     eval=dataclasses.replace(cfg.eval, enabled=False),
                     layout=dataclasses.replace(cfg.layout, methods=("exact", "retrieval"), per_task=8),
                     workdir="runs/study/tiny/transfer")
