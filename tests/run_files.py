"""Reading a training run directory in tests: checkpointed parameters and logged losses."""

import json
import os

import numpy as np


def checkpoint_params(workdir, step):
  """Flat params of a checkpoint as numpy (restored without a target)."""
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as m:
    out = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return {k: np.asarray(v) for k, v in out["state"]["params"].items()}


def logged_losses(workdir):
  """{step: loss} of the run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
