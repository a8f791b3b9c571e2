"""Gated delta rule: chunked (custom_vjp) vs recurrent oracle vs float64 NumPy loops; API contract."""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gdn_oracle import gdn_numpy, random_segments, realistic_inputs

from hydrahead_jax.ops import (available_implementations, default_implementation, gated_delta_rule,
                               get_gdn_implementation, register_gdn_implementation)

gdr_module = importlib.import_module("hydrahead_jax.ops.gated_delta_rule")

B, H, K, V = 2, 2, 8, 16  # K != V catches transposed state layouts
GRAD_NAMES = ("q", "k", "v", "g", "beta", "initial_state")
# Compile time dominates these tests on CPU: skip LLVM optimisation (same numerics, ~2.5x faster compiles).
_FAST_COMPILE = {"xla_backend_optimization_level": 0}
_EXECUTABLES = {}


def rel_rmse(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "scale"))
def _fwd(q, k, v, g, beta, state, segment_ids, *, impl, chunk_size, scale=None):
  return gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=state, segment_ids=segment_ids,
                          chunk_size=chunk_size, output_final_state=True, implementation=impl)


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def _fwd_bwd(q, k, v, g, beta, state, segment_ids, do, dfinal, *, impl, chunk_size):
  """Outputs and the VJP for all six differentiable inputs under random cotangents of o and final_state."""

  def f(*args):
    return _fwd(*args, segment_ids, impl=impl, chunk_size=chunk_size)

  out, vjp = jax.vjp(f, q, k, v, g, beta, state)
  return out, vjp((do.astype(out[0].dtype), dfinal))


def _call(jitted, *args, **static):
  """Run ``jitted`` through a fast-compiled executable cached per signature (args may hold None)."""
  leaves, tree = jax.tree.flatten(args)
  key = (jitted, tree, tuple((np.shape(x), np.dtype(x.dtype)) for x in leaves), tuple(sorted(static.items())))
  if key not in _EXECUTABLES:
    _EXECUTABLES[key] = jitted.lower(*args, **static).compile(_FAST_COMPILE)
  return _EXECUTABLES[key](*args)


def _cotangents(rng, T):
  return (rng.normal(size=(B, T, H, V)).astype(np.float32), rng.normal(size=(B, H, K, V)).astype(np.float32))


def _assert_close(chunked, recurrent, o_tol=1e-5, grad_tol=1e-4):
  (o_c, s_c), grads_c = chunked
  (o_r, s_r), grads_r = recurrent
  assert rel_rmse(o_c, o_r) < o_tol
  assert rel_rmse(s_c, s_r) < o_tol
  for name, gc, gr in zip(GRAD_NAMES, grads_c, grads_r):
    assert np.all(np.isfinite(np.asarray(gc, np.float32))), name
    assert rel_rmse(gc, gr) < grad_tol, (name, rel_rmse(gc, gr))


@pytest.mark.parametrize("T,chunk_size,packed", [(50, 16, False), (100, 64, True)])
def test_chunked_matches_recurrent(rng, T, chunk_size, packed):
  inputs = realistic_inputs(rng, B, T, H, K, V)
  seg = random_segments(rng, B, T, forced=(chunk_size,)) if packed else None  # a start on a chunk edge
  cts = _cotangents(rng, T)
  chunked = _call(_fwd_bwd, *inputs, seg, *cts, impl="chunked", chunk_size=chunk_size)
  recurrent = _call(_fwd_bwd, *inputs, seg, *cts, impl="recurrent", chunk_size=chunk_size)
  _assert_close(chunked, recurrent)


