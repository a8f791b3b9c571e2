"""Orbax checkpoints of a run: train state, data-iterator position, resolved config and checksums.

Layout: ``<workdir>/checkpoints/<step>/{state, data, config, digest}``. ``state`` is the flat train
state (params, optimizer state, step) written with ``StandardSave`` (async: the device->host copy
happens in ``save``, files are written in a temporary ``<step>.orbax-checkpoint-tmp`` directory in the
background, which is renamed to ``<step>`` only after every item and the ``commit_success.txt``
marker are written); ``data`` is the grain iterator state (one JSON file per JAX process,
``grain.checkpoint``); ``config`` is the config JSON; ``digest`` holds checksums of the state arrays
(two 32-bit position-weighted sums of each array's bits, computed on device), of the config and of
the iterator state. The manager keeps the last K steps and deletes an old one only after a newer
save has committed.

Reliability (docs/reliability.md): a step is restored only if it is complete (commit marker and
every item present), every item reads back and every checksum matches; otherwise it is *damaged*:
it is reported in one line and renamed to ``<step>.damaged-<n>`` (never deleted; Orbax does not see
it any more) and the next older step is tried (``checkpoint.fallback=False``: stop instead,
changing nothing). A save that fails (disk full, I/O error; async saves fail in the background and
surface at the next save or ``wait``) leaves the previous checkpoints untouched and stops the run
(``checkpoint.on_save_error='stop'``) or warns and trains on (``'continue'``).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import warnings
from typing import Any, Callable, Mapping

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from hydrahead_jax.cli import UserError, debug_enabled
from hydrahead_jax.train import config_lib
from hydrahead_jax.train.config_lib import CheckpointConfig

ITEMS = ("state", "data", "config")  # required items; "digest" is absent in checkpoints of older versions
COMMIT_MARKER = "commit_success.txt"  # written by Orbax into a step before it is renamed into place
DAMAGED = ".damaged-"  # <step>.damaged-<n>: a step set aside (Orbax only lists plain integer names)


class IncompatibleRunDir(UserError, ValueError):
  """The run directory holds checkpoints of a config this run cannot resume from."""


class CheckpointUnusable(UserError):
  """No checkpoint of the run directory restores, or one does not and ``checkpoint.fallback`` is off."""


class CheckpointSaveFailed(UserError):
  """A save failed (``checkpoint.on_save_error='stop'``); the previous checkpoint is intact."""

  exit_code = 4


class DamagedCheckpoint(Exception):
  """A step that cannot be restored (incomplete, unreadable or failing its checksums)."""

  def __init__(self, step: int, reason: str):
    self.step, self.reason = step, reason
    super().__init__(f"checkpoint step {step}: {reason}")


# Exceptions that are bugs or resource limits, never evidence of a damaged checkpoint.
_NOT_DAMAGE = (MemoryError, TypeError, AttributeError, NameError, AssertionError, NotImplementedError,
               ImportError, RecursionError)


def _is_damage(exc: BaseException) -> bool:
  return (isinstance(exc, Exception) and not isinstance(exc, _NOT_DAMAGE)
          and not str(exc).startswith("RESOURCE_EXHAUSTED"))


def short_reason(exc: BaseException, limit: int = 160) -> str:
  """One short line from an (Orbax / TensorStore) exception: the innermost cause, without specs."""
  while exc.__cause__ is not None and str(exc.__cause__):
    exc = exc.__cause__
  if isinstance(exc, OSError) and exc.strerror:  # the cause first; a long path loses its front, not the cause
    name = str(exc.filename or "")
    room = max(limit - len(exc.strerror) - 16, 20)
    name = name if len(name) <= room else "..." + name[-room:]
    return f"OSError: {exc.strerror}" + (f": '{name}'" if name else "")
  text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
  text = str(text).split(" [tensorstore_spec", 1)[0].split("See full TensorStore details", 1)[0]
  text = " ".join(text.split()) or type(exc).__name__
  if len(text) > limit:  # TensorStore nests 'CODE: Error opening ...: Error reading ...: <the cause>'
    parts = text.split(": ")
    code = parts[0] if parts[0].replace("_", "").isupper() else type(exc).__name__
    tail: list[str] = []
    for p in reversed(parts[1:]):
      if tail and len(p) + sum(len(t) + 2 for t in tail) > limit - len(code) - 6:
        break
      tail.insert(0, p)
    text = f"{code}: ... " + ": ".join(tail)
    if len(text) > limit + 40:
      text = text[:limit + 37] + "..."
  return text


# -- checksums ------------------------------------------------------------------------------------
def _bits_u32(x: jax.Array) -> jax.Array:
  """The bit pattern of every element as uint32 (64-bit types: both halves mixed in)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
  if size == 8:
    halves = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return halves[..., 0] + halves[..., 1] * jnp.uint32(3)
  raise TypeError(f"no checksum for dtype {x.dtype}")


