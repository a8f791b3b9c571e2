"""Whole-model training step, side by side: all-FA vs 7:1 head-level vs 3:1 layer-wise vs all-LA.

Qwen3-0.6B shape (28 layers, d 1024, 16 q heads / 8 KV groups, head_dim 128, SwiGLU 3072, vocab 151,936, tied),
bf16 compute, f32 params, AdamW, full remat, B=1; the project's own train step (``train.step.make_train_step``:
the loss path train.py uses). Per cell: median step time of ``--steps`` steps after warm-up, tokens/s, model FLOP
utilisation (6 N T + causal FA attention FLOPs, over ``--peak-tflops``), device memory of the compiled step
(arguments + XLA's temporary buffer + outputs not aliased to donated inputs: per cell, unlike the process-wide
runtime peak, which is also reported), parameters.

  python benchmarks/train_step.py --out $OUT [--lengths 8192 32768 65536] [--layouts all-FA 7:1 3:1 all-LA]
  python benchmarks/train_step.py --out $OUT --profile 7:1@8192 7:1@32768   # + device kernel time per group
  python benchmarks/train_step.py --smoke          # tiny shapes on CPU, checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from hydrahead_jax import HeadLayout, ModelConfig, create_model  # noqa: E402
from hydrahead_jax.train import optim  # noqa: E402
from hydrahead_jax.train.config_lib import OptimConfig  # noqa: E402
from hydrahead_jax.train.state import flatten_state, leaf_names  # noqa: E402
from hydrahead_jax.train.step import make_train_step  # noqa: E402

LAYOUTS = ("all-FA", "7:1", "3:1", "all-LA")


def model_config(smoke: bool, layout: str, **overrides) -> ModelConfig:
  if smoke:
    dims = dict(vocab_size=512, d_model=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128)
  else:
    dims = dict(vocab_size=151_936, d_model=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                mlp_dim=3072)
    overrides.setdefault("rope_theta", 1_000_000.0)
  L, G = dims["num_layers"], dims["num_kv_heads"]
  lay = {"all-FA": HeadLayout.all_fa(L, G), "7:1": HeadLayout.per_layer(L, [0]),
         "3:1": HeadLayout.layerwise(L, G, every=4), "all-LA": HeadLayout.all_la(L)}[layout]
  return ModelConfig(**{**dims, "layout": lay, "tie_embeddings": True, "dtype": "bfloat16",
                        "param_dtype": "float32", "remat": "full", **overrides})


def flops_per_step(cfg: ModelConfig, num_params: int, T: int) -> float:
  """6 N T (every parameter in a matmul once per token, forward + backward) + causal softmax attention of the
  FA heads (QK^T and PV, half the T x T square, x3 for forward + backward). LA work is not counted."""
  fa_heads = sum(cfg.num_fa_heads(i) for i in range(cfg.num_layers))
  return 6.0 * num_params * T + 6.0 * T * T * fa_heads * cfg.head_dim


def build(cfg: ModelConfig, T: int, **step_kw):
  model = create_model(cfg, seed=0)
  graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
  params = flatten_state(params_state)
  num_params = sum(int(np.prod(v.shape)) for v in params.values())
  ocfg = OptimConfig(lr=1e-4, warmup_steps=1)
  tx, sched = optim.make_optimizer(ocfg, optim.plan_params(ocfg, leaf_names(cfg, params)), 1000)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  step = jax.jit(make_train_step(graphdef, rest, tx, sched, grad_accum=1, **step_kw), donate_argnums=0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (1, T + 1)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.zeros((1, T), np.int32),
           "positions": np.arange(T, dtype=np.int32)[None], "loss_mask": np.ones((1, T), np.float32),
           "answer_mask": np.zeros((1, T), np.float32)}
  return state, step, jax.device_put(batch), num_params


def peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def compiled_gib(compiled) -> float | None:
  """Device memory the compiled step needs: arguments + temporaries + outputs that do not reuse a donated input."""
  try:
    ma = compiled.memory_analysis()
    total = (ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes
             - ma.alias_size_in_bytes)
  except Exception:  # noqa: BLE001 - a backend without memory analysis: report None
    return None
  return total / 2**30


def run_cell(cfg: ModelConfig, T: int, steps: int, peak_tflops: float, **step_kw) -> dict:
  state, step, batch, num_params = build(cfg, T, **step_kw)
  t0 = time.perf_counter()
  step = step.lower(state, batch).compile()
  state, m = step(state, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(steps + 1):
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  sec = float(np.median(times[1:]))
  flops = flops_per_step(cfg, num_params, T)
  peak = peak_bytes()
  return {"step_s": sec, "tokens_per_s": T / sec, "mfu": flops / sec / (peak_tflops * 1e12), "params": num_params,
          "compiled_gib": compiled_gib(step), "process_peak_gib": None if peak is None else peak / 2**30,
          "first_step_s": compile_s, "loss": float(m["loss"])}


def profile_cell(cfg: ModelConfig, T: int, steps: int) -> dict:
  """Device kernel time per group and per kernel of whole training steps (``profile_mixer``'s trace reader)."""
  from benchmarks.profile_mixer import profile

  state, step, batch, _ = build(cfg, T)
  held = [state]

  def one_step():
    held[0], m = step(held[0], batch)
    return m

  res = profile(one_step, (), steps)
  res.update(T=T, step_ms_from_kernels=res["kernel_total_ms"])
  return res


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=".")
  ap.add_argument("--lengths", type=int, nargs="*", default=[8192, 32768, 65536])
  ap.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=LAYOUTS)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 matmul ceiling measured on the device")
  ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                  help="ModelConfig override, e.g. --set la_kv_sharing=group (values parsed as JSON, else str)")
  ap.add_argument("--tag", default="")
  ap.add_argument("--profile", nargs="*", default=[], metavar="LAYOUT@T",
                  help="also trace these cells (e.g. 7:1@8192) and sum device kernel time per group")
  ap.add_argument("--smoke", action="store_true")
  args = ap.parse_args()
  if args.smoke:
    args.lengths, args.steps = [64], 2
  cells = []
  for item in args.profile:
    layout, _, t = item.partition("@")
    if layout not in LAYOUTS or not t.isdigit():
      ap.error(f"--profile: {item!r} is not LAYOUT@T with LAYOUT in {', '.join(LAYOUTS)} (e.g. 7:1@8192)")
    cells.append((layout, int(t)))
  overrides = {}
  for item in args.overrides:
    k, _, v = item.partition("=")
    try:
      overrides[k] = json.loads(v)
    except json.JSONDecodeError:
      overrides[k] = v
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "overrides": overrides,
         "peak_tflops": args.peak_tflops, "rows": []}
  for T in args.lengths:
    row = {"T": T}
    for layout in args.layouts:
      cfg = model_config(args.smoke, layout, **overrides)
      try:
        row[layout] = run_cell(cfg, T, args.steps, args.peak_tflops)
      except Exception as e:  # noqa: BLE001 - an OOM is a result: report it as the cell, keep the others
        row[layout] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
      jax.clear_caches()
      print(json.dumps({"T": T, "layout": layout, **row[layout]}), flush=True)
    fa, hy = row.get("all-FA", {}), row.get("7:1", {})
    if "tokens_per_s" in fa and "tokens_per_s" in hy:
      row["7:1 / all-FA"] = hy["tokens_per_s"] / fa["tokens_per_s"]
    res["rows"].append(row)
  res["profiles"] = []
  for layout, T in cells:
    try:
      prof = profile_cell(model_config(args.smoke, layout, **overrides), T, max(2, args.steps // 2))
    except Exception as e:  # noqa: BLE001 - no profiler on this backend: say so, keep the table
      prof = {"T": T, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    prof["layout"] = layout
    jax.clear_caches()
    print(json.dumps({k: v for k, v in prof.items() if not k.startswith("top_")}), flush=True)
    res["profiles"].append(prof)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"train_step{args.tag}.json"), "w") as fh:
    json.dump(res, fh, indent=1)
  print(f"wrote {os.path.join(args.out, f'train_step{args.tag}.json')}")


if __name__ == "__main__":
  main()
