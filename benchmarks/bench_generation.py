"""Generation efficiency with the hybrid cache: cache bytes, prefill and decode throughput.

Qwen3-0.6B shape (28 layers, d 1024, 16 query heads, 8 KV groups, head_dim 128, MLP 3072, vocab 151,936, tied
embeddings), random bf16 weights, three layouts:
  all_fa       every group full attention (the teacher architecture);
  head_7to1    1 FA group of 8 in every layer (7:1 head-level hybrid);
  layer_3to1   every 4th layer all FA, the rest all LA (3:1 layer-wise hybrid).
Per layout and context length L (batch B):
  cache bytes  per token (FA K/V), fixed (LA state + conv tails), total at L (config arithmetic) and the bytes the
               allocated cache holds (slots rounded up);
  prefill      tokens/s of a chunked prefill of L tokens into an empty cache (median of --reps runs);
  decode       tokens/s (B / step time) of --decode-steps greedy steps at context L, run in one jitted call
               (a scan over steps, as ``generate`` runs them), after a warm-up call.
Each shape is compiled once (a warm-up run) before timing; every timing blocks on its result. A cell that fails
(out of memory, ...) is recorded as {"error": ...} and the run goes on. Results go to --out as JSON.

  python benchmarks/bench_generation.py --out $OUT --lengths 4096 32768 131072 [--check] [--unroll] [--batch 8]
  python benchmarks/bench_generation.py --smoke --out /tmp/bg      # tiny shapes on CPU, checks the script runs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hydrahead_jax.config import HeadLayout, ModelConfig  # noqa: E402
from hydrahead_jax.generation import (cache_bytes, cache_nbytes, decode, decode_step, init_cache,  # noqa: E402
                                      prefill, round_up, split_model)
from hydrahead_jax.nn.model import create_model  # noqa: E402

QWEN3_06B = dict(vocab_size=151936, d_model=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                 mlp_dim=3072, rope_theta=1_000_000.0, max_position=40960)
SMOKE = dict(vocab_size=256, d_model=64, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=16, mlp_dim=128)


def layouts(L: int, G: int) -> dict[str, HeadLayout]:
  return {"all_fa": HeadLayout.all_fa(L, G), "head_7to1": HeadLayout.per_layer(L, [0]),
          "layer_3to1": HeadLayout.layerwise(L, G, every=4)}


def error_cell(e: BaseException) -> dict:
  msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
  oom = any(s in str(e) for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))
  return {"error": "OOM" if oom else f"{type(e).__name__}: {msg}", "detail": msg}


def block(tree) -> None:
  jax.block_until_ready(jax.tree.leaves(tree))


def time_prefill(model, tokens, slots: int, chunk: int, reps: int) -> float:
  """Median seconds of a chunked prefill of ``tokens`` into a fresh cache (after one warm-up run)."""
  times = []
  for i in range(reps + 1):
    cache = init_cache(model[2], tokens.shape[0], slots)
    block(cache)
    t0 = time.perf_counter()
    logits, cache = prefill(model[:2], tokens, cache, chunk_size=chunk)
    block((logits, cache))
    if i:
      times.append(time.perf_counter() - t0)
    del cache, logits
  return statistics.median(times)


def time_decode(model, tokens, slots: int, chunk: int, steps: int, unroll: bool) -> float:
  """Seconds per decoding step at context len(tokens): ``steps`` greedy steps in one jitted call (a scan, as
  ``generate`` runs them), timed after a warm-up call that compiles it."""
  times = []
  for i in range(2):
    cache = init_cache(model[2], tokens.shape[0], slots)
    logits, cache = prefill(model[:2], tokens, cache, chunk_size=chunk)
    block((logits, cache))
    t0 = time.perf_counter()
    decode(model[:2], cache, logits, steps + 1, steps_per_call=steps, unroll=unroll)  # returns host lists
    times.append(time.perf_counter() - t0)
    del cache, logits
  return times[-1] / steps


def check_cached(model, cfg: ModelConfig, length: int = 512, chunk: int = 256, steps: int = 8) -> dict:
  """Max |logits| difference between the cache path (chunked prefill + decode steps) and the full forward, on
  this device and layout (bf16 rounding: expect small errors against the logits' scale)."""
  from flax import nnx

  graphdef, state = model[:2]
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, length + steps)), jnp.int32)
  full = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
  cache = init_cache(cfg, 1, round_up(length + steps, 256))
  logits, cache = prefill(model[:2], tokens[:, :length], cache, chunk_size=chunk, all_logits=True)
  prefill_err = float(jnp.abs(logits - full[:, :length]).max())
  decode_err = 0.0
  for i in range(length, length + steps):
    step_logits, cache = decode_step(model[:2], cache, tokens[:, i], check=False)
    decode_err = max(decode_err, float(jnp.abs(step_logits - full[:, i]).max()))
  return {"prefill_max_abs_err": prefill_err, "decode_max_abs_err": decode_err,
          "logits_max_abs": float(jnp.abs(full).max())}


