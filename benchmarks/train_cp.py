"""One training step under context parallelism: the 7:1 head-level hybrid beside all-FA, at long lengths.

Qwen3-0.6B shape (28 layers, d 1024, 16 q heads / 8 KV groups, head_dim 128, SwiGLU 3072, vocab 151,936 tied; the
shapes of ``benchmarks/train_step.py``), bf16 compute, f32 params, AdamW, full remat, B=1: one sequence of T tokens
split over a ``context`` mesh axis of CP devices (hydrahead_jax/parallel/context.py). The step is the project's own
(``train.step.make_train_step``, fwd + bwd + AdamW) with its chunked cross entropy run on each device's own tokens
(``parallel.context.per_token_shards``). Per cell (T, layout, CP), in a fresh process (an OOM or a crash is that
cell's result; peak memory is per cell): the step compiled ahead (compile_s), ``--warmup`` steps run untimed, then
the median of ``--steps`` timed steps, tokens/s, MFU over CP devices, peak memory of every device (max reported),
the first step's time, loss.

  python benchmarks/train_cp.py --out $OUT [--lengths 131072 262144 524288] [--cp 4] [--layouts 7:1 all-FA]
  python benchmarks/train_cp.py --smoke          # tiny shapes on CPU with 4 fake devices (CP 1 and 4: equal loss)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LAYOUTS = ("7:1", "all-FA", "3:1", "all-LA")


def run_cell(T: int, layout: str, cp: int, steps: int, smoke: bool, loss_chunk: int, peak_tflops: float,
             overrides: dict, warmup: int = 1) -> dict:
  """One (T, layout, CP) cell in this process."""
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from benchmarks.train_step import flops_per_step, model_config
  from hydrahead_jax.nn.model import create_model
  from hydrahead_jax.train import optim, step as step_lib
  from hydrahead_jax.train.config_lib import OptimConfig
  from hydrahead_jax.train.state import flatten_state, leaf_names

  devices = jax.devices()[:cp]
  if len(devices) < cp:
    raise ValueError(f"--cp {cp}: only {len(jax.devices())} devices")
  cfg = model_config(smoke, layout, **overrides)
  mesh = jax.make_mesh((cp,), ("context",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
  # The step's chunked CE already runs on each device's own tokens (train.step.token_outputs: per_token_shards).
  with jax.set_mesh(mesh):
    model = create_model(cfg, seed=0, mesh=mesh)
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    params = flatten_state(params_state)
    num_params = sum(int(np.prod(v.shape)) for v in params.values())
    ocfg = OptimConfig(lr=1e-4, warmup_steps=1)
    tx, sched = optim.make_optimizer(ocfg, optim.plan_params(ocfg, leaf_names(cfg, params)), 1000)
    state = {"params": params, "opt_state": jax.jit(tx.init)(params), "step": jnp.zeros((), jnp.int32)}
    kw = {} if loss_chunk is None else {"loss_chunk": loss_chunk}
    step = jax.jit(step_lib.make_train_step(graphdef, rest, tx, sched, grad_accum=1, **kw), donate_argnums=0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (1, T + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.zeros((1, T), np.int32),
             "positions": np.arange(T, dtype=np.int32)[None], "loss_mask": np.ones((1, T), np.float32),
             "answer_mask": np.zeros((1, T), np.float32)}
    batch = jax.device_put(batch, NamedSharding(mesh, P(None, "context")))
    t0 = time.perf_counter()
    step = step.lower(state, batch).compile()  # compiled ahead: no step pays the compile
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(warmup + steps):  # the first `warmup` steps are run, not timed
      t0 = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    first_s, times = times[0], times[warmup:]
  sec = float(np.median(times))
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
  peaks = [p for p in peaks if p is not None]
  return {"T": T, "layout": layout, "cp": cp, "step_s": sec, "tokens_per_s": T / sec,
          "mfu": flops_per_step(cfg, num_params, T) / sec / (cp * peak_tflops * 1e12),
          "peak_gib_max": max(peaks) / 2**30 if peaks else None,
          "peak_gib_per_device": [round(p / 2**30, 2) for p in peaks] or None,
          "steps": len(times), "warmup": warmup, "compile_s": compile_s, "first_step_s": first_s,
          "loss": float(m["loss"]), "params": num_params,
          "device": devices[0].device_kind}


def cell_subprocess(args, T: int, layout: str, cp: int) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--cell", str(T), layout, str(cp), "--steps", str(args.steps),
         "--warmup", str(args.warmup), "--peak-tflops", str(args.peak_tflops)] + (["--smoke"] if args.smoke else [])
  cmd += [] if args.loss_chunk is None else ["--loss-chunk", str(args.loss_chunk)]
  for item in args.overrides:
    cmd += ["--set", item]
  env = dict(os.environ)
  if args.smoke:  # fake CPU devices, before JAX starts in the child
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={max(args.cp)}").strip()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cell_timeout, env=env)
  except subprocess.TimeoutExpired:
    return {"T": T, "layout": layout, "cp": cp, "error": f"timeout after {args.cell_timeout} s"}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  oom = any("RESOURCE_EXHAUSTED" in s or "out of memory" in s.lower() for s in (proc.stderr or "").splitlines())
  return {"T": T, "layout": layout, "cp": cp, "error": ("OOM: " if oom else "") + " | ".join(tail)[-600:],
          "returncode": proc.returncode}


def parse_overrides(items) -> dict:
  out = {}
  for item in items:
    k, _, v = item.partition("=")
    try:
      out[k] = json.loads(v)
    except json.JSONDecodeError:
      out[k] = v
  return out


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=".")
  ap.add_argument("--lengths", type=int, nargs="*", default=[131072, 262144, 524288])
  ap.add_argument("--layouts", nargs="*", default=["7:1", "all-FA"], choices=LAYOUTS)
  ap.add_argument("--cp", type=int, nargs="*", default=None, help="context-parallel sizes (default: all devices)")
  ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
  ap.add_argument("--warmup", type=int, default=1, help="steps run before the timed ones (compiled ahead anyway)")
  ap.add_argument("--loss-chunk", type=int, default=None, help="chunked CE positions per chunk (default: step's)")
  ap.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 matmul ceiling per device")
  ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                  help="ModelConfig override (JSON value, else str)")
  ap.add_argument("--cell-timeout", type=float, default=900.0)
  ap.add_argument("--tag", default="")
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--cell", nargs=3, metavar=("T", "LAYOUT", "CP"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.cell:
    T, layout, cp = int(args.cell[0]), args.cell[1], int(args.cell[2])
    try:
      res = run_cell(T, layout, cp, args.steps, args.smoke, args.loss_chunk, args.peak_tflops,
                     parse_overrides(args.overrides), warmup=args.warmup)
    except Exception as e:  # noqa: BLE001 - an OOM is a result
      msg = f"{type(e).__name__}: {str(e)[:400]}"
      res = {"T": T, "layout": layout, "cp": cp, "error": ("OOM: " if "RESOURCE_EXHAUSTED" in msg else "") + msg}
    print(json.dumps(res), flush=True)
    return
  if args.steps < 1 or args.warmup < 0:
    ap.error("--steps must be >= 1 and --warmup >= 0")
  if args.smoke:
    args.lengths, args.steps, args.cp = [256], 2, args.cp or [1, 4]
  if args.cp is None:
    import jax
    args.cp = [jax.device_count()]
  rows = []
  for T in args.lengths:
    for layout in args.layouts:
      for cp in args.cp:
        res = cell_subprocess(args, T, layout, cp)
        rows.append(res)
        print(json.dumps(res), flush=True)
  out = {"overrides": parse_overrides(args.overrides), "peak_tflops": args.peak_tflops, "rows": rows}
  if args.smoke:  # every CP size computes the same step: equal losses per (T, layout)
    for T in args.lengths:
      for layout in args.layouts:
        losses = [r["loss"] for r in rows if r["T"] == T and r["layout"] == layout and "loss" in r]
        if len(losses) != len(args.cp) or max(losses) - min(losses) > 2e-2:
          raise SystemExit(f"smoke: T={T} {layout}: losses over CP {args.cp}: {losses}")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"train_cp{args.tag}.json")
  with open(path, "w") as fh:
    json.dump(out, fh, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
