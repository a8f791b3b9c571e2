"""Packed-document attention on one GPU: jax's Pallas flash attention with segment ids vs cuDNN with the dense mask
vs cuDNN on one document (no mask). Correctness (output and q/k/v gradients against float32 XLA attention with the
segment mask up to --ref-max-t; beyond it, whose T x T float32 scores do not fit, against the dense-mask kernel
in the run's dtype) and forward+backward medians, causal GQA, bf16.

  python benchmarks/check_packed_attention.py --out $OUT [--T 8192 32768] [--heads 16 --groups 8 --head-dim 128]
  python benchmarks/check_packed_attention.py --smoke --out /tmp/cpa     # CPU, tiny, Pallas interpret mode

Exit status 0 when the Pallas packed path compiled and matched (``benchmarks/gpu_evidence.sh`` uses it as a gate:
otherwise the transfer runs with ``fa_packed_implementation='mask'``).
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

from hydrahead_jax.nn.attention import pallas_packed_attention, segment_mask  # noqa: E402


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b ** 2)) + 1e-30))


def variants(scale: float, impl: str):
  def pallas(q, k, v, s):
    return pallas_packed_attention(q, k, v, s, scale=scale)

  def masked(q, k, v, s):
    return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(s), is_causal=True, scale=scale,
                                        implementation=impl)

  def one_doc(q, k, v, s):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale, implementation=impl)

  return {"pallas_packed": pallas, f"{impl}_mask": masked, f"{impl}_one_doc": one_doc}


def fwd_bwd(fn):
  def loss(q, k, v, s, do):
    return jnp.sum(fn(q, k, v, s).astype(jnp.float32) * do)

  return jax.jit(lambda q, k, v, s, do: (fn(q, k, v, s), jax.grad(loss, argnums=(0, 1, 2))(q, k, v, s, do)))


def median_ms(f, args, reps: int) -> float:
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)) * 1e3


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=".")
  ap.add_argument("--T", type=int, nargs="*", default=[8192, 32768])
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--groups", type=int, default=8)
  ap.add_argument("--head-dim", type=int, default=128)
  ap.add_argument("--docs", type=int, default=4, help="documents per row (random boundaries)")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--ref-max-t", type=int, default=16384,
                  help="longest T with the float32 XLA reference (its scores take B H T^2 4 bytes)")
  ap.add_argument("--smoke", action="store_true")
  args = ap.parse_args()
  gpu = jax.default_backend() == "gpu"
  if args.smoke:
    args.T, args.heads, args.groups, args.head_dim, args.reps = [256], 4, 2, 32, 1
  impl = "cudnn" if gpu else "xla"
  dtype = jnp.bfloat16 if gpu else jnp.float32
  scale = args.head_dim ** -0.5
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "dtype": jnp.dtype(dtype).name,
         "heads": args.heads, "groups": args.groups, "head_dim": args.head_dim, "docs": args.docs, "rows": []}
  ok = True
  rng = np.random.default_rng(0)
  for T in args.T:
    q = jnp.asarray(rng.normal(size=(1, T, args.heads, args.head_dim)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(1, T, args.groups, args.head_dim)), dtype) for _ in range(2))
    cuts = np.sort(rng.choice(np.arange(1, T), args.docs - 1, replace=False))
    seg = jnp.asarray(np.searchsorted(cuts, np.arange(T), side="right")[None], jnp.int32)
    do = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    if T <= args.ref_max_t:
      ref = fwd_bwd(variants(scale, "xla")["xla_mask"])(*(x.astype(jnp.float32) for x in (q, k, v)), seg, do)
      row = {"T": T, "reference": "float32 XLA with the segment mask"}
    else:
      ref = fwd_bwd(variants(scale, impl)[f"{impl}_mask"])(q, k, v, seg, do)
      row = {"T": T, "reference": f"{impl} with the segment mask, {jnp.dtype(dtype).name}"}
    for name, fn in variants(scale, impl).items():
      try:
        f = fwd_bwd(fn)
        o, grads = f(q, k, v, seg, do)
        cell = {"fwd_bwd_ms": median_ms(f, (q, k, v, seg, do), args.reps)}
        if not name.endswith("one_doc"):  # the one-document kernel ignores the segments: timing only
          cell["rel_err"] = {n: rel(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), (o, *grads),
                                                              (ref[0], *ref[1]))}
      except Exception as e:  # noqa: BLE001 - a failing variant is a result (OOM, compile error)
        cell = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
      if name == "pallas_packed":
        tol = 5e-2 if dtype == jnp.bfloat16 else 1e-4
        ok = ok and "error" not in cell and max(cell["rel_err"].values()) < tol
      row[name] = cell
      print(json.dumps({"T": T, name: cell}), flush=True)
    res["rows"].append(row)
  res["pallas_packed_ok"] = ok
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "packed_attention.json"), "w") as fh:
    json.dump(res, fh, indent=1)
  print(f"pallas packed path {'OK' if ok else 'FAILED'}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
