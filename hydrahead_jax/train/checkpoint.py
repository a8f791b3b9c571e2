"""Orbax checkpoints of a run: train state, data-iterator position and the resolved config.

Layout: ``<workdir>/checkpoints/<step>/{state, data, config}``. ``state`` is the flat train state
(params, optimizer state, step) written with ``StandardSave`` (async: the device->host copy happens
in ``save``, files are written in the background and committed atomically, so a killed process never
leaves a half-written checkpoint behind); ``data`` is the grain iterator state (one JSON file per
JAX process, ``grain.checkpoint``); ``config`` is the config JSON. The manager keeps the last K.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import grain
import jax
import orbax.checkpoint as ocp

from hydrahead_jax.train import config_lib
from hydrahead_jax.train.config_lib import CheckpointConfig


class IncompatibleRunDir(ValueError):
  """The run directory holds checkpoints of a config this run cannot resume from."""


class Checkpointer:
  def __init__(self, workdir: str, cfg: CheckpointConfig):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  # -- queries --------------------------------------------------------------------------------------
  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def read_config(self, step: int) -> dict[str, Any]:
    out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return dict(out["config"])

  # -- save / restore -------------------------------------------------------------------------------
  def save(self, step: int, state: Any, data_iterator, config: Mapping[str, Any]) -> bool:
    """Starts a save (async) of ``state``, the iterator position and the config at ``step``."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(dict(config))), force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator) -> Any:
    """Restores onto ``abstract_state`` (ShapeDtypeStructs with shardings); sets the iterator."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return out["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with the same shardings) for a tree of arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def check_compatible(ckpt: Checkpointer, step: int, new_config: Mapping[str, Any]) -> dict:
  """Raises ``IncompatibleRunDir`` unless the checkpoint's config differs only in resume-safe keys;
  returns the resume-safe differences."""
  old = ckpt.read_config(step)
  bad = config_lib.incompatible(old, new_config)
  if bad:
    lines = "\n".join(f"  {k}: checkpoint has {a!r}, this run has {b!r}" for k, b_a in bad.items()
                      for a, b in [b_a])
    raise IncompatibleRunDir(
        f"run directory {os.path.dirname(ckpt.directory)!r} holds a checkpoint (step {step}) of an "
        f"incompatible config; refusing to resume or overwrite it:\n{lines}\n"
        "Use another --workdir (or delete that directory) to start a new run.")
  return config_lib.diff(old, new_config)
