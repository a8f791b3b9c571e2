"""Context parallelism on GPUs with the real kernels (cuDNN attention, Pallas GDN and short conv) vs one device.

One 7:1 mixer layer (the bench_mixer shape: d_model 2048, 16 heads, 8 KV groups, head_dim 128, bf16), B = 1,
T tokens with segment resets that cross shard boundaries, split over a 'context' axis of all visible GPUs: output
and input gradient against the single-device run (relative RMSE; both bf16, so ~1e-2 is rounding), plus fwd+bwd
medians. The GDN op alone (Pallas) is checked too, in float32. Needs >= 2 GPUs:

  python benchmarks/check_context_parallel.py --out $OUT [--T 16384]
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
from hydrahead_jax.nn.layers import l2_normalize, rope_angles  # noqa: E402
from hydrahead_jax.nn.mixer import HydraHeadMixer  # noqa: E402
from hydrahead_jax.ops import gated_delta_rule  # noqa: E402
from hydrahead_jax.parallel.context import context_gated_delta_rule  # noqa: E402
from pallas_kernels.gated_delta_rule.bench import median_ms  # noqa: E402

AXES = ("data", "fsdp", "context", "tensor")


def rel_rmse(a, b) -> float:
  """Relative RMSE on the host (the arrays live on different device sets)."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.sqrt(np.mean((a - b)**2)) / np.sqrt(np.mean(b**2)))


def mesh_of(devices, cp):
  return jax.sharding.Mesh(np.array(devices).reshape(1, 1, cp, 1), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=".")
  ap.add_argument("--T", type=int, default=16384)
  args = ap.parse_args()
  n, T = len(jax.devices()), args.T
  res = {"devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__, "T": T, "cp": n}
  # Segment starts at every shard boundary but the first (a reset exactly there) and inside shards.
  starts = sorted({T // n * c for c in range(2, n)} | {T // (2 * n) * 3, T - 100})
  seg = jnp.asarray(np.sum(np.arange(T)[None, :, None] >= np.asarray(starts)[None, None, :], -1), jnp.int32)

  # -- the GDN op alone, float32, Pallas per shard vs Pallas on one device
  key = iter(jax.random.split(jax.random.key(0), 8))
  H, K = 4, 128
  q, k = (l2_normalize(jax.random.normal(next(key), (1, T, H, K))) for _ in range(2))
  v = jax.random.normal(next(key), (1, T, H, K))
  g = -0.05 * jax.random.uniform(next(key), (1, T, H))
  beta = jax.random.uniform(next(key), (1, T, H))

  def gdn_loss(fn):
    return jax.jit(jax.value_and_grad(lambda q, k, v, g, b: (lambda o: (jnp.mean(o * o), o))(fn(q, k, v, g, b)),
                                      argnums=(0, 2, 3), has_aux=True))
  with jax.set_mesh(mesh_of(jax.devices()[:1], 1)):
    (_, o_ref), d_ref = gdn_loss(lambda *a: gated_delta_rule(*a, segment_ids=seg, implementation="pallas")[0])(
        q, k, v, g, beta)
  with jax.set_mesh(mesh_of(jax.devices(), n)):
    (_, o), d = gdn_loss(lambda *a: context_gated_delta_rule(*a, seg, implementation="pallas"))(q, k, v, g, beta)
  res["gdn_f32_o_rel_err"] = rel_rmse(o, o_ref)
  res["gdn_f32_grad_rel_err"] = [rel_rmse(a, b) for a, b in zip(d, d_ref)]
  print({k_: v_ for k_, v_ in res.items() if k_.startswith("gdn")}, flush=True)

  # -- one 7:1 mixer layer, bf16, every kernel on
  cfg = mixer_config(False).replace(layout=HeadLayout(((0,),)))
  layer = HydraHeadMixer(cfg, 1, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (1, T, cfg.d_model), jnp.bfloat16)
  cos_sin = rope_angles(jnp.arange(T, dtype=jnp.int32)[None], cfg.head_dim, cfg.rope_theta)

  def loss(params, x):
    y = nnx.merge(graphdef, params)(x, cos_sin, seg)[0].astype(jnp.float32)
    return jnp.mean(y * y), y

  new_step = lambda: jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True))  # noqa: E731 - fresh jit per mesh
  with jax.set_mesh(mesh_of(jax.devices()[:1], 1)):
    step = new_step()
    (_, y_ref), dx_ref = step(params, x)
    res["single_device_ms"] = median_ms(step, params, x, reps=5)
  with jax.set_mesh(mesh_of(jax.devices(), n)):
    step = new_step()
    (_, y), dx = step(params, x)
    res["context_parallel_ms"] = median_ms(step, params, x, reps=5)
    hlo = step.lower(params, x).as_text()
  res["mixer_y_rel_err"] = rel_rmse(y, y_ref)
  res["mixer_dx_rel_err"] = rel_rmse(dx, dx_ref)
  res["cudnn_in_hlo"] = "cudnn" in hlo.lower() or "__cudnn$fmha" in hlo
  print(res, flush=True)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "check_context_parallel.json"), "w") as fh:
    json.dump(res, fh, indent=1)


if __name__ == "__main__":
  main()
