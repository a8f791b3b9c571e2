"""Head selection and teacher -> HydraHead conversion from the command line.

    # 1) analysis + layouts + plots
    python -m hydrahead_jax.select analyze --teacher smollm2 --lengths 1024,2048 --budget 7:1 --out runs/sel
    # 2) conversion with calibrated fusion scales -> a model directory training can start from
    python -m hydrahead_jax.select convert --teacher smollm2 --layout runs/sel/layout_global.json --out runs/student

Other subcommands: ``layout`` (re-run a policy on a saved head_scores.json), ``probes`` (write probe sets as
.npz, e.g. to score on a machine without the data stack: ``analyze --probes a.npz b.npz``).
``--teacher``: anything ``hydrahead_jax.interop.load`` reads: ``smollm2``, a ``.gguf`` file, a HF directory
(config.json + safetensors) or a HydraHead model directory.

User errors (a missing or damaged teacher, bad layout / scores / probe files, unknown policies or methods, an --out
that cannot be used, bad arguments) end with one line ``error: ...`` on stderr and exit code 2, checked before the
long steps where possible; ``--debug`` shows the traceback (``hydrahead_jax.cli``, docs/reliability.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time

import numpy as np

from hydrahead_jax.cli import ArgumentParser, UserError, cli_main
from hydrahead_jax.selection import policies
from hydrahead_jax.selection.probes import DEFAULT_TASKS, ProbeSet


def _ints(s: str) -> list[int]:
  try:
    return [int(x) for x in s.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _names(s: str) -> list[str]:
  return [x.strip() for x in s.split(",") if x.strip()]


@contextlib.contextmanager
def _user_input(what: str | None, errors: tuple[type[BaseException], ...] = ()):
  """Errors while reading or checking a user-given file or value -> one-line ``UserError``: ``what: <error>``
  (``what=None``: the error's message already names the file)."""
  try:
    yield
  except UserError:
    raise
  except (OSError, ValueError, KeyError, TypeError, *errors) as e:
    msg = str(e) if not isinstance(e, KeyError) else f"missing {e}"
    raise UserError(msg if what is None or msg.startswith(what) else f"{what}: {msg}") from e


def _check_out_dir(path: str, empty: bool = False) -> None:
  """--out names a directory to write into (``empty``: one that does not exist yet or is empty)."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"--out {path}: exists and is not a directory; choose another path")
  if empty and os.path.isdir(path) and os.listdir(path):
    raise UserError(f"--out {path}: exists and is not empty; choose a new directory (or remove this one)")


def _check_budget(budget: str) -> None:
  if not re.fullmatch(r"\s*\d+\s*", budget):
    from hydrahead_jax.config import parse_ratio

    with _user_input("--budget"):
      parse_ratio(budget)


def _check_fits(budget: str, cfg, teacher: str) -> None:
  """The budget fits the teacher's layers x groups (checked before the analysis / conversion)."""
  with _user_input(f"--budget {budget} for {teacher}"):
    policies.parse_budget(budget, cfg.num_layers, cfg.num_kv_heads)


def _check_common(args) -> None:
  """Arguments every subcommand shares, checked before anything is loaded."""
  from hydrahead_jax.interop.safetensors import to_np_dtype

  for flag in ("dtype", "compute_dtype"):
    if getattr(args, flag, None) is not None:
      try:
        to_np_dtype(getattr(args, flag))
      except ValueError:
        raise UserError(f"--{flag.replace('_', '-')}: not a dtype: {getattr(args, flag)!r}") from None
  for name in ("batch_size", "chunk", "per_task"):
    if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
      raise UserError(f"--{name.replace('_', '-')}: must be >= 1")
  if getattr(args, "lengths", None) is not None and (not args.lengths or min(args.lengths) < 1):
    raise UserError(f"--lengths: give positive prompt lengths, got {args.lengths}")
  if getattr(args, "tasks", None) is not None and not getattr(args, "probes", None):  # --probes: tasks unused
    from hydrahead_jax.data.synthetic import PROBE_TASKS

    bad = [t for t in args.tasks if t not in PROBE_TASKS]
    if bad or not args.tasks:
      raise UserError(f"--tasks: unknown probe tasks {bad}; choose from {list(PROBE_TASKS)}")
  if getattr(args, "budget", None) is not None:
    _check_budget(args.budget)
  for flag in ("probes", "heldout_probes"):
    for path in getattr(args, flag, None) or []:
      if not os.path.isfile(path):
        raise UserError(f"--{flag.replace('_', '-')} {path}: no such file")


def _probe_file(path: str) -> ProbeSet:
  import zipfile

  with _user_input(f"probe file {path}", (zipfile.BadZipFile, EOFError)):
    return ProbeSet.load(path)


def _add_teacher(p: argparse.ArgumentParser) -> None:
  p.add_argument("--teacher", required=True, help="smollm2 | file.gguf | HF dir | model dir")
  p.add_argument("--tokenizer", default=None, help="tokenizer.json overriding the teacher's")
  p.add_argument("--dtype", default="float32", help="parameter dtype")
  p.add_argument("--compute-dtype", default=None, help="activation dtype (default: --dtype)")


def _load(args):
  from hydrahead_jax.interop.load import load

  t0 = time.perf_counter()
  cfg, model, tok = load(args.teacher, dtype=args.dtype, compute_dtype=args.compute_dtype,
                         tokenizer=args.tokenizer or True, progress=True)
  if any(cfg.num_fa_groups(l) != cfg.num_kv_heads for l in range(cfg.num_layers)):
    print(f"note: {args.teacher} is a hybrid model; only its FA heads have attention weights", file=sys.stderr)
  print(f"loaded {args.teacher}: {cfg.num_layers} layers x {cfg.num_heads} heads ({cfg.num_kv_heads} KV groups) "
        f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
  return cfg, model, tok


def _probe_sets(args, tok, seed: int, per_task: int) -> list[ProbeSet]:
  from hydrahead_jax.selection.probes import make_probes

  return [make_probes(tok, L, tasks=args.tasks, per_task=per_task, seed=seed) for L in args.lengths]


def _layouts(scores, cfg, budget: str, names, seed: int, out_dir: str) -> dict:
  out = {}
  for name in names:
    layout, info = policies.make_layout(name, scores, budget, num_groups=cfg.num_kv_heads,
                                        heads_per_group=cfg.heads_per_group, seed=seed)
    policies.write_layout(os.path.join(out_dir, f"layout_{name}.json"), layout, info)
    out[name] = {**info, "fa_groups": [list(x) for x in layout.fa_groups]}
  return out


# -- subcommands -------------------------------------------------------------------------------------
def cmd_probes(args) -> None:
  from hydrahead_jax.interop.load import read_tokenizer, tokenizer_for

  _check_out_dir(args.out)
  tok = tokenizer_for(args.teacher, args.tokenizer) if args.teacher else read_tokenizer(args.tokenizer)
  os.makedirs(args.out, exist_ok=True)
  for ps in _probe_sets(args, tok, args.seed, args.per_task):
    path = os.path.join(args.out, f"probes_{ps.prompt_len}_seed{args.seed}.npz")
    ps.save(path)
    print(f"wrote {path}: {ps.num} probes, rows of {ps.length} tokens")


def cmd_analyze(args) -> None:
  from hydrahead_jax.selection import report
  from hydrahead_jax.selection.analysis import AnalysisConfig, analyze, causal_test

  _check_out_dir(args.out)
  bad = [p for p in args.policies if p not in policies.POLICIES]
  if bad or not args.policies:
    raise UserError(f"--policies: unknown {bad}; choose from {list(policies.POLICIES)}")
  with _user_input("--methods / --screen-top"):
    acfg = AnalysisConfig(min_delta=args.min_delta, batch_size=args.batch_size, chunk=args.chunk,
                          grad_batch=args.grad_batch, tokens_per_forward=args.tokens_per_forward,
                          exact_only_above=args.exact_only_above,
                          methods=tuple(args.methods), screen_top=args.screen_top, cka_tokens=args.cka_tokens,
                          seed=args.seed, progress=not args.quiet)
  if args.probes:
    sets = [_probe_file(p) for p in args.probes]
    held = [_probe_file(p) for p in args.heldout_probes] if args.heldout_probes else None
  cfg, model, tok = _load(args)
  _check_fits(args.budget, cfg, args.teacher)
  os.makedirs(args.out, exist_ok=True)
  if not args.probes:
    sets = _probe_sets(args, tok, args.seed, args.per_task)
    held = _probe_sets(args, tok, args.seed + 1, args.causal_per_task) if args.causal_test else None
  data = analyze(model, sets, acfg, name=args.teacher)
  if held:
    data["causal_test"] = [causal_test(model, ps, data["selection_score"], batch_size=args.batch_size,
                                       chunk=args.random_draws + 1, draws=args.random_draws, seed=args.seed)
                           for ps in held]
    for ps, ct in zip(held, data["causal_test"]):
      ct["length"] = ps.prompt_len
  data["layouts"] = _layouts(data["selection_score"], cfg, args.budget, args.policies, args.seed, args.out)
  data["budget"] = args.budget
  report.write_json(os.path.join(args.out, "head_scores.json"), data)
  main_layout = policies.read_layout(os.path.join(args.out, f"layout_{args.policies[0]}.json"))
  report.heatmap(os.path.join(args.out, "heatmap.png"), data["selection_score"], heads_per_group=cfg.heads_per_group,
                 layout=main_layout, title=f"{data['selection_score_name']} patching score "
                                           f"({args.policies[0]} {args.budget} picks boxed)")
  if data["cka"] is not None:
    report.cka_plot(os.path.join(args.out, "cka.png"), data["cka"])
  txt = report.text_report(data)
  with open(os.path.join(args.out, "report.txt"), "w") as f:
    f.write(txt)
  print(txt)
  print(f"wrote {args.out}/head_scores.json, heatmap.png, cka.png, report.txt, layout_*.json")


def cmd_layout(args) -> None:
  from hydrahead_jax.selection import report

  if os.path.isdir(args.out):
    raise UserError(f"--out {args.out}: is a directory; give the layout file to write (e.g. layout.json)")
  with _user_input(None):
    data = report.read_scores(args.scores)  # its errors name the file
  with _user_input(f"scores file {args.scores}"):
    if args.score and args.score not in data["scores"]:
      raise UserError(f"--score {args.score!r}: not in {args.scores}; it has {sorted(data['scores'])}")
    scores = report.grid(data, args.score) if args.score else np.asarray(
        [[np.nan if v is None else v for v in row] for row in data["selection_score"]], np.float64)
    m = data["model"]
    layout, info = policies.make_layout(args.policy, scores, args.budget, num_groups=m["num_kv_heads"],
                                        heads_per_group=m["num_heads"] // m["num_kv_heads"], seed=args.seed)
  policies.write_layout(args.out, layout, info)
  print(f"{args.out}: {info['describe']}\n  {info['rounding']}\n  {info['selection']}")


def cmd_convert(args) -> None:
  from hydrahead_jax.interop.orbax import save_pretrained
  from hydrahead_jax.transfer.convert import calibration_batches, convert_teacher

  _check_out_dir(args.out, empty=True)
  if args.layout:
    with _user_input(f"layout file {args.layout}"):
      if not os.path.isfile(args.layout):
        raise UserError(f"--layout {args.layout}: no such file")
      layout = policies.read_layout(args.layout)
  elif args.scores:
    from hydrahead_jax.selection import report

    with _user_input(None):
      data = report.read_scores(args.scores)  # its errors name the file
    with _user_input(f"scores file {args.scores}"):
      scores = np.asarray([[np.nan if v is None else v for v in row] for row in data["selection_score"]], np.float64)
  else:
    raise UserError("select convert: give --layout FILE or --scores head_scores.json (with --policy/--budget)")
  cfg, model, tok = _load(args)
  if args.layout:
    with _user_input(f"layout file {args.layout} does not fit {args.teacher}"):
      layout.validate(cfg.num_layers, cfg.num_kv_heads)
  else:
    what = f"scores file {args.scores} with --policy {args.policy} --budget {args.budget} for {args.teacher}"
    with _user_input(what):
      layout, info = policies.make_layout(args.policy, scores, args.budget, num_groups=cfg.num_kv_heads,
                                          heads_per_group=cfg.heads_per_group, seed=args.seed)
    print(f"layout: {info['describe']}; {info['rounding']}")
  kw = {"fusion": args.fusion} if args.fusion else {}
  calib = held = None
  if args.calib_num > 0:
    calib = calibration_batches(tok, num=args.calib_num, length=args.calib_length, batch_size=args.calib_batch,
                                seed=args.seed)
    if args.heldout_num > 0:
      held = calibration_batches(tok, num=args.heldout_num, length=args.calib_length, batch_size=args.calib_batch,
                                 seed=args.seed + 1)
  t0 = time.perf_counter()
  student, rep = convert_teacher(model, layout, calib, heldout=held, inputs=args.calib_inputs,
                                 iterations=args.calib_iters, free_running_check=args.free_running_check,
                                 progress=not args.quiet, **kw)
  rep["seconds"] = time.perf_counter() - t0
  rep["teacher"] = args.teacher
  tok_path = None
  if hasattr(tok, "save") and not args.tokenizer:
    tok_path = os.path.join(os.path.abspath(args.out) + ".tokenizer.json")
    tok.save(tok_path)
  path = save_pretrained(student, args.out, metadata={"conversion": _plain(rep), "tokenizer": args.tokenizer or tok_path})
  print(f"student: {rep['describe']}")
  for key in ("heldout", "heldout_free_running"):
    if key in rep:
      h = rep[key]
      print(f"held-out LA head output RMS vs teacher ({h['inputs']} layer inputs): max deviation "
            f"{h['max_head_rms_dev']:.2%}, median {h['median_head_rms_dev']:.2%}, median per channel "
            f"{h['median_channel_rms_dev']:.2%}")
  print(f"wrote {path} ({rep['seconds']:.1f}s)")


def _plain(x):
  from hydrahead_jax.selection.report import _jsonable

  return _jsonable(x)


def build_parser() -> argparse.ArgumentParser:
  ap = ArgumentParser(prog="python -m hydrahead_jax.select", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="cmd", required=True)

  def probe_args(p):
    p.add_argument("--tasks", type=_names, default=list(DEFAULT_TASKS))
    p.add_argument("--lengths", type=_ints, default=[512], help="prompt lengths in tokens, e.g. 1024,2048")
    p.add_argument("--per-task", type=int, default=4, help="probes per task and length")
    p.add_argument("--seed", type=int, default=0)

  a = sub.add_parser("analyze", help="score every head; write scores, plots, report and layouts")
  _add_teacher(a)
  probe_args(a)
  a.add_argument("--probes", nargs="*", default=None, help="precomputed probe sets (.npz) instead of generating")
  a.add_argument("--heldout-probes", nargs="*", default=None, help="precomputed held-out sets for the causal test")
  a.add_argument("--methods", type=_names, default=["exact", "attribution", "retrieval", "mean_ablation"])
  a.add_argument("--screen-top", type=int, default=None, help="exact patching only on the top-N attribution heads")
  a.add_argument("--min-delta", type=float, default=0.5)
  a.add_argument("--batch-size", type=int, default=4)
  a.add_argument("--chunk", type=int, default=8, help="patched copies per vmapped forward")
  a.add_argument("--tokens-per-forward", type=int, default=None,
                 help="instead of --chunk: patched copies so that one forward holds about this many tokens")
  a.add_argument("--exact-only-above", type=int, default=None,
                 help="probe sets longer than this: only exact patching + retrieval score")
  a.add_argument("--grad-batch", type=int, default=None, help="probes per attribution backward (memory)")
  a.add_argument("--cka-tokens", type=int, default=2048)
  a.add_argument("--causal-test", action=argparse.BooleanOptionalAction, default=True)
  a.add_argument("--causal-per-task", type=int, default=4)
  a.add_argument("--random-draws", type=int, default=5)
  a.add_argument("--budget", default="7:1", help="'LA:FA' ratio or a number of FA groups")
  a.add_argument("--policies", type=_names, default=list(policies.POLICIES))
  a.add_argument("--out", required=True)
  a.add_argument("--quiet", action="store_true")
  a.set_defaults(fn=cmd_analyze)

  lp = sub.add_parser("layout", help="a layout from a saved head_scores.json")
  lp.add_argument("--scores", required=True)
  lp.add_argument("--score", default=None, help="which score grid (default: the selection score)")
  lp.add_argument("--policy", default="global", choices=policies.POLICIES)
  lp.add_argument("--budget", default="7:1")
  lp.add_argument("--seed", type=int, default=0)
  lp.add_argument("--out", required=True)
  lp.set_defaults(fn=cmd_layout)

  c = sub.add_parser("convert", help="teacher + layout -> calibrated student checkpoint")
  _add_teacher(c)
  c.add_argument("--layout", default=None)
  c.add_argument("--scores", default=None)
  c.add_argument("--policy", default="global", choices=policies.POLICIES)
  c.add_argument("--budget", default="7:1")
  c.add_argument("--fusion", default=None, choices=["scale_norm", "rmsnorm_all", "none"])
  c.add_argument("--calib-num", type=int, default=16, help="calibration sequences (0: no calibration)")
  c.add_argument("--calib-length", type=int, default=512)
  c.add_argument("--calib-batch", type=int, default=4)
  c.add_argument("--calib-inputs", default="teacher", choices=["teacher", "student"],
                 help="student layers read the teacher's layer inputs (one pass) or their own (iterated)")
  c.add_argument("--calib-iters", type=int, default=3, help="passes with --calib-inputs student")
  c.add_argument("--heldout-num", type=int, default=8, help="held-out sequences for the RMS check")
  c.add_argument("--free-running-check", action=argparse.BooleanOptionalAction, default=True,
                 help="also report the held-out RMS match in the student's own forward")
  c.add_argument("--seed", type=int, default=0)
  c.add_argument("--out", required=True)
  c.add_argument("--quiet", action="store_true")
  c.set_defaults(fn=cmd_convert)

  pp = sub.add_parser("probes", help="write probe sets (.npz)")
  pp.add_argument("--teacher", default=None, help="take the tokenizer from this teacher")
  pp.add_argument("--tokenizer", default=None)
  probe_args(pp)
  pp.add_argument("--out", required=True)
  pp.set_defaults(fn=cmd_probes)
  return ap


@cli_main
def main(argv=None) -> int:
  """Runs a subcommand; user errors are one line on stderr and exit code 2 (``hydrahead_jax.cli``)."""
  args = build_parser().parse_args(argv)
  _check_common(args)
  args.fn(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