def test_strong_decay_and_extreme_beta(rng):
  T, C = 50, 16
  q, k, v, _, _, state = realistic_inputs(rng, B, T, H, K, V)
  g = -rng.uniform(0.0, 20.0, size=(B, T, H))
  g[:, ::7] = -20.0
  g[:, 1::9] = 0.0
  near0, near1 = rng.uniform(1e-6, 1e-3, (B, T, H)), 1.0 - rng.uniform(0.0, 1e-3, (B, T, H))
  beta = np.where(rng.random((B, T, H)) < 0.5, near0, near1)
  g, beta = g.astype(np.float32), beta.astype(np.float32)
  seg = random_segments(rng, B, T, forced=(C, 2 * C))
  cts = _cotangents(rng, T)
  chunked = _call(_fwd_bwd, q, k, v, g, beta, state, seg, *cts, impl="chunked", chunk_size=C)
  recurrent = _call(_fwd_bwd, q, k, v, g, beta, state, seg, *cts, impl="recurrent", chunk_size=C)
  _assert_close(chunked, recurrent)


def test_state_chaining(rng):
  T, C, split = 50, 16, 25
  q, k, v, g, beta, state = realistic_inputs(rng, B, T, H, K, V)
  whole, whole_final = _call(_fwd, q, k, v, g, beta, state, None, impl="chunked", chunk_size=C)
  first, mid = _call(_fwd, *(x[:, :split] for x in (q, k, v, g, beta)), state, None, impl="chunked", chunk_size=C)
  second, final = _call(_fwd, *(x[:, split:] for x in (q, k, v, g, beta)), mid, None, impl="chunked", chunk_size=C)
  assert rel_rmse(jnp.concatenate([first, second], axis=1), whole) < 1e-5
  assert rel_rmse(final, whole_final) < 1e-5


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_segments_equal_separate_documents(rng, impl):
  C, lengths = 16, (16, 9, 25)  # boundaries at 16 (a chunk edge) and 25 (inside a chunk)
  T = sum(lengths)
  q, k, v, g, beta, state = realistic_inputs(rng, B, T, H, K, V)
  seg = np.repeat(np.arange(len(lengths)), lengths)[None].repeat(B, 0).astype(np.int32) * 3 + 1
  packed, packed_final = _call(_fwd, q, k, v, g, beta, state, seg, impl=impl, chunk_size=C)
  outs, s0 = [], state
  for start, end in zip(np.cumsum((0,) + lengths[:-1]), np.cumsum(lengths)):
    o, final = _call(_fwd, *(x[:, start:end] for x in (q, k, v, g, beta)), s0, None, impl=impl, chunk_size=C)
    outs.append(o)
    s0 = np.zeros_like(state)  # only the first document sees initial_state
  assert rel_rmse(packed, jnp.concatenate(outs, axis=1)) < 1e-5
  assert rel_rmse(packed_final, final) < 1e-5


def test_bf16_inputs(rng):
  T, C = 50, 16
  inputs = realistic_inputs(rng, B, T, H, K, V)
  seg = random_segments(rng, B, T)
  cts = _cotangents(rng, T)
  lo = tuple(jnp.asarray(x, jnp.bfloat16) for x in inputs[:5]) + (inputs[5],)
  (o_lo, s_lo), grads_lo = _call(_fwd_bwd, *lo, seg, *cts, impl="chunked", chunk_size=C)
  (o_hi, s_hi), grads_hi = _call(_fwd_bwd, *inputs, seg, *cts, impl="recurrent", chunk_size=C)
  assert o_lo.dtype == jnp.bfloat16 and s_lo.dtype == jnp.float32
  assert rel_rmse(o_lo, o_hi) < 2e-2
  assert rel_rmse(s_lo, s_hi) < 2e-2
  for name, gl, gh, x in zip(GRAD_NAMES, grads_lo, grads_hi, lo):
    assert gl.dtype == x.dtype, name
    assert rel_rmse(gl, gh) < 2e-2, (name, rel_rmse(gl, gh))


