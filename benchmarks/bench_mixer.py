"""Whole-mixer timing: a 7:1 head-level layer (2 FA + 14 LA heads) vs an all-FA layer, side by side.

Qwen3-1.7B attention shape: d_model 2048, 16 query heads, 8 KV groups, head_dim 128, bf16, B=1.
Forward and forward+backward (grads of all mixer params and the input) medians in ms, and the forward
at 512K. Run on a GPU machine:

  python benchmarks/bench_mixer.py --out $OUT [--gdn-impl pallas|chunked] [--lengths 32768 131072]
  python benchmarks/bench_mixer.py --smoke          # tiny shapes on CPU, checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from hydrahead_jax.config import HeadLayout, ModelConfig  # noqa: E402
from hydrahead_jax.nn.layers import rope_angles  # noqa: E402
from hydrahead_jax.nn.mixer import HydraHeadMixer  # noqa: E402
from pallas_kernels.gated_delta_rule.bench import median_ms  # noqa: E402


def mixer_config(smoke: bool, gdn_impl: str | None = None) -> ModelConfig:
  """One mixer layer: Qwen3-1.7B attention shape, or tiny shapes for a CPU smoke run."""
  if smoke:
    dims = dict(d_model=64, num_heads=4, num_kv_heads=2, head_dim=16)
  else:
    dims = dict(d_model=2048, num_heads=16, num_kv_heads=8, head_dim=128)
  return ModelConfig(vocab_size=128, num_layers=1, mlp_dim=128, dtype="bfloat16", param_dtype="bfloat16",
                     la_implementation=gdn_impl, **dims)


def build(base: ModelConfig, num_fa_groups: int):
  """(params, jitted forward, jitted grads of all params and the input) of a layer with num_fa_groups FA groups."""
  cfg = base.replace(layout=HeadLayout((tuple(range(num_fa_groups)),)))
  mixer = HydraHeadMixer(cfg, num_fa_groups, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(mixer)

  def fwd(params, x_BxTxD):
    T = x_BxTxD.shape[1]
    cos_sin = rope_angles(jnp.arange(T, dtype=jnp.int32)[None], cfg.head_dim, cfg.rope_theta)
    return nnx.merge(graphdef, params)(x_BxTxD, cos_sin, None)[0]

  def loss(params, x):
    return jnp.mean(fwd(params, x).astype(jnp.float32) ** 2)

  return params, jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1)))


def add_kernel_flags(ap: argparse.ArgumentParser) -> None:
  """--fusion-kernel / --conv-kernel: the mixer's optional Pallas kernels (auto = the model's default)."""
  for flag, what in (("fusion", "fusion of head outputs (ModelConfig.fusion_implementation)"),
                     ("conv", "short conv + SiLU + L2 norm (ModelConfig.conv_implementation)")):
    ap.add_argument(f"--{flag}-kernel", default="auto", choices=["auto", "on", "off"], help=f"Pallas kernel for {what}")


def apply_kernel_flags(args, cfg: ModelConfig) -> ModelConfig:
  """``cfg`` with the kernel choices of --fusion-kernel / --conv-kernel."""
  choice = {"auto": None, "on": "pallas", "off": "xla"}
  return cfg.replace(fusion_implementation=choice[args.fusion_kernel], conv_implementation=choice[args.conv_kernel])


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=".")
  ap.add_argument("--gdn-impl", default=None)
  ap.add_argument("--lengths", type=int, nargs="*", default=[32768, 131072])
  ap.add_argument("--fwd-only-lengths", type=int, nargs="*", default=[524288])
  ap.add_argument("--smoke", action="store_true")
  add_kernel_flags(ap)
  args = ap.parse_args()
  if args.smoke:
    args.lengths, args.fwd_only_lengths = [128], [256]
  base = apply_kernel_flags(args, mixer_config(args.smoke, args.gdn_impl))
  G = base.num_kv_heads
  layouts = {"7:1 (1 FA group)": 1, "all-FA": G}
  results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "gdn_impl": args.gdn_impl,
             "fusion_kernel": args.fusion_kernel, "conv_kernel": args.conv_kernel, "rows": []}
  for T in args.lengths + args.fwd_only_lengths:
    x = jax.random.normal(jax.random.key(0), (1, T, base.d_model), jnp.bfloat16)
    row = {"T": T}
    for name, n_fa in layouts.items():
      params, fwd, grad = build(base, n_fa)
      try:
        row[f"{name} fwd"] = median_ms(fwd, params, x, reps=7)
        if T in args.lengths:
          row[f"{name} fwd+bwd"] = median_ms(grad, params, x, reps=7)
      except Exception as e:  # noqa: BLE001 - report OOM etc. as a cell, keep the other rows
        row[f"{name} error"] = f"{type(e).__name__}: {str(e)[:200]}"
      del params, fwd, grad
    for kind in ("fwd", "fwd+bwd"):
      a, b = row.get(f"all-FA {kind}"), row.get(f"7:1 (1 FA group) {kind}")
      if a and b:
        row[f"speedup {kind}"] = a / b
    print(json.dumps(row), flush=True)
    results["rows"].append(row)
  name = f"bench_mixer_fusion-{args.fusion_kernel}_conv-{args.conv_kernel}.json"
  with open(os.path.join(args.out, name), "w") as fh:
    json.dump(results, fh, indent=1)


if __name__ == "__main__":
  main()