def _fingerprint(x: jax.Array) -> jax.Array:
  """Two position-weighted sums of the bits, mod 2^32: any single flipped bit changes the first
  (odd weights); the second (rotated bits, other odd weights) makes collisions ~2^-64 otherwise."""
  u = _bits_u32(jnp.asarray(x))
  idx = jnp.zeros(u.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(u.ndim)):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % (1 << 32))
    stride *= u.shape[d]
  h1 = jnp.sum(u * (idx * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  rot = (u << jnp.uint32(13)) | (u >> jnp.uint32(19))
  h2 = jnp.sum(rot * ((idx * jnp.uint32(0x9E3779B1)) | jnp.uint32(1)), dtype=jnp.uint32)
  return jnp.stack([h1, h2])


_fingerprints = jax.jit(lambda tree: jax.tree.map(_fingerprint, tree))


def state_digest(state: Any) -> dict[str, list[int]]:
  """``{leaf path: [h1, h2]}`` of a tree of arrays (one small jitted computation on device)."""
  fps = jax.device_get(_fingerprints(state))
  return {jax.tree_util.keystr(p): [int(v) for v in np.asarray(f)]
          for p, f in jax.tree_util.tree_leaves_with_path(fps)}


def json_digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# -- noise control --------------------------------------------------------------------------------
class _OrbaxErrorFilter(logging.Filter):
  """Drops Orbax's own ERROR log records (with tracebacks) and its warning about a step without
  metadata: the Checkpointer reports every failure and damaged step in one line. Off under --debug
  / HYDRAHEAD_DEBUG=1."""

  def filter(self, record: logging.LogRecord) -> bool:
    if f"{os.sep}orbax{os.sep}" not in record.pathname or record.levelno < logging.WARNING:
      return True
    return record.levelno < logging.ERROR and not record.getMessage().startswith(
        "Metadata file does not exist")


def _quiet_unraisable(previous):
  """A failed TensorStore read leaves other reads pending whose callbacks hit a closed asyncio loop
  ('Event loop is closed', dozens of tracebacks); those, and only those, are dropped."""

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    previous(unraisable)

  hook.hydrahead_quiet = True
  return hook


# -- the checkpointer -----------------------------------------------------------------------------
class Checkpointer:
  """Save / restore of run checkpoints with damage detection, fallback and save-failure policy.

  ``print_fn`` receives the one-line warnings (a damaged step set aside, a failed save under
  ``on_save_error='continue'``).
  """

  def __init__(self, workdir: str, cfg: CheckpointConfig, print_fn: Callable[[str], None] = print):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.cfg = cfg
    self.print_fn = print_fn
    self._pending: int | None = None  # step of an async save not yet confirmed
    self._filter = None
    self._old_hook = None
    if not debug_enabled():
      self._filter = _OrbaxErrorFilter()
      logging.getLogger("absl").addFilter(self._filter)
      if not getattr(sys.unraisablehook, "hydrahead_quiet", False):
        self._old_hook = sys.unraisablehook
        sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
    self.manager = self._new_manager()
    steps = self.all_steps()
    self.last_committed: int | None = steps[-1] if steps else None  # newest step known to be complete

  def _new_manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self.cfg.keep, enable_async_checkpointing=self.cfg.async_save, create=True)
    return ocp.CheckpointManager(self.directory, options=options)

  def _reset_manager(self) -> None:
    """A new manager: rescans the steps on disk and drops errors a failed save left queued."""
    with contextlib.suppress(Exception):
      self.manager.close()
    self.manager = self._new_manager()

  # -- queries --------------------------------------------------------------------------------------
  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def damaged_dirs(self) -> list[str]:
    return sorted(glob.glob(os.path.join(self.directory, f"*{DAMAGED}*")))

  def check_complete(self, step: int) -> None:
    """Raises ``DamagedCheckpoint`` unless the step has its commit marker and every item."""
    path = self.step_dir(step)
    if not os.path.isfile(os.path.join(path, COMMIT_MARKER)):
      raise DamagedCheckpoint(step, f"incomplete: no {COMMIT_MARKER}, the save never finished")
    missing = [i for i in ITEMS if not os.path.isdir(os.path.join(path, i))]
    if missing:
      raise DamagedCheckpoint(step, f"incomplete: item(s) {', '.join(missing)} missing")

  def _has_digest(self, step: int) -> bool:
    return os.path.isdir(os.path.join(self.step_dir(step), "digest"))

  def _restore(self, step: int, **items) -> dict[str, Any]:
    err, out = None, None
    try:
      self.check_complete(step)
      if self._has_digest(step):
        items["digest"] = ocp.args.JsonRestore()
      out = dict(self.manager.restore(step, args=ocp.args.Composite(**items)))
    except DamagedCheckpoint as e:
      err = e
    except Exception as e:  # noqa: BLE001 (classified here)
      if not _is_damage(e):
        raise
      err = DamagedCheckpoint(step, short_reason(e))
      err.__cause__ = e
    if jax.process_count() > 1:  # every process takes the same decision (only process 0 renames)
      from jax.experimental import multihost_utils  # noqa: PLC0415
      if np.asarray(multihost_utils.process_allgather(np.int32(err is not None))).any() and err is None:
        err = DamagedCheckpoint(step, "cannot be restored on another JAX process")
    if err is not None:
      raise err
    return out

  def read_config(self, step: int) -> dict[str, Any]:
    """The config saved with ``step`` (checked: complete step, readable, matching its checksum)."""
    out = self._restore(step, config=ocp.args.JsonRestore())
    config = dict(out["config"])
    digest = out.get("digest")
    if digest is not None and digest.get("config") != json_digest(config):
      raise DamagedCheckpoint(step, "config does not match its checksum")
    return config

  # -- restore --------------------------------------------------------------------------------------
  def restore(self, step: int, abstract_state: Any, data_iterator) -> Any:
    """Restores onto ``abstract_state`` (ShapeDtypeStructs with shardings) and sets the iterator;
    raises ``DamagedCheckpoint`` if the step is incomplete, unreadable or fails its checksums."""
    out = self._restore(step, state=ocp.args.StandardRestore(abstract_state),
                        data=grain.checkpoint.CheckpointRestore(data_iterator))
    state, digest = out["state"], out.get("digest")
    if digest is not None:
      want = digest.get("state", {})
      got = state_digest(state)
      bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
      if bad:
        raise DamagedCheckpoint(step, f"{len(bad)} state array(s) do not match their checksums "
                                      f"(first: {bad[0]})")
      if "data" in digest and jax.process_count() == 1 and digest["data"] != json_digest(
          data_iterator.get_state()):
        raise DamagedCheckpoint(step, "data-iterator state does not match its checksum")
    return state

  def set_aside(self, damaged: DamagedCheckpoint) -> str:
    """Renames the damaged step to ``<step>.damaged-<n>`` (process 0) and rescans; returns the path."""
    step = damaged.step
    src = self.step_dir(step)
    n = 1
    while os.path.exists(f"{src}{DAMAGED}{n}"):
      n += 1
    dst = f"{src}{DAMAGED}{n}"  # (other processes may name a later n: only process 0 renames)
    if jax.process_index() == 0:
      os.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415
      multihost_utils.sync_global_devices(f"hydrahead_set_aside_{step}")
    self._reset_manager()
    self.last_committed = self.latest_step()
    return dst

  def handle_damaged(self, damaged: DamagedCheckpoint) -> None:
    """Sets the step aside with a one-line warning, or raises ``CheckpointUnusable`` when
    ``checkpoint.fallback`` is off (nothing is changed then)."""
    older = [s for s in self.all_steps() if s < damaged.step]
    if not self.cfg.fallback:
      raise CheckpointUnusable(
          f"checkpoint step {damaged.step} in {self.directory} cannot be restored ({damaged.reason}); "
          "checkpoint.fallback=false, so nothing was changed. Set checkpoint.fallback=true to move it "
          f"aside and resume from {'step ' + str(older[-1]) if older else 'an older step (none left)'}, "
          "or move it away yourself")
    dst = self.set_aside(damaged)
    nxt = f"trying step {older[-1]}" if older else "no older step left"
    self.print_fn(f"warning: checkpoint step {damaged.step} cannot be restored ({damaged.reason}); "
                  f"moved it aside to {dst} (kept, not deleted); {nxt}")

  # -- save -----------------------------------------------------------------------------------------
  def save(self, step: int, state: Any, data_iterator, config: Mapping[str, Any]) -> bool:
    """Starts a save (async) of ``state``, the iterator position, the config and their checksums.

    First settles the previous async save (its failure is reported here). Returns False if this
    save could not be started and ``on_save_error='continue'``; raises ``CheckpointSaveFailed``
    on a failure under ``'stop'``.
    """
    self._settle()
    digest = {"version": 1, "state": state_digest(state), "config": json_digest(dict(config))}
    if jax.process_count() == 1:
      digest["data"] = json_digest(data_iterator.get_state())
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iterator),
          config=ocp.args.JsonSave(dict(config)),
          digest=ocp.args.JsonSave(digest)), force=True)
    except Exception as e:  # noqa: BLE001 (reported per checkpoint.on_save_error)
      self._failed(step, e)
      return False
    self._pending = step
    if not self.cfg.async_save:
      self._settle()
    return True

  def _settle(self) -> None:
    """Waits for the pending async save; reports its failure per ``on_save_error``."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      self._failed(step, e)
      return
    self.last_committed = step

  def _failed(self, step: int, exc: BaseException) -> None:
    if not debug_enabled():  # Orbax drops the coroutines of a save that failed while starting
      warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    self._reset_manager()
    for tmp in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
      if jax.process_index() == 0:  # this process's own failed, never-committed write
        shutil.rmtree(tmp, ignore_errors=True)
    prev = f"step {self.last_committed}" if self.last_committed is not None else "none"
    msg = (f"checkpoint save at step {step} failed ({short_reason(exc)}); nothing was committed for "
           f"it and the previous checkpoint ({prev}) is intact")
    if self.cfg.on_save_error == "stop":
      raise CheckpointSaveFailed(
          f"{msg}; stopping (checkpoint.on_save_error=stop): fix the cause (e.g. free disk space) and "
          "rerun the same command to resume from it") from exc
    self.print_fn(f"warning: {msg}; continuing (checkpoint.on_save_error=continue)")

  def wait(self) -> None:
    """Blocks until the last save is committed (or reported as failed)."""
    self._settle()

  def close(self) -> None:
    """Waits for a pending save (a failure is printed, not raised: close runs during unwinding)."""
    try:
      self._settle()
    except CheckpointSaveFailed as e:
      self.print_fn(f"warning: {e}")
    with contextlib.suppress(Exception):
      self.manager.close()
    if self._filter is not None:
      logging.getLogger("absl").removeFilter(self._filter)
      self._filter = None
    if self._old_hook is not None:
      sys.unraisablehook = self._old_hook
      self._old_hook = None


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with the same shardings) for a tree of arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def check_compatible(ckpt: Checkpointer, step: int, new_config: Mapping[str, Any]) -> dict:
  """Raises ``IncompatibleRunDir`` unless the checkpoint's config differs only in resume-safe keys;
  returns the resume-safe differences. Raises ``DamagedCheckpoint`` if the config cannot be read."""
  old = ckpt.read_config(step)
  bad = config_lib.incompatible(old, new_config)
  if bad:
    keys = "; ".join(f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in bad.items())
    raise IncompatibleRunDir(
        f"run directory {os.path.dirname(ckpt.directory)!r} holds a checkpoint (step {step}) of an "
        f"incompatible config ({keys}); refusing to resume or overwrite it. Use another --workdir "
        "(or delete that directory) to start a new run")
  return config_lib.diff(old, new_config)


def newest_compatible(ckpt: Checkpointer, new_config: Mapping[str, Any]) -> tuple[int | None, dict]:
  """The newest step whose config reads back (damaged ones are set aside, see ``handle_damaged``)
  and its resume-safe differences; ``(None, {})`` if there is none."""
  while (step := ckpt.latest_step()) is not None:
    try:
      return step, check_compatible(ckpt, step, new_config)
    except DamagedCheckpoint as e:
      ckpt.handle_damaged(e)
  return None, {}
