"""Where the time of one mixer step goes: GPU kernel time per kernel, grouped, from a JAX profiler trace.

Traces ``--steps`` forward+backward steps of a mixer layer (the shapes of bench_mixer.py) and sums the device
kernel durations of the perfetto trace by kernel name and by group (matmul, cuDNN attention, Pallas GDN
kernels, Pallas fusion kernel, other XLA fusions), per step. Run on a GPU machine:

  python benchmarks/profile_mixer.py --T 131072 --layout 7:1 --out $OUT
  python benchmarks/profile_mixer.py --smoke      # CPU, tiny shapes: checks the script runs
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.bench_mixer import add_kernel_flags, apply_kernel_flags, build, mixer_config  # noqa: E402

GROUPS = (  # first match wins
    ("cudnn attention", re.compile(r"cudnn|flash|fmha|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|cublas|matmul|sm90_xmma|cutlass|nvjet|dot", re.I)),
    ("pallas gdn", re.compile(r"wy_fwd|wy_bwd|state_fwd|state_bwd|dqk|readout|gdn", re.I)),
    ("pallas fusion", re.compile(r"fusion_norm|head_fusion", re.I)),
    ("pallas short conv", re.compile(r"short_conv", re.I)),
    ("xla fusion / copy", re.compile(r".")),
)


def group_of(name: str) -> str:
  return next(g for g, pat in GROUPS if pat.search(name))


def device_lanes(trace: dict) -> dict[str, list[dict]]:
  """Complete events of the device (GPU) timelines of a perfetto trace, by lane: 'kernels' (the CUDA stream
  lanes: one event per kernel) and 'ops' (the XLA Ops lane: one event per HLO op)."""
  proc, thread = {}, {}
  for ev in trace.get("traceEvents", []):
    if ev.get("ph") == "M" and ev.get("name") == "process_name":
      proc[ev["pid"]] = ev.get("args", {}).get("name", "")
    if ev.get("ph") == "M" and ev.get("name") == "thread_name":
      thread[(ev["pid"], ev.get("tid"))] = ev.get("args", {}).get("name", "")
  dev = {pid for pid, n in proc.items() if re.search(r"/device:(GPU|TPU)", n)}
  lanes = {"kernels": [], "ops": []}
  for ev in trace.get("traceEvents", []):
    if ev.get("ph") != "X" or ev.get("pid") not in dev:
      continue
    tname = thread.get((ev["pid"], ev.get("tid")), "")
    if tname.startswith("Stream"):
      lanes["kernels"].append(ev)
    elif "XLA Ops" in tname:
      lanes["ops"].append(ev)
  return lanes


def summarize(lanes: dict[str, list[dict]], steps: int) -> dict:
  by_name, by_group, by_op = collections.Counter(), collections.Counter(), collections.Counter()
  for ev in lanes["kernels"]:
    ms = ev.get("dur", 0) / 1e3 / steps
    by_name[ev["name"]] += ms
    by_group[group_of(ev["name"])] += ms
  for ev in lanes["ops"]:
    by_op[ev["name"]] += ev.get("dur", 0) / 1e3 / steps
  return {
      "kernel_total_ms": sum(by_group.values()),
      "groups_ms": {k: round(v, 3) for k, v in by_group.most_common()},
      "top_kernels_ms": [(n, round(t, 3), group_of(n)) for n, t in by_name.most_common(40)],
      "top_ops_ms": [(n, round(t, 3)) for n, t in by_op.most_common(40)],
  }


def profile(fn, args, steps: int) -> dict:
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  logdir = tempfile.mkdtemp()
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    for _ in range(steps):
      jax.block_until_ready(fn(*args))
  files = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)
  files += glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not files:
    raise RuntimeError(f"no trace file under {logdir}")
  with gzip.open(files[0]) as fh:
    trace = json.load(fh)
  return summarize(device_lanes(trace), steps)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--T", type=int, default=131072)
  ap.add_argument("--layout", default="7:1", choices=["7:1", "all-FA", "all-LA"])
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--fwd-only", action="store_true")
  ap.add_argument("--out", default=".")
  ap.add_argument("--tag", default="")
  ap.add_argument("--hlo", action="store_true", help="also write the optimized HLO of the profiled step")
  ap.add_argument("--smoke", action="store_true")
  add_kernel_flags(ap)
  args = ap.parse_args()
  base = apply_kernel_flags(args, mixer_config(args.smoke))
  n_fa = {"7:1": 1, "all-FA": base.num_kv_heads, "all-LA": 0}[args.layout]
  params, fwd, grad = build(base, n_fa)
  T = 128 if args.smoke else args.T
  x = jax.random.normal(jax.random.key(0), (1, T, base.d_model), jnp.bfloat16)
  fn = fwd if args.fwd_only else grad
  res = profile(fn, (params, x), args.steps)
  if args.hlo:
    with open(os.path.join(args.out, f"hlo_{args.layout.replace(':', '-')}_{T}{args.tag}.txt"), "w") as fh:
      fh.write(fn.lower(params, x).compile().as_text())
  res.update(T=T, layout=args.layout, fwd_only=args.fwd_only, device=jax.devices()[0].device_kind, tag=args.tag, fusion_kernel=args.fusion_kernel,
             conv_kernel=args.conv_kernel)
  print(json.dumps({k: v for k, v in res.items() if not k.startswith("top_")}), flush=True)
  for row in res["top_kernels_ms"][:30]:
    print(f"  {row[1]:9.3f} ms  {row[2]:18s} {row[0][:110]}")
  print("  XLA ops lane:")
  for name, ms in res["top_ops_ms"][:30]:
    print(f"  {ms:9.3f} ms  {name[:120]}")
  name = f"profile_{args.layout.replace(':', '-')}_{T}{'_fwd' if args.fwd_only else ''}{args.tag}.json"
  with open(os.path.join(args.out, name), "w") as fh:
    json.dump(res, fh, indent=1)


if __name__ == "__main__":
  main()