def test_numpy_oracle(rng):
  b, T, h, k_dim, v_dim, C = 1, 20, 2, 4, 5, 8
  q, k, v, g, beta, state = realistic_inputs(rng, b, T, h, k_dim, v_dim)
  seg = np.array([[0] * 8 + [1] * 5 + [2] * 7], np.int32)  # resets on a chunk edge (8) and inside (13)
  o_ref, final_ref = gdn_numpy(q, k, v, g, beta, scale=0.7, initial_state=state, segment_ids=seg)
  for impl in ("recurrent", "chunked"):
    o, final = _call(_fwd, q, k, v, g, beta, state, seg, impl=impl, chunk_size=C, scale=0.7)
    assert rel_rmse(o, o_ref) < 1e-5, impl
    assert rel_rmse(final, final_ref) < 1e-5, impl


def test_jit_grad_batch_one(rng):
  T, C = 20, 8
  q, k, v, g, beta, _ = realistic_inputs(rng, 1, T, H, K, V)

  def loss(impl, q, k, v, g, beta):
    return jnp.sum(jnp.sin(gated_delta_rule(q, k, v, g, beta, chunk_size=C, implementation=impl)[0]))

  argnums = (0, 1, 2, 3, 4)
  grads = _call(jax.jit(jax.grad(functools.partial(loss, None), argnums)), q, k, v, g, beta)
  ref = _call(jax.jit(jax.grad(functools.partial(loss, "recurrent"), argnums)), q, k, v, g, beta)
  for name, a, r in zip(GRAD_NAMES, grads, ref):
    assert rel_rmse(a, r) < 1e-4, name


def test_registry_and_defaults(rng):
  q, k, v, g, beta, state = realistic_inputs(rng, 1, 3, 1, 2, 2)
  assert default_implementation() == "chunked"
  assert get_gdn_implementation() is get_gdn_implementation("chunked")
  calls = []

  def spy(*args, **kwargs):
    calls.append(kwargs)
    return get_gdn_implementation("recurrent")(*args, **kwargs)

  register_gdn_implementation("spy_for_test", spy)
  try:
    o, final = gated_delta_rule(q, k, v, g, beta, implementation="spy_for_test")
  finally:
    del gdr_module._IMPLEMENTATIONS["spy_for_test"]
  assert final is None and o.shape == v.shape and o.dtype == v.dtype
  assert calls[0]["scale"] == pytest.approx(2**-0.5) and calls[0]["chunk_size"] == 64
  with pytest.raises(ValueError, match=r"unknown implementation 'nope'.*chunked.*recurrent"):
    gated_delta_rule(q, k, v, g, beta, implementation="nope")


@pytest.mark.parametrize("bad,match", [
    (dict(k=np.zeros((2, 5, 3, 8))), r"k has shape \(2, 5, 3, 8\), expected \[B, T, H, K\] = \(2, 5, 3, 4\)"),
    (dict(q=np.zeros((2, 5, 3))), r"q has shape \(2, 5, 3\), expected \[B, T, H, K\]"),
    (dict(v=np.zeros((2, 4, 3, 6))), r"v has shape \(2, 4, 3, 6\), expected \[B, T, H, V\] = \(2, 5, 3, \?\)"),
    (dict(g=np.zeros((2, 5, 3, 1))), r"g has shape .*expected \[B, T, H\] = \(2, 5, 3\)"),
    (dict(beta=np.zeros((2, 5))), r"beta has shape .*expected \[B, T, H\]"),
    (dict(initial_state=np.zeros((2, 3, 6, 4))), r"initial_state .*expected \[B, H, K, V\] = \(2, 3, 4, 6\)"),
    (dict(segment_ids=np.zeros((2, 4), np.int32)), r"segment_ids .*expected \[B, T\] = \(2, 5\)"),
    (dict(segment_ids=np.zeros((2, 5), np.float32)), r"segment_ids has dtype float32"),
    (dict(q=np.zeros((2, 5, 3, 4), np.int32)), r"q has dtype int32"),
    (dict(chunk_size=0), r"chunk_size must be a positive int"),
    (dict(chunk_size=16.0), r"chunk_size must be a positive int"),
])
def test_bad_arguments_raise(bad, match):
  args = dict(q=np.ones((2, 5, 3, 4), np.float32), k=np.ones((2, 5, 3, 4), np.float32),
              v=np.ones((2, 5, 3, 6), np.float32), g=-np.ones((2, 5, 3), np.float32),
              beta=np.ones((2, 5, 3), np.float32))
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    gated_delta_rule(**args)


