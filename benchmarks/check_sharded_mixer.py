"""The mixer with its Pallas kernels on a multi-GPU mesh (kernels per shard) vs on one device.

One 7:1 layer (the bench_mixer shape: d_model 2048, 16 heads, 8 KV groups, head_dim 128, bf16), B = 2 x devices,
T = 8192 with segment resets: output and input gradient on a data-parallel mesh and on a tensor-parallel mesh
against the single-device run (relative RMSE), plus fwd+bwd medians. Needs >= 2 GPUs:

  python benchmarks/check_sharded_mixer.py --out $OUT
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
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.bench_mixer import mixer_config  # noqa: E402
from hydrahead_jax.config import HeadLayout  # noqa: E402
from hydrahead_jax.nn.layers import rope_angles  # noqa: E402
from hydrahead_jax.nn.mixer import HydraHeadMixer  # noqa: E402
from pallas_kernels.gated_delta_rule.bench import median_ms, rel_rmse  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=".")
  ap.add_argument("--T", type=int, default=8192)
  ap.add_argument("--no-segments", action="store_true")
  args = ap.parse_args()
  n = len(jax.devices())
  cfg = mixer_config(False).replace(layout=HeadLayout(((0,),)))
  layer = HydraHeadMixer(cfg, 1, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer)
  B, T = 2 * n, args.T
  x = jax.random.normal(jax.random.key(1), (B, T, cfg.d_model), jnp.bfloat16)
  seg = jnp.cumsum(jax.random.uniform(jax.random.key(2), (B, T)) < 1e-3, axis=1).astype(jnp.int32)
  seg = None if args.no_segments else seg
  cos_sin = rope_angles(jnp.arange(T, dtype=jnp.int32)[None], cfg.head_dim, cfg.rope_theta)

  def loss(params, x):
    y = nnx.merge(graphdef, params)(x, cos_sin, seg)[0].astype(jnp.float32)
    return jnp.mean(y * y), y

  def new_step():  # a fresh jit per mesh (jit's cache does not key on the active mesh)
    return jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True))

  res = {"devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__, "B": B, "T": T,
         "segments": seg is not None}
  # The reference also runs under a (one-device) mesh: with several GPUs visible and no mesh, jax 0.11.2's cuDNN
  # attention partitioner fails ("'GSPMDSharding' object has no attribute 'spec'").
  axes = ("data", "fsdp", "context", "tensor")
  mesh_of = lambda devices, shape: jax.sharding.Mesh(  # noqa: E731
      np.array(devices).reshape(shape), axes, axis_types=(jax.sharding.AxisType.Auto,) * 4)
  with jax.set_mesh(mesh_of(jax.devices()[:1], (1, 1, 1, 1))):
    step = new_step()
    (_, y_ref), dx_ref = step(params, x)
    res["single_device_ms"] = median_ms(step, params, x, reps=5)
  for name, shape in (("data", (n, 1, 1, 1)), ("tensor", (1, 1, 1, n))):
    with jax.set_mesh(mesh_of(jax.devices(), shape)):
      step = new_step()
      (_, y), dx = step(params, x)
      res[f"{name}_parallel_ms"] = median_ms(step, params, x, reps=5)
    res[f"{name}_y_rel_err"] = rel_rmse(y, y_ref)
    res[f"{name}_dx_rel_err"] = rel_rmse(dx, dx_ref)
    print(name, {k: v for k, v in res.items() if k.startswith(name)}, flush=True)
  with open(os.path.join(args.out, "check_sharded_mixer.json"), "w") as fh:
    json.dump(res, fh, indent=1)


if __name__ == "__main__":
  main()