def run(args) -> dict:
  dims = SMOKE if args.smoke else QWEN3_06B
  base = ModelConfig(**dims, dtype=args.dtype, param_dtype=args.dtype, la_implementation=args.gdn_impl)
  results = {"device": str(jax.devices()[0]), "backend": jax.default_backend(), "jax": jax.__version__,
             "python": platform.python_version(), "shape": dims, "dtype": args.dtype, "batch": args.batch,
             "prefill_chunk": args.chunk, "decode_steps": args.decode_steps, "unroll": args.unroll, "reps": args.reps,
             "layouts": {}}
  names = args.layouts or list(layouts(base.num_layers, base.num_kv_heads))
  for name in names:
    layout = layouts(base.num_layers, base.num_kv_heads)[name]
    cfg = base.replace(layout=layout)
    entry = {"layout": layout.describe(cfg.num_kv_heads), "cells": {}}
    results["layouts"][name] = entry
    try:
      model = create_model(cfg, seed=0)
      graphdef, state = split_model(model)
      m = (graphdef, state, cfg)
      entry["params"] = int(sum(x.size for x in jax.tree.leaves(state)))
      if args.check:
        entry["check"] = check_cached(m, cfg)
        print(f"{name}: cached vs full forward {entry['check']}", flush=True)
    except Exception as e:  # noqa: BLE001 - reported, the next layout still runs
      entry["error"] = error_cell(e)
      print(f"{name}: model creation failed: {entry['error']['error']}", flush=True)
      continue
    for L in args.lengths:
      cell: dict = {"cache": {**cache_bytes(cfg, L, args.batch)}}
      chunk = min(args.chunk, L)
      slots = round_up(L + args.decode_steps + 1, 256)
      tokens = jnp.asarray(np.random.default_rng(L).integers(0, cfg.vocab_size, (args.batch, L)), jnp.int32)
      try:
        cell["cache"]["allocated"] = cache_nbytes(jax.eval_shape(lambda: init_cache(cfg, args.batch, slots)))
        t = time_prefill(m, tokens, slots, chunk, args.reps)
        cell["prefill_s"] = t
        cell["prefill_tok_s"] = args.batch * L / t
      except Exception as e:  # noqa: BLE001
        cell["prefill"] = error_cell(e)
      gc.collect()
      try:
        t = time_decode(m, tokens, slots, chunk, args.decode_steps, args.unroll)
        cell["decode_step_ms"] = 1e3 * t
        cell["decode_tok_s"] = args.batch / t
      except Exception as e:  # noqa: BLE001
        cell["decode"] = error_cell(e)
      gc.collect()
      entry["cells"][str(L)] = cell
      c = cell["cache"]
      pre = f"{cell['prefill_tok_s']:,.0f} tok/s" if "prefill_tok_s" in cell else cell["prefill"]["error"]
      dec = f"{cell['decode_tok_s']:,.1f} tok/s" if "decode_tok_s" in cell else cell["decode"]["error"]
      print(f"{name:>10} L={L:>7}: cache {c['total'] / 2**20:9.1f} MiB ({c['per_token']:,} B/token + "
            f"{c['fixed'] / 2**20:.1f} MiB fixed), prefill {pre}, decode {dec}", flush=True)
    del model, m, state
    gc.collect()
  return results


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default=".")
  ap.add_argument("--lengths", type=int, nargs="*", default=None,
                  help="context lengths (default 4096 16384 32768 65536 131072; --smoke: 64 128)")
  ap.add_argument("--layouts", nargs="*", choices=["all_fa", "head_7to1", "layer_3to1"], default=None)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk length")
  ap.add_argument("--decode-steps", type=int, default=32)
  ap.add_argument("--reps", type=int, default=3, help="timed prefill runs (after one warm-up)")
  ap.add_argument("--unroll", action="store_true", help="unroll the layer scan inside a decoding step")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--gdn-impl", default=None, help="gated delta rule implementation (default: the backend's)")
  ap.add_argument("--check", action="store_true",
                  help="first compare the cached path with the full forward per layout (logit errors in the JSON)")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU): checks the script runs")
  args = ap.parse_args(argv)
  if args.smoke:
    args.lengths = args.lengths or [64, 128]
    args.decode_steps, args.reps, args.chunk, args.dtype = 4, 1, 64, "float32"
  args.lengths = args.lengths or [4096, 16384, 32768, 65536, 131072]
  res = run(args)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"bench_generation_{'smoke' if args.smoke else jax.default_backend()}.json")
  with open(path, "w") as f:
    json.dump(res, f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
