"""Cached vs uncached greedy generation on a real model: the hybrid cache against re-running the full forward.

A prompt of ``--length`` tokens (held-out natural text of the eval corpus) and ``--new`` greedy tokens, B = 1:
  cached     ``generation.generate`` (chunked prefill into the hybrid cache, jitted decode steps);
  uncached   what generation cost before the cache: every new token re-runs ``model(tokens)`` over the whole
             sequence (one compiled forward on a buffer of length + new slots; causal, so the padding after the
             current position changes nothing) and takes the logits of the last real position.
Both are warmed up (compiled) once before timing; the reported time is the median of ``--reps`` timed runs and
the two continuations are compared token by token (greedy, so they agree up to float rounding ties).

  python benchmarks/bench_cached_decoding.py --model smollm2 --length 4096 --new 32 --out $OUT
  python benchmarks/bench_cached_decoding.py --smoke --out /tmp/bcd     # tiny random model on CPU
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

from hydrahead_jax.generation import generate  # noqa: E402


def uncached_generate(model, prompt: list[int], new: int) -> list[int]:
  graphdef, state = nnx.split(model)
  total = len(prompt) + new

  @jax.jit
  def next_token(state, tokens_1xT, last):
    logits_1xTxV = nnx.merge(graphdef, state)(tokens_1xT)
    return jnp.argmax(logits_1xTxV[0, last], axis=-1).astype(jnp.int32)

  buf = np.zeros((1, total), np.int32)
  buf[0, :len(prompt)] = prompt
  tokens = jnp.asarray(buf)
  out = []
  for i in range(new):
    last = len(prompt) + i - 1
    tok = next_token(state, tokens, last)
    tokens = tokens.at[0, last + 1].set(tok)
    out.append(tok)
  return [int(t) for t in jax.device_get(out)]


def timed(fn, reps: int) -> tuple[float, object]:
  res = fn()  # warm-up: compiles
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    res = fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), res


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2")
  ap.add_argument("--length", type=int, default=4096)
  ap.add_argument("--new", type=int, default=32)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--chunk-size", type=int, default=1024)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--out", default=".")
  ap.add_argument("--smoke", action="store_true")
  args = ap.parse_args()
  if args.smoke:
    from hydrahead_jax import HeadLayout, ModelConfig, create_model

    cfg = ModelConfig(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=64, layout=HeadLayout.per_layer(2, [0]))
    model, name = create_model(cfg, seed=0), "smoke"
    prompt = np.random.default_rng(0).integers(0, 256, 96).tolist()
    args.new, args.chunk_size, args.reps = 8, 32, 1
  else:
    from hydrahead_jax.eval.corpus import tokenized
    from hydrahead_jax.interop.load import load

    cfg, model, tok = load(args.model, dtype=args.dtype, compute_dtype=args.dtype)
    name = args.model
    prompt = tokenized(tok).document(0, args.length)
  t_cached, cached = timed(lambda: generate(model, prompt, args.new, chunk_size=args.chunk_size), args.reps)
  t_uncached, uncached = timed(lambda: uncached_generate(model, prompt, args.new), args.reps)
  cached = [int(t) for t in cached][:args.new]
  agree = sum(int(a == b) for a, b in zip(cached, uncached))
  res = {"model": name, "device": jax.devices()[0].device_kind, "jax": jax.__version__, "prompt_tokens": len(prompt),
         "new_tokens": args.new, "dtype": args.dtype, "cached_s": t_cached, "uncached_s": t_uncached,
         "cached_tokens_per_s": args.new / t_cached, "uncached_tokens_per_s": args.new / t_uncached,
         "speedup": t_uncached / t_cached, "greedy_agreement": f"{agree}/{min(len(cached), len(uncached))}",
         "note": "cached time includes the prefill of the prompt; uncached re-runs the whole forward per token"}
  print(json.dumps(res, indent=1))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "cached_decoding.json"), "w") as fh:
    json.dump(res, fh, indent=1)


if __name__ == "__main__":
  main()
