"""Peak memory and step time of one training step: full-logits loss vs the chunked loss (hydrahead_jax.losses).

Qwen3-0.6B shape (28 layers, d 1024, 16 q heads / 8 KV groups, head_dim 128, SwiGLU 3072, vocab 151,936 tied),
bf16 compute, f32 params, AdamW, B=1, remat 'full' (``--remat`` for another ModelConfig.remat policy); the
project's own train step (``train.step.make_train_step``, forward + backward + AdamW) with ``loss_chunk=0``
(plain: [1, T, V] float32 logits) or ``--loss-chunk`` positions per chunk. Every cell (length x layout x loss)
runs in its own process, so the device's peak-memory counter is the cell's own and an OOM (or a crash, or
``--cell-timeout``) is recorded as that cell's result while the others go on. The JSON is rewritten after each
cell (a run cut short keeps what finished).

Per cell: peak device memory (``memory_stats()['peak_bytes_in_use']``), the state's bytes before the step, XLA's
compiled temp / argument / output bytes, compile time, median step time over ``--steps`` steps after one warm-up
step, tokens/s and the loss (plain and chunked agree to bf16 rounding: the chunked loss keeps float32 logits).

  python benchmarks/train_memory.py --out $OUT --lengths 32768 65536 [--layouts 7:1 all-FA] [--losses plain chunked]
  python benchmarks/train_memory.py --smoke          # tiny shapes on CPU, checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LAYOUTS = ("7:1", "all-FA")
LOSSES = ("plain", "chunked")


def run_cell(T: int, layout: str, loss: str, loss_chunk: int, remat: str, steps: int, smoke: bool) -> dict:
  """One cell in this process: compile, warm up, time ``steps`` steps, read the peak."""
  import jax
  import numpy as np

  from benchmarks.train_step import build, model_config

  cfg = model_config(smoke, layout).replace(remat=remat)
  chunk = loss_chunk if loss == "chunked" else 0
  state, step, batch, num_params = build(cfg, T, loss_chunk=chunk)
  dev = jax.devices()[0]
  state_bytes = (dev.memory_stats() or {}).get("bytes_in_use")
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  times = []
  for _ in range(steps + 1):  # the first call is a warm-up
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  sec = float(np.median(times[1:]))
  peak = (dev.memory_stats() or {}).get("peak_bytes_in_use")
  gib = lambda b: None if b is None else b / 2**30  # noqa: E731
  return {
      "peak_gib": gib(peak), "state_gib": gib(state_bytes),
      "temp_gib": gib(getattr(mem, "temp_size_in_bytes", None)),
      "argument_gib": gib(getattr(mem, "argument_size_in_bytes", None)),
      "output_gib": gib(getattr(mem, "output_size_in_bytes", None)),
      "compile_s": compile_s, "step_s": sec, "tokens_per_s": T / sec, "loss": float(m["loss"]),
      "ok": int(m["ok"]), "params": num_params, "loss_chunk": chunk, "remat": remat, "device": dev.device_kind,
  }


def _error(proc_out: str, rc: int | None) -> dict:
  text = proc_out[-4000:]
  oom = any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))
  last = [line for line in text.splitlines() if line.strip()][-3:]
  return {"error": "OOM" if oom else f"exit {rc}", "detail": " | ".join(last)[-600:]}


def spawn_cell(args, T: int, layout: str, loss: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--cell", str(T), layout, loss, "--loss-chunk",
         str(args.loss_chunk), "--remat", args.remat, "--steps", str(args.steps)] + (["--smoke"] if args.smoke else [])
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cell_timeout, cwd=ROOT)
  except subprocess.TimeoutExpired as e:
    return {"error": f"timeout after {args.cell_timeout} s",
            "detail": ((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))[-600:]}
  for line in reversed(p.stdout.splitlines()):
    if line.startswith("CELL "):
      return json.loads(line[5:])
  return _error(p.stdout + p.stderr, p.returncode)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default=".")
  ap.add_argument("--lengths", type=int, nargs="*", default=[32768, 65536])
  ap.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=("7:1", "all-FA", "3:1", "all-LA"))
  ap.add_argument("--losses", nargs="*", default=list(LOSSES), choices=LOSSES)
  ap.add_argument("--loss-chunk", type=int, default=2048, help="positions per chunk of the chunked loss")
  ap.add_argument("--remat", default="full", help="ModelConfig.remat policy")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--cell-timeout", type=int, default=900, help="seconds per cell (compile included)")
  ap.add_argument("--tag", default="")
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--cell", nargs=3, metavar=("T", "LAYOUT", "LOSS"), help=argparse.SUPPRESS)
  args = ap.parse_args()

  if args.cell:
    T, layout, loss = int(args.cell[0]), args.cell[1], args.cell[2]
    print("CELL " + json.dumps(run_cell(T, layout, loss, args.loss_chunk, args.remat, args.steps, args.smoke)),
          flush=True)
    return

  if args.smoke:
    args.lengths, args.steps, args.loss_chunk = [48], 1, 16
  path = os.path.join(args.out, f"train_memory{args.tag}.json")
  os.makedirs(args.out, exist_ok=True)
  res = {"shape": "smoke" if args.smoke else "Qwen3-0.6B (28 x d1024, 16q/8kv x 128, SwiGLU 3072, V 151936 tied)",
         "batch": 1, "remat": args.remat, "loss_chunk": args.loss_chunk, "steps": args.steps, "cells": []}
  for T in args.lengths:
    for layout in args.layouts:
      for loss in args.losses:
        t0 = time.perf_counter()
        cell = {"T": T, "layout": layout, "path": loss, **spawn_cell(args, T, layout, loss),
                "wall_s": time.perf_counter() - t0}
        res["cells"].append(cell)
        print(json.dumps(cell), flush=True)
        with open(path, "w") as fh:
          json.dump(res, fh, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
