"""``python -m hydrahead_jax.eval``: RULER-style retrieval tasks and perplexity-by-position for one or more
models, with the hybrid cache.

  python -m hydrahead_jax.eval --model smollm2 --tasks niah_single --lengths 1024,2048 --examples 4

Writes ``results.json``, ``accuracy_heatmap.png`` and ``perplexity_by_position.png`` to ``--out`` and prints a
table. The same ``--seed`` gives the same examples for every model (built from the tokenizer and the seed).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import time

from hydrahead_jax.cli import UserError, cli_main

PROG = "python -m hydrahead_jax.eval"


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit 2 (cli_main), instead of argparse's usage block
    raise UserError(f"{message} (see --help)")


def parse_lengths(text: str) -> list[int]:
  """'1K,2K,4096' -> [1024, 2048, 4096] (K = 1024, M = 1024**2)."""
  out = []
  for part in (p.strip() for p in text.split(",") if p.strip()):
    m = re.fullmatch(r"(\d+)\s*([kKmM]?)", part)
    if not m or int(m.group(1)) < 1:
      raise ValueError(f"--lengths: {part!r} is not a length (give e.g. 1024, 1K or 128K)")
    out.append(int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2).lower()])
  if not out:
    raise ValueError("--lengths: no length given")
  return sorted(dict.fromkeys(out))


def _split(values: list[str]) -> list[str]:
  return [x.strip() for v in values for x in v.split(",") if x.strip()]


def model_name(spec: str, taken: set[str]) -> str:
  base = os.path.basename(os.path.normpath(spec))
  base = base[:-5] if base.endswith(".gguf") else base
  name, i = base, 2
  while name in taken:
    name, i = f"{base}#{i}", i + 1
  return name


def build_parser() -> argparse.ArgumentParser:
  from hydrahead_jax.eval.evaluate import ALL_TASKS

  p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--model", action="append", required=True,
                 help="our checkpoint dir, a HF dir, a .gguf file or 'smollm2'; repeat or comma-separate to compare")
  p.add_argument("--tasks", default=",".join(ALL_TASKS), help=f"comma list of {', '.join(ALL_TASKS)}")
  p.add_argument("--lengths", default="1K,2K", help="prompt lengths in tokens, e.g. 1K,2K,4K,...,128K or 1024")
  p.add_argument("--examples", type=int, default=8, help="examples per task and length")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="runs/eval", help="output directory")
  p.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                 help="wrap prompts in the chat template (auto: when the tokenizer has one)")
  p.add_argument("--ppl-docs", type=int, default=2, help="documents for perplexity (of the longest length)")
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--chunk-size", type=int, default=1024, help="prefill chunk length")
  p.add_argument("--max-new-tokens", type=int, default=64, help="generation budget per example")
  p.add_argument("--dtype", default=None, help="parameter dtype (default: float32 for teachers, as saved otherwise)")
  p.add_argument("--compute-dtype", default=None, help="activation dtype (default: the model's)")
  return p


@cli_main(user_errors=(ValueError, FileNotFoundError), prog=PROG)
def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from hydrahead_jax.eval import corpus as corpus_lib
  from hydrahead_jax.eval.evaluate import evaluate_model
  from hydrahead_jax.eval.report import heatmap, ppl_plot, table, write_json
  from hydrahead_jax.eval.runner import RunSettings, log
  from hydrahead_jax.interop.load import load, resolve

  specs = _split(args.model)
  tasks = _split([args.tasks])
  lengths = parse_lengths(args.lengths)
  for name, v in (("--examples", args.examples), ("--ppl-docs", args.ppl_docs), ("--batch-size", args.batch_size),
                  ("--chunk-size", args.chunk_size), ("--max-new-tokens", args.max_new_tokens)):
    if v < 1:
      raise ValueError(f"{name} must be >= 1, got {v}")
  from hydrahead_jax.eval.evaluate import ALL_TASKS

  bad = [t for t in tasks if t not in ALL_TASKS]
  if bad or not tasks:
    raise ValueError(f"--tasks: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(ALL_TASKS)}")
  for spec in specs:
    resolve(spec)  # fail fast on a bad path, before loading anything
  os.makedirs(args.out, exist_ok=True)
  settings = RunSettings(batch_size=args.batch_size, chunk_size=args.chunk_size, max_new_tokens=args.max_new_tokens)
  results = {"config": {"models": specs, "tasks": tasks, "lengths": lengths, "examples": args.examples,
                        "seed": args.seed, "chat": args.chat, "ppl_docs": args.ppl_docs,
                        "batch_size": args.batch_size, "chunk_size": args.chunk_size,
                        "max_new_tokens": args.max_new_tokens, "corpus": corpus_lib.fingerprint(),
                        "python": platform.python_version()},
             "models": {}}
  t0 = time.perf_counter()
  for spec in specs:
    name = model_name(spec, set(results["models"]))
    t_load = time.perf_counter()
    cfg, model, tok = load(spec, dtype=args.dtype, compute_dtype=args.compute_dtype)
    log(f"[{name}] loaded {spec}: {cfg.layout.describe(cfg.num_kv_heads)}, {model.num_params():,} params "
        f"({time.perf_counter() - t_load:.1f}s)")
    res = evaluate_model(model, tok, tasks=tasks, lengths=lengths, examples=args.examples, seed=args.seed,
                         chat=args.chat, ppl_docs=args.ppl_docs, settings=settings, name=name)
    results["models"][name] = {"spec": spec, "layout": cfg.layout.describe(cfg.num_kv_heads),
                               "params": model.num_params(), **res}
    write_json(results, args.out)  # after every model: partial results survive
    del model
  results["seconds"] = round(time.perf_counter() - t0, 2)
  paths = [write_json(results, args.out), heatmap(results, args.out), ppl_plot(results, args.out)]
  print(table(results))
  print(f"wrote {', '.join(p for p in paths if p)} ({results['seconds']:.0f}s)")
  return 0
