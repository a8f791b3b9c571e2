"""Helpers to check and time the Pallas gated delta rule on an accelerator (used by benchmarks/bench_gdn.py)."""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gated_delta_rule.ops import gated_delta_rule_pallas
from pallas_kernels.gated_delta_rule.reference import gdn_recurrent
from pallas_kernels.gated_delta_rule.reference_chunked import gdn_chunked

Array = jax.Array


def make_inputs(key, B: int, T: int, H: int, K: int, V: int, dtype=jnp.bfloat16, segments: float = 0.0):
  """fla-style inputs: q ~ N(0,1), k unit-norm, g = log sigmoid(N(0,1)), beta ~ U(0,1); optional segment ids."""
  ks = jax.random.split(key, 7)
  q = jax.random.normal(ks[0], (B, T, H, K), jnp.float32)
  q = (q / jnp.linalg.norm(q, axis=-1, keepdims=True)).astype(dtype)
  k = jax.random.normal(ks[1], (B, T, H, K), jnp.float32)
  k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
  v = jax.random.normal(ks[2], (B, T, H, V), dtype)
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H), jnp.float32))
  beta = jax.random.uniform(ks[4], (B, T, H), jnp.float32).astype(dtype)
  h0 = 0.5 * jax.random.normal(ks[5], (B, H, K, V), jnp.float32)
  seg = None
  if segments:
    seg = jnp.cumsum(jax.random.uniform(ks[6], (B, T)) < segments, axis=1).astype(jnp.int32)
  return q, k, v, g, beta, h0, seg


def rel_rmse(a: Array, b: Array) -> float:
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.sqrt(jnp.mean((a - b)**2)) / jnp.sqrt(jnp.mean(b**2)))


def median_ms(fn: Callable, *args, warmup: int = 2, reps: int = 10) -> float:
  """Median wall time of fn(*args) in ms (synchronised with block_until_ready; compile excluded)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return float(np.median(times))


def gdn_fn(impl: str, **kw) -> Callable:
  """A gated delta rule with the registry signature: 'pallas' (kw: backend, config), 'chunked', 'recurrent'."""
  if impl == "pallas":
    return functools.partial(gated_delta_rule_pallas, **kw)
  base = {"chunked": gdn_chunked, "recurrent": gdn_recurrent}[impl]

  def fn(q, k, v, g, beta, *, initial_state=None, segment_ids=None, chunk_size=64, output_final_state=False):
    return base(q, k, v, g, beta, scale=q.shape[-1]**-0.5, initial_state=initial_state, segment_ids=segment_ids,
                chunk_size=chunk_size, output_final_state=output_final_state)

  return fn


def fwd_and_grad(fn: Callable, with_state: bool = False):
  """jitted forward, and jitted (loss, grads) of loss = <o, do> (+ <final, dht>) w.r.t. q, k, v, g, beta (and h0).

  value_and_grad, not grad: the loss value needs o, so the forward's read-out runs as in training (with grad
  alone XLA drops the unused forward output and the timing would skip the forward state pass).
  """

  def fwd(q, k, v, g, beta, h0=None, seg=None):
    return fn(q, k, v, g, beta, initial_state=h0, segment_ids=seg, output_final_state=with_state)

  def loss(q, k, v, g, beta, h0, seg, do, dht):
    o, ht = fwd(q, k, v, g, beta, h0, seg)
    val = jnp.sum(o.astype(jnp.float32) * do)
    if with_state:
      val = val + jnp.sum(ht * dht)
    return val

  argnums = tuple(range(6 if with_state else 5))
  return jax.jit(fwd), jax.jit(jax.value_and_grad(loss, argnums=argnums))
