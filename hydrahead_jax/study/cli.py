"""``python -m hydrahead_jax.study``: run arms of a study, import existing runs as arms, write the report.

  python -m hydrahead_jax.study --config configs/study/smollm2.py --arms 2,4 [--report]
  python -m hydrahead_jax.study --config configs/study/smollm2.py --report
  python -m hydrahead_jax.study import --config configs/study/smollm2.py --arm 2 --eval runs/eval/results.json \\
      --transfer-summary runs/smollm2_7to1/summary.json [--model model]

A rerun skips arms that have a result file and resumes the interrupted one (transfer checkpoints, cached
evaluation cells). Exit codes: 0 done, 2 bad input (one line), 3 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import os
import sys

from hydrahead_jax.cli import ArgumentParser, UserError, cli_main

PROG = "python -m hydrahead_jax.study"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                              "study", "smollm2.py")


def _common(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", default=DEFAULT_CONFIG,
                 help="a study config file (get_config() -> StudyConfig); default: configs/study/smollm2.py")
  p.add_argument("--out-dir", default=None, help="where arm results go (default: the config's out_dir)")
  p.add_argument("--report-file", default=None,
                 help="the report (default: the config's report; <out-dir>/results.md with --out-dir)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="transfer config override for every arm, e.g. --set stages.distil.steps=64 (repeatable)")
  p.add_argument("--budget", default=None, help="one of the config's named budgets (every arm alike)")
  p.add_argument("--workroot", default=None, help="where arm run directories go (default: the config's)")
  p.add_argument("--report", action="store_true", help="write the report from whatever results exist")


def build_parser(cmd: str) -> argparse.ArgumentParser:
  if cmd == "import":
    p = ArgumentParser(prog=f"{PROG} import", description="An existing run (eval results.json + transfer "
                       "summary.json) as an arm's result.")
    _common(p)
    p.add_argument("--arm", required=True)
    p.add_argument("--eval", required=True, help="results.json of python -m hydrahead_jax.eval")
    p.add_argument("--transfer-summary", default=None, help="summary.json of the arm's transfer (student arms)")
    p.add_argument("--model", default=None, help="which model of the results.json (default: found from the "
                                                 "summary / teacher source, or the only one)")
    p.add_argument("--force", action="store_true", help="replace an existing result of the arm")
    return p
  p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog="subcommand: import (see "
                     f"{PROG} import --help)")
  _common(p)
  p.add_argument("--arms", default=None, help="arm ids to run: '2,4', '1-9' or 'all'")
  p.add_argument("--check", action="store_true", help="only run the transfer's preflight on every arm of --arms "
                                                      "(no weights, no computation: catches config errors before "
                                                      "GPU time)")
  p.add_argument("--list", action="store_true",
                 help="list the arms, their layouts (derived ones are written to <out-dir>/layouts/) and results")
  return p


def _study(args):
  from hydrahead_jax.study import config as sconfig
  from hydrahead_jax.study.arms import Study

  cfg = sconfig.load(args.config)
  kw = {}
  if args.budget is not None:
    if args.budget not in cfg.budgets:
      raise UserError(f"--budget {args.budget!r}: this study has budgets {', '.join(cfg.budgets)}")
    kw["budget"] = args.budget
  if args.workroot:
    kw["workroot"] = args.workroot
  cfg = cfg.replace(**kw)
  report = args.report_file or (os.path.join(args.out_dir, "results.md") if args.out_dir else cfg.report)
  study = Study(cfg, args.overrides, args.out_dir)
  from hydrahead_jax.transfer.runner import apply_xla_flags

  apply_xla_flags(" ".join(f for f in (cfg.xla_flags, study.base.xla_flags) if f))
  return cfg, study, report


def _report(cfg, study, report: str) -> None:
  from hydrahead_jax.study.report import write_report

  path, claims = write_report(cfg, study.out_dir, report)
  print(f"wrote {path}")
  for c in claims:
    print(f"  claim {c.number} ({c.text}): {c.verdict}")


def _list(cfg, study) -> None:
  from hydrahead_jax.study.arms import result_path

  for a in cfg.arms:
    path = result_path(study.out_dir, a.id)
    if a.layout is None:
      layout = "all FA"
    elif a.layout.needs_scores() and not study.has_scores():
      layout = f"{a.layout.policy} {a.layout.budget} by {a.layout.score} (scores not computed yet)"
    else:
      layout = study.layout(a)[1]["describe"]
    print(f"{a.id:>4}  {a.name:<44} {a.role:<16} {layout:<44} "
          f"{'done: ' + path if os.path.isfile(path) else 'missing'}")


@cli_main(prog=PROG)
def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  cmd = "import" if argv[:1] == ["import"] else "run"
  args = build_parser(cmd).parse_args(argv[1:] if cmd == "import" else argv)
  cfg, study, report = _study(args)
  from hydrahead_jax.study import arms as arms_lib
  from hydrahead_jax.study.config import parse_arms

  if cmd == "import":
    arms_lib.import_arm(study, cfg.arm(args.arm), args.eval, args.transfer_summary, args.model, args.force)
  else:
    todo = parse_arms(args.arms, cfg)
    if not (todo or args.report or args.list) or (args.check and not todo):
      raise UserError("nothing to do: give --arms (e.g. --arms 2,4 or all; --check needs them), --report or --list")
    if args.list:
      _list(cfg, study)
    if args.check:
      for arm in todo:
        print(arms_lib.check_arm(study, arm))
      todo = []
    try:
      for arm in todo:
        arms_lib.run_arm(study, arm)
    except arms_lib.ArmInterrupted as e:
      print(f"{e}", file=sys.stderr)
      if args.report:
        _report(cfg, study, report)
      return 3
  if args.report:
    _report(cfg, study, report)
  return 0
