"""Shared suite of the Pallas gated delta rule: every backend vs the reference, in Pallas interpret mode on CPU.

Relative-RMSE tolerances are fla's (o 0.005; dq/dk/dv 0.008; dg/dbeta 0.02). Each case jits forward + all
gradients once per backend and dtype; cases that differ only in data (strong decay) reuse the compiled function.
Head dims: every K, V in {16, 24, 40, 64, 72, 80, 96, 128, 256} (powers of two and not; K != V pairs), tiny T.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydrahead_jax.ops import gated_delta_rule
from pallas_kernels.gated_delta_rule import gpu_triton
from pallas_kernels.gated_delta_rule.ops import gated_delta_rule_pallas
from pallas_kernels.gated_delta_rule.reference import gdn_recurrent
from pallas_kernels.lower_check import lower_for_cuda, verified_triton_modules


def _tpu_backend():
  """The TPU backend in TPU interpret mode; skipped, with the reason, where its Pallas module cannot be imported."""
  try:
    from pallas_kernels.gated_delta_rule import tpu
  except ImportError as err:
    return pytest.param(None, id="tpu", marks=pytest.mark.skip(reason=f"Pallas TPU backend not importable: {err}"))
  return pytest.param(("tpu", tpu.INTERPRET), id="tpu")


def _backends() -> list:
  return [pytest.param(("triton", gpu_triton.INTERPRET), id="triton"), _tpu_backend()]


BACKENDS = _backends()
# The Triton kernels' other code paths (the default saves T, chunk states, Vn, W and P for the backward):
# split forward, and a backward that recomputes all of them.
VARIANTS = BACKENDS + [pytest.param(("triton", dataclasses.replace(gpu_triton.INTERPRET, save_inverse=False,
                                                                   fwd_split=True, save_states=False,
                                                                   save_wp=False)),
                                    id="triton-recompute-split")]
TOL = {"o": 0.005, "ht": 0.005, "q": 0.008, "k": 0.008, "v": 0.008, "h0": 0.008, "g": 0.02, "beta": 0.02}
NAMES = ("q", "k", "v", "g", "beta", "h0")


def _inputs(rng, B, T, H, K, V, *, g_low=None, dtype=np.float32):
  """q, k unit-norm; beta in (0, 1); g < 0 (uniform down to g_low when given); h0 ~ N(0, 0.5^2)."""

  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  q, k = unit(rng.normal(size=(B, T, H, K))), unit(rng.normal(size=(B, T, H, K)))
  v = rng.normal(size=(B, T, H, V))
  if g_low is None:
    g = -np.logaddexp(0.0, rng.normal(-1.0, 1.5, size=(B, T, H)))
  else:
    g = rng.uniform(g_low, 0.0, size=(B, T, H))
  beta = 1.0 / (1.0 + np.exp(-rng.normal(0.0, 1.5, size=(B, T, H))))
  h0 = 0.5 * rng.normal(size=(B, H, K, V))
  cast = lambda x, dt: jnp.asarray(x.astype(np.float32), dt)  # noqa: E731
  return (cast(q, dtype), cast(k, dtype), cast(v, dtype), cast(g, jnp.float32), cast(beta, dtype),
          cast(h0, jnp.float32))


def _segments(rng, B, T, p=0.05):
  starts = rng.random((B, T)) < p
  starts[:, 0] = False
  return jnp.asarray(np.cumsum(starts, axis=1).astype(np.int32) + rng.integers(0, 5, size=(B, 1)))


@functools.lru_cache(maxsize=None)
def _fwd_grad(impl, with_seg: bool, C: int):
  """jit of (o, final state, grads of <o, do> + <final, dht> w.r.t. q, k, v, g, beta, h0)."""

  def run(q, k, v, g, beta, h0, seg, do, dht):
    def loss(q, k, v, g, beta, h0):
      o, ht = impl(q, k, v, g, beta, initial_state=h0, segment_ids=seg if with_seg else None, chunk_size=C,
                   output_final_state=True)
      return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(ht * dht), (o, ht)

    grads, (o, ht) = jax.grad(loss, argnums=tuple(range(6)), has_aux=True)(q, k, v, g, beta, h0)
    return o, ht, grads

  return jax.jit(run)


@functools.lru_cache(maxsize=None)
def _pallas(backend_cfg):
  backend, cfg = backend_cfg
  return functools.partial(gated_delta_rule_pallas, backend=backend, config=cfg)


def _reference(q, k, v, g, beta, **kw):
  f32 = jnp.float32
  o, ht = gdn_recurrent(q.astype(f32), k.astype(f32), v.astype(f32), g, beta.astype(f32),
                        scale=q.shape[-1]**-0.5, **kw)
  return o.astype(v.dtype), ht


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.all(np.isfinite(a)), "non-finite values"
  return float(np.sqrt(np.mean((a - b)**2)) / (np.sqrt(np.mean(b**2)) + 1e-30))


def _compare(backend_cfg, args, seg, C=64, dtype_tol=1.0):
  q = args[0]
  B, T, H, K = q.shape
  rng = np.random.default_rng(int(np.asarray(args[3]).size))
  do = jnp.asarray(rng.normal(size=(B, T, H, args[2].shape[-1])), jnp.float32)
  dht = jnp.asarray(rng.normal(size=args[5].shape), jnp.float32)
  o, ht, grads = _fwd_grad(_pallas(backend_cfg), seg is not None, C)(*args, seg, do, dht)
  ro, rht, rgrads = _fwd_grad(_reference, seg is not None, C)(*args, seg, do, dht)
  assert o.dtype == args[2].dtype and o.shape == args[2].shape and ht.dtype == jnp.float32
  errs = {"o": _rel(o, ro), "ht": _rel(ht, rht)}
  errs.update({n: _rel(a, b) for n, a, b in zip(NAMES, grads, rgrads)})
  print({n: f"{e:.2e}" for n, e in errs.items()})
  bad = {n: e for n, e in errs.items() if not e <= TOL[n] * dtype_tol}
  assert not bad, f"over tolerance: {bad}; all: {errs}"
  return errs


@pytest.mark.parametrize("backend_cfg", VARIANTS)
def test_forward_and_grads_segments_state_ragged(backend_cfg, rng):
  """T not a multiple of the chunk, segment resets, initial and final state, all gradients (f32)."""
  args = _inputs(rng, 2, 150, 2, 32, 32)
  _compare(backend_cfg, args, _segments(rng, 2, 150))


@pytest.mark.parametrize("backend_cfg", BACKENDS)
def test_strong_decay(backend_cfg, rng):
  """Gates down to -20 per token (exp underflows inside a chunk; no inf/NaN, accurate dg)."""
  args = _inputs(rng, 2, 150, 2, 32, 32, g_low=-20.0)
  _compare(backend_cfg, args, _segments(rng, 2, 150))


@pytest.mark.parametrize("backend_cfg", BACKENDS)
def test_correlated_keys_no_decay(backend_cfg, rng):
  """A student right after conversion from a softmax teacher: keys sharing one direction (k_i . k_j ~ 0.8),
  almost no decay, beta up to 1. The chunk's (I + A)^-1 then has large Neumann powers: the doubling product
  used before lost every digit in float32 (outputs 1e8 where the truth is 0.2, NaN after conversion on a GPU)."""
  q, k, v, g, beta, h0 = _inputs(rng, 2, 150, 2, 32, 32)
  common = rng.normal(size=(1, 1, 2, 32))
  k = np.asarray(k, np.float64) * 0.3 + 2.0 * common / np.linalg.norm(common, axis=-1, keepdims=True)
  k = jnp.asarray(k / np.linalg.norm(k, axis=-1, keepdims=True), jnp.float32)
  g = jnp.asarray(rng.uniform(-0.004, 0.0, size=g.shape), jnp.float32)
  beta = jnp.asarray(rng.uniform(0.5, 1.0, size=beta.shape), jnp.float32)
  _compare(backend_cfg, (q, k, v, g, beta, h0), _segments(rng, 2, 150, p=0.01))


@pytest.mark.parametrize("C", [16, 64])
def test_unit_lower_inverse_every_block_size(C, rng):
  """(I + A)^-1 by block substitution + merges equals the float64 inverse for every diagonal-block size, on the
  hard case above (correlated keys, no decay, beta up to 1), within float32 rounding."""
  from pallas_kernels.gated_delta_rule.chunk_math import unit_lower_inverse

  common = rng.normal(size=32)
  k = 0.3 * rng.normal(size=(C, 32)) + 2.0 * common / np.linalg.norm(common)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  beta = rng.uniform(0.5, 1.0, size=C)
  a = np.tril(beta[:, None] * (k @ k.T), -1)
  want = np.linalg.inv(np.eye(C) + a)
  for block in (1, 2, 4, 8, 16):
    got = np.asarray(unit_lower_inverse(jnp.asarray(a, jnp.float32), jax.lax.Precision.HIGHEST, block))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (C, block)


@pytest.mark.parametrize("backend_cfg", BACKENDS)
def test_no_segments_small_chunk(backend_cfg, rng):
  """No segment ids, chunk 32, several chunks, a reset at no chunk boundary."""
  args = _inputs(rng, 1, 100, 3, 32, 64)
  _compare(backend_cfg, args, None, C=32)


@pytest.mark.parametrize("backend_cfg", BACKENDS)
def test_bf16(backend_cfg, rng):
  """bf16 q, k, v, beta (f32 state and accumulation); reference in f32 on the same bf16 values."""
  args = _inputs(rng, 1, 150, 2, 64, 64, dtype=jnp.bfloat16)
  _compare(backend_cfg, args, _segments(rng, 1, 150))


def test_registry_dispatch(rng):
  """implementation='pallas' through the public op; no final state unless asked."""
  q, k, v, g, beta, h0 = _inputs(rng, 1, 70, 2, 16, 16)
  o, ht = gated_delta_rule(q, k, v, g, beta, initial_state=h0, implementation="pallas")
  ro, _ = gated_delta_rule(q, k, v, g, beta, initial_state=h0, implementation="recurrent")
  assert ht is None
  assert _rel(o, ro) < TOL["o"]


# Non-power-of-two head dims once gave NaN / wrong gradients in interpret mode and did not lower on GPU; the op now
# zero-pads K and V to the backend's padded_dim. Triton: every head dim as K and as V (a cycle of K != V pairs,
# 64-wide backward tiles: 128 and 256 still run tiled). TPU (whole-dim blocks, no padding): every head dim once.
HEAD_DIMS = (16, 24, 40, 64, 72, 80, 96, 128, 256)
KV_TRITON = [(HEAD_DIMS[i], HEAD_DIMS[(i + 1) % len(HEAD_DIMS)]) for i in range(len(HEAD_DIMS))]
KV_TPU = [KV_TRITON[i] for i in (0, 2, 4, 6, 8)]  # (16,24) (40,64) (72,80) (96,128) (256,16): reference jits reused
TRITON_WIDE_TILES = dataclasses.replace(gpu_triton.INTERPRET, dqk_block=64, wyb_block=64)


def _head_dim_cases() -> list:
  cases = [pytest.param(("triton", TRITON_WIDE_TILES), kv, id=f"triton-K{kv[0]}-V{kv[1]}") for kv in KV_TRITON]
  tpu = _tpu_backend()
  return cases + [pytest.param(tpu.values[0], kv, id=f"tpu-K{kv[0]}-V{kv[1]}", marks=tpu.marks) for kv in KV_TPU]


@pytest.mark.parametrize("backend_cfg,kv", _head_dim_cases())
def test_head_dims(backend_cfg, kv, rng):
  """Any K, V: forward, final state and all six gradients (T = 64, two chunks of 32, segment resets, h0)."""
  K, V = kv
  args = _inputs(rng, 1, 64, 1, K, V)
  _compare(backend_cfg, args, _segments(rng, 1, 64, p=0.05), C=32)


@pytest.mark.parametrize("K,V,dtype", [(24, 40, jnp.bfloat16), (80, 72, jnp.float32), (128, 128, jnp.bfloat16)])
def test_lowers_for_cuda(K, V, dtype):
  """Forward + all gradients with the GPU Config lower for CUDA (Triton IR verified, no GPU needed) for head dims
  that are not powers of two: Triton's power-of-two tensor sizes are met by the op's zero padding."""
  B, T, H = 1, 128, 2

  def loss(q, k, v, g, beta, h0, seg):
    o, ht = gated_delta_rule_pallas(q, k, v, g, beta, initial_state=h0, segment_ids=seg, output_final_state=True,
                                    backend="triton", config=gpu_triton.Config())
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(ht)

  S = jax.ShapeDtypeStruct
  args = (S((B, T, H, K), dtype), S((B, T, H, K), dtype), S((B, T, H, V), dtype), S((B, T, H), jnp.float32),
          S((B, T, H), dtype), S((B, H, K, V), jnp.float32), S((B, T), jnp.int32))
  with verified_triton_modules() as names:
    lower_for_cuda(jax.value_and_grad(loss, argnums=tuple(range(6))), *args)
  assert names == ["gdn_wy_fwd", "gdn_state_fwd", "gdn_state_bwd", "gdn_dqk", "gdn_wy_bwd"]


def test_kernel_package_is_standalone():
  """pallas_kernels imports nothing from hydrahead_jax, at module or function level (the library imports the
  kernels, never the reverse)."""
  root = pathlib.Path(__file__).resolve().parents[1] / "pallas_kernels"
  files = sorted(root.rglob("*.py"))
  assert len(files) > 10, files
  bad = []
  for path in files:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      bad += [f"{path.relative_to(root.parent)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "hydrahead_jax"]
  assert not bad, bad
