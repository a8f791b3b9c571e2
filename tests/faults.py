"""Fault injection for reliability tests: damage files and checkpoints, make writes fail.

  flip_bytes(path)              invert bytes in the middle of a file (bit rot, a bad disk block)
  truncate(path)                cut a file short (a write that never finished)
  state_files(step_dir, kind)   the TensorStore files of a checkpoint's state: 'index' (OCDBT b-tree
                                nodes, state/d/*: CRC-checked by TensorStore) or 'data' (array
                                chunks, state/ocdbt.process_*/d/*: not checksummed by TensorStore)
  drop_commit_marker(step_dir)  remove commit_success.txt (a step that never committed)
  partial_step(ckpt_dir, step)  a step folder holding only state/_METADATA (a crash or full disk
                                in the middle of a save, or an interrupted copy)
  failing_writes(pattern)       context manager: every Python-level file write whose path matches
                                the regex fails with ENOSPC (Orbax / grain JSON items, metadata and
                                the commit marker are written this way), like a full disk
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re


def flip_bytes(path: str, count: int = 16, offset: int | None = None) -> None:
  """Inverts ``count`` bytes starting at ``offset`` (default: the middle of the file)."""
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    start = len(data) // 2 if offset is None else offset
    for i in range(start, min(len(data), start + count)):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)


def truncate(path: str, keep: float = 0.5) -> None:
  """Cuts the file to ``keep`` of its size."""
  with open(path, "r+b") as f:
    f.truncate(int(os.path.getsize(path) * keep))


def state_files(step_dir: str, kind: str = "data") -> list[str]:
  pattern = {"index": "state/d/*", "data": "state/ocdbt.process_*/d/*"}[kind]
  files = sorted(glob.glob(os.path.join(step_dir, pattern)), key=os.path.getsize)
  if not files:
    raise FileNotFoundError(f"no {kind} files under {step_dir}/state")
  return files


def drop_commit_marker(step_dir: str) -> None:
  os.remove(os.path.join(step_dir, "commit_success.txt"))


def partial_step(ckpt_dir: str, step: int, template_step: int) -> str:
  """Creates ``<ckpt_dir>/<step>/state/_METADATA`` copied from an existing step; returns the dir."""
  path = os.path.join(ckpt_dir, str(step))
  os.makedirs(os.path.join(path, "state"))
  with open(os.path.join(ckpt_dir, str(template_step), "state", "_METADATA"), "rb") as src, \
       open(os.path.join(path, "state", "_METADATA"), "wb") as dst:
    dst.write(src.read())
  return path


@contextlib.contextmanager
def failing_writes(pattern: str):
  """Writes (open for 'w'/'a'/'x'/'+') through etils.epath or builtins.open to a path matching the
  regex ``pattern`` raise ``OSError(ENOSPC)``; yields the list of paths that failed."""
  import builtins  # noqa: PLC0415

  from etils import epath  # noqa: PLC0415

  failed: list[str] = []
  regex = re.compile(pattern)
  cls = epath.gpath._GPath  # noqa: SLF001 (the local-filesystem Path class Orbax and grain write through)
  orig_epath_open, orig_open = cls.open, builtins.open

  def check(path, mode):
    p = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""
    if any(c in mode for c in "wax+") and regex.search(p):
      failed.append(p)
      raise OSError(errno.ENOSPC, "No space left on device", p)

  def epath_open(self, mode="r", *args, **kwargs):
    check(self, mode)
    return orig_epath_open(self, mode, *args, **kwargs)

  def builtin_open(file, mode="r", *args, **kwargs):
    check(file, mode)
    return orig_open(file, mode, *args, **kwargs)

  cls.open, builtins.open = epath_open, builtin_open
  try:
    yield failed
  finally:
    cls.open, builtins.open = orig_epath_open, orig_open
