"""Short convolution (SiLU(causal depthwise conv) + per-head L2 norm): the Pallas kernel vs the XLA reference.

  check   kernel vs the float32 reference on this device: forward and both gradients, ragged T, segment resets
          (with resets inside the first block, so the halo of the first block is exercised), bf16 inputs.
  bench   B=1, T in {32K, 128K}, C = 14 heads x 128, W=4, bf16: forward and forward+backward medians (ms),
          kernel vs the reference under jit (what XLA fuses on its own), with and without the norm.
  sweep   kernel tilings at 128K.

  python benchmarks/bench_short_conv.py check bench --out $OUT
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

from pallas_kernels.gated_delta_rule.bench import median_ms, rel_rmse  # noqa: E402
from pallas_kernels.short_conv import short_conv, short_conv_reference  # noqa: E402


def _inputs(key, B, T, C, W, dtype, resets: float = 0.0):
  ks = jax.random.split(key, 4)
  x = jax.random.normal(ks[0], (B, T, C), jnp.float32).astype(dtype)
  w = (0.5 * jax.random.normal(ks[1], (W, C), jnp.float32)).astype(dtype)
  dy = jax.random.normal(ks[2], (B, T, C), jnp.float32).astype(dtype)
  seg = None
  if resets:
    starts = (jax.random.uniform(ks[3], (B, T)) < resets).at[:, 1].set(True)
    seg = jnp.cumsum(starts, axis=1).astype(jnp.int32)
  return x, w, dy, seg


def fwd_and_grad(fn, head_dim):
  def f(x, w, seg):
    return fn(x, w, seg, head_dim=head_dim)

  def loss(x, w, seg, dy):
    return jnp.sum(f(x, w, seg).astype(jnp.float32) * dy.astype(jnp.float32))

  return jax.jit(f), jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def part_check(res: dict) -> None:
  for dtype in (jnp.float32, jnp.bfloat16):
    for head_dim in (128, None):
      x, w, dy, seg = _inputs(jax.random.key(1), 2, 1000, 4 * 128, 4, dtype, resets=0.01)
      kf, kg = fwd_and_grad(short_conv, head_dim)
      rf, rg = fwd_and_grad(short_conv_reference, head_dim)
      up = lambda a: a.astype(jnp.float32)  # noqa: E731
      ref_y, (_, ref_g) = rf(up(x), up(w), seg), rg(up(x), up(w), seg, up(dy))
      y, (_, g) = kf(x, w, seg), kg(x, w, seg, dy)
      name = f"{jnp.dtype(dtype).name}.norm{head_dim}"
      res[name] = {"y": rel_rmse(y, ref_y), "dx": rel_rmse(g[0], ref_g[0]), "dw": rel_rmse(g[1], ref_g[1])}
      print(name, res[name], flush=True)


def part_bench(res: dict) -> None:
  for T in (32768, 131072):
    for head_dim in (128, None):
      x, w, dy, _ = _inputs(jax.random.key(T), 1, T, 14 * 128, 4, jnp.bfloat16)
      for name, fn in (("pallas", short_conv), ("xla", short_conv_reference)):
        f, g = fwd_and_grad(fn, head_dim)
        key = f"{name}.norm{head_dim}.T{T}"
        res[f"{key}.fwd_ms"] = round(median_ms(f, x, w, None), 3)
        res[f"{key}.fwdbwd_ms"] = round(median_ms(g, x, w, None, dy), 3)
        print(key, res[f"{key}.fwd_ms"], res[f"{key}.fwdbwd_ms"], flush=True)


def part_sweep(res: dict) -> None:
  """Tiling of the kernels at 128K (fwd+bwd medians, ms), with and without the norm."""
  import dataclasses
  from pallas_kernels.short_conv import gpu_triton
  T = 131072
  for head_dim in (128, None):
    x, w, dy, _ = _inputs(jax.random.key(T), 1, T, 14 * 128, 4, jnp.bfloat16)
    for bt, btb, warps in ((64, 32, 4), (64, 64, 4), (128, 64, 4), (64, 64, 8), (128, 128, 8), (32, 16, 4)):
      cfg = dataclasses.replace(gpu_triton.Config(), block_t=bt, block_t_bwd=btb, num_warps=warps,
                                num_warps_bwd=warps)
      f, g = fwd_and_grad(lambda x, w, seg, head_dim: short_conv(x, w, seg, head_dim=head_dim, config=cfg),
                          head_dim)
      key = f"sweep.norm{head_dim}.bt{bt}.btb{btb}.w{warps}"
      res[f"{key}.fwd_ms"] = round(median_ms(f, x, w, None), 3)
      res[f"{key}.fwdbwd_ms"] = round(median_ms(g, x, w, None, dy), 3)
      print(key, res[f"{key}.fwd_ms"], res[f"{key}.fwdbwd_ms"], flush=True)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("parts", nargs="+", choices=["check", "bench", "sweep"])
  ap.add_argument("--out", default=".")
  args = ap.parse_args()
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  for part in args.parts:
    {"check": part_check, "bench": part_bench, "sweep": part_sweep}[part](res)
  with open(os.path.join(args.out, "bench_short_conv.json"), "w") as fh:
    json.dump(res, fh, indent=1)


if __name__ == "__main__":
  main()
