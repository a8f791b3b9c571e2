"""Shared error handling of the command-line entry points.

A user error (bad config, unusable run directory or data, a checkpoint that cannot be restored, a
full disk) ends the program with ONE line ``error: ...`` on stderr and exit code 2 (or the error's
own ``exit_code``); its traceback is shown only with ``--debug`` or ``HYDRAHEAD_DEBUG=1``. Any other
exception is an internal error and keeps its full traceback.

Apply it to a CLI's ``main(argv=None) -> int``::

  from hydrahead_jax.cli import UserError, cli_main

  @cli_main                       # strips --debug from argv; catches UserError (+ user_errors)
  def main(argv=None) -> int:
    ...
    raise UserError("no such file: ...")   # or a subclass; ``exit_code`` picks the exit status

``cli_main(user_errors=(PrepareError,))`` also treats those exception types as user errors.
"""

from __future__ import annotations

import argparse
import importlib.util

import functools
import os
import sys
import traceback
from typing import Callable, Sequence

DEBUG_ENV = "HYDRAHEAD_DEBUG"
DEBUG_FLAG = "--debug"


class UserError(Exception):
  """An error the user can fix; the message is one self-contained line (what, where, what to do)."""

  exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
  """Argument errors as one-line ``UserError``s (exit 2), like the CLIs' other user errors."""

  def error(self, message):
    raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def debug_enabled() -> bool:
  """True under ``--debug`` (set by ``cli_main``) or ``HYDRAHEAD_DEBUG=1``: show full tracebacks."""
  return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def one_line(message: object) -> str:
  """The message with its lines joined by '; ' (an error is printed as one line)."""
  parts = [p.strip() for p in str(message).splitlines() if p.strip()]
  return "; ".join(parts) if parts else "(no message)"


def report(exc: BaseException, prog: str | None = None, file=None) -> int:
  """Prints ``error: <message>`` (one line; traceback first in debug mode); returns the exit code."""
  file = file or sys.stderr
  if debug_enabled():
    traceback.print_exception(exc, file=file)
  prefix = f"{prog}: " if prog else ""
  print(f"{prefix}error: {one_line(exc)}", file=file, flush=True)
  return int(getattr(exc, "exit_code", 2))


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None, *,
            user_errors: tuple[type[BaseException], ...] = (), prog: str | None = None) -> int:
  """Runs ``main(argv)`` with ``--debug`` removed from ``argv``; user errors -> one line + code."""
  args = list(sys.argv[1:] if argv is None else argv)
  old = os.environ.get(DEBUG_ENV)
  if DEBUG_FLAG in args:
    args = [a for a in args if a != DEBUG_FLAG]
    os.environ[DEBUG_ENV] = "1"
  try:
    rc = main(args)
  except (UserError, *user_errors) as e:
    return report(e, prog)
  finally:
    if old is None:
      os.environ.pop(DEBUG_ENV, None)
    else:
      os.environ[DEBUG_ENV] = old
  return 0 if rc is None else int(rc)


def cli_main(fn=None, *, user_errors: tuple[type[BaseException], ...] = (), prog: str | None = None):
  """Decorator form of ``run_cli``: ``@cli_main`` or ``@cli_main(user_errors=(...), prog=...)``."""

  def wrap(f):
    @functools.wraps(f)
    def wrapper(argv: Sequence[str] | None = None) -> int:
      return run_cli(f, argv, user_errors=user_errors, prog=prog)

    return wrapper

  return wrap(fn) if fn is not None else wrap


def import_config_file(path: str, error: type[Exception] = ValueError, what: str = "config file"):
  """The module of a Python config file that defines ``get_config()``; ``error`` with one line when the file does
  not exist or defines no ``get_config()`` (train, transfer and study configs are all such files)."""
  if not os.path.isfile(path):
    raise error(f"{what} {path!r} does not exist")
  name = "hydrahead_user_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise error(f"{what} {path!r} defines no get_config()")
  return module
