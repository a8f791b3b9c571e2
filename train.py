"""Train a HydraHead model: ``python train.py --config configs/tiny.py [--set key=value ...] [--workdir DIR]``.

Resumes automatically from the newest checkpoint in the run directory that restores (a damaged one
is reported in one line and moved aside to <step>.damaged-<n>; see docs/reliability.md). Exit codes:
0 done (or stopped cleanly by SIGTERM/SIGINT after saving), 2 user error (bad config, incompatible
or unusable run directory, bad data; one line `error: ...`), 3 training diverged (non-finite loss or
gradient norm; the last good checkpoint is kept), 4 a checkpoint save failed (e.g. disk full; the
previous checkpoint is intact). `--debug` (or HYDRAHEAD_DEBUG=1) adds tracebacks to user errors.
"""

from __future__ import annotations

import argparse
import sys

from hydrahead_jax.cli import UserError, cli_main


@cli_main
def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   epilog="--debug: show the traceback of user errors too",
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/tiny.py", help="Python file defining get_config()")
  parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value by dotted key, e.g. --set optim.lr=1e-3 (repeatable)")
  parser.add_argument("--workdir", default=None, help="run directory (default: the config's workdir)")
  parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
  args = parser.parse_args(argv)

  from hydrahead_jax.train import config_lib  # noqa: PLC0415 (fast --help)
  from hydrahead_jax.transfer.config import load_any  # noqa: PLC0415

  try:
    cfg = load_any(args.config, args.overrides, args.workdir)
  except ValueError as e:  # config errors are ValueErrors naming the key
    raise UserError(str(e)) from e
  if not isinstance(cfg, config_lib.Config):  # a three-stage transfer config (docs/transfer.md)
    from hydrahead_jax.transfer.runner import main_from_config  # noqa: PLC0415
    return main_from_config(cfg, args.print_config)
  if args.print_config:
    print(config_lib.to_json(cfg))
    return 0

  if cfg.train.xla_flags:  # before the first JAX computation creates a backend
    import os  # noqa: PLC0415
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + cfg.train.xla_flags).strip()

  from hydrahead_jax.train.loop import TrainingDiverged, train  # noqa: PLC0415

  try:
    train(cfg)  # user errors (IncompatibleRunDir, CheckpointUnusable, ...) are UserErrors
  except TrainingDiverged as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  return 0


if __name__ == "__main__":
  sys.exit(main())
