"""Train a HydraHead model: ``python train.py --config configs/tiny.py [--set key=value ...] [--workdir DIR]``.

Resumes automatically from the latest checkpoint in the run directory. Exit codes: 0 done (or
stopped cleanly by SIGTERM/SIGINT after saving), 2 bad config / incompatible run directory,
3 training diverged (non-finite loss or gradient norm; the last good checkpoint is kept).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/tiny.py", help="Python file defining get_config()")
  parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value by dotted key, e.g. --set optim.lr=1e-3 (repeatable)")
  parser.add_argument("--workdir", default=None, help="run directory (default: the config's workdir)")
  parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
  args = parser.parse_args(argv)

  from hydrahead_jax.train import config_lib  # noqa: PLC0415 (fast --help)

  try:
    cfg = config_lib.load(args.config, args.overrides, args.workdir)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.print_config:
    print(config_lib.to_json(cfg))
    return 0

  if cfg.train.xla_flags:  # before the first JAX computation creates a backend
    import os  # noqa: PLC0415
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + cfg.train.xla_flags).strip()

  from hydrahead_jax.train.checkpoint import IncompatibleRunDir  # noqa: PLC0415
  from hydrahead_jax.train.loop import TrainingDiverged, train  # noqa: PLC0415

  try:
    train(cfg)
  except IncompatibleRunDir as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except TrainingDiverged as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  return 0


if __name__ == "__main__":
  sys.exit(main())
