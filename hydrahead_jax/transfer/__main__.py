"""``python -m hydrahead_jax.transfer --config configs/transfer/tiny_demo.py [--set key=value ...] [--workdir DIR]``:
the three-stage transfer (the same as ``python train.py --config <a transfer config>``; see docs/transfer.md)."""

from __future__ import annotations

import argparse
import sys

from hydrahead_jax.cli import cli_main


@cli_main
def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m hydrahead_jax.transfer", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", required=True, help="a transfer config file (get_config() -> TransferConfig)")
  ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                  help="override a value by dotted key, e.g. --set stages.distil.steps=200 (repeatable)")
  ap.add_argument("--workdir", default=None)
  ap.add_argument("--print-config", action="store_true")
  args = ap.parse_args(argv)
  from hydrahead_jax.transfer.runner import main_from_args  # noqa: PLC0415

  return main_from_args(args)


if __name__ == "__main__":
  sys.exit(main())