def test_default_picks_pallas_on_accelerators(monkeypatch):
  """GPU/TPU default to the Pallas kernels; an unloadable kernel package falls back with one warning."""
  import builtins
  import warnings

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert default_implementation() == "pallas"
  monkeypatch.delitem(gdr_module._IMPLEMENTATIONS, "pallas", raising=False)
  monkeypatch.setattr(gdr_module, "_FALLBACK_WARNED", set())
  real_import = builtins.__import__

  def no_kernels(name, *a, **kw):
    if name.startswith("pallas_kernels"):
      raise ImportError("no triton here")
    return real_import(name, *a, **kw)

  monkeypatch.setattr(builtins, "__import__", no_kernels)
  with pytest.warns(UserWarning, match="no triton here"):
    assert default_implementation() == "chunked"
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert default_implementation() == "chunked"  # warned only once
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert default_implementation() == "chunked"


def test_explicit_pallas_loads_on_first_request(monkeypatch, rng):
  """implementation='pallas' registers the kernels on first request and dispatches to
  pallas_kernels.gated_delta_rule.ops.gated_delta_rule_pallas with the validated arguments (a spy: no kernel runs)."""
  from pallas_kernels.gated_delta_rule import ops as kernel_ops

  monkeypatch.delitem(gdr_module._IMPLEMENTATIONS, "pallas", raising=False)
  assert "pallas" not in available_implementations()
  calls = []

  def spy(q, k, v, g, beta, **kw):
    calls.append(kw)
    return get_gdn_implementation("recurrent")(q, k, v, g, beta, **kw)

  monkeypatch.setattr(kernel_ops, "gated_delta_rule_pallas", spy)
  q, k, v, g, beta, state = realistic_inputs(rng, 1, 5, 1, 4, 4)
  o, final = gated_delta_rule(q, k, v, g, beta, initial_state=state, chunk_size=16, implementation="pallas")
  assert "pallas" in available_implementations()
  assert len(calls) == 1 and final is None
  assert calls[0]["scale"] == pytest.approx(0.5) and calls[0]["chunk_size"] == 16
  assert calls[0]["initial_state"] is state and calls[0]["segment_ids"] is None
  want = gdn_numpy(q, k, v, g, beta, initial_state=state)[0]
  assert rel_rmse(o, want) < 1e-5


def test_pallas_falls_back_to_chunked_once(monkeypatch, rng):
  """Where the kernels raise NotImplementedError for a call, 'pallas' runs 'chunked' with one warning."""
  import warnings

  from pallas_kernels.gated_delta_rule import ops as kernel_ops

  def cannot(*args, **kwargs):
    raise NotImplementedError("no kernel for this shape")

  monkeypatch.delitem(gdr_module._IMPLEMENTATIONS, "pallas", raising=False)
  monkeypatch.setattr(kernel_ops, "gated_delta_rule_pallas", cannot)
  monkeypatch.setattr(gdr_module, "_FALLBACK_WARNED", set())
  q, k, v, g, beta, state = realistic_inputs(rng, 1, 5, 1, 4, 4)
  with pytest.warns(UserWarning, match="no kernel for this shape"):
    o, _ = gated_delta_rule(q, k, v, g, beta, implementation="pallas")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    o2, _ = gated_delta_rule(q, k, v, g, beta, implementation="pallas")  # warned only once
  want = gdn_numpy(q, k, v, g, beta)[0]
  assert rel_rmse(o, want) < 1e-5 and rel_rmse(o2, want) < 1e-5
