"""Fused short convolution (pallas_kernels/short_conv): the Triton kernels in Pallas interpret mode vs the reference.

Forward and both gradients (x, w; through jax.vjp with a random cotangent), with and without the per-head L2 norm,
with and without segment_ids (several resets, some on block edges), ragged T (40 rows in blocks of 16; 5 rows in
one block of 8), W = 4 / 3 / 2 / 1, masked lanes (K = 12 heads; C = 40 in tiles of 16), f32 and bf16, bad
arguments, the reference against the model's layers, and the CUDA lowering of the model's shape.
Relative RMSE: forward 1e-5 (f32) / 1e-2 (bf16), gradients 1e-4 (f32) / 1e-2 (bf16).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydrahead_jax.nn.layers import causal_depthwise_conv, l2_normalize
from pallas_kernels.lower_check import verified_triton_modules
from pallas_kernels.short_conv import gpu_triton, short_conv, short_conv_reference
from pallas_kernels.short_conv.lower_check import lower_for_cuda

B, T, C, K = 2, 40, 32, 16
TOL = {jnp.float32: (1e-5, 1e-4), jnp.bfloat16: (1e-2, 1e-2)}


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.all(np.isfinite(a)), "non-finite values"
  return float(np.sqrt(np.mean((a - b)**2)) / (np.sqrt(np.mean(b**2)) + 1e-30))


def _segments(rng, B: int, T: int) -> jax.Array:
  """int32 [B, T] document ids (not starting at 0): random resets plus forced ones at t = 1, 16, 17 (block edge)."""
  resets = rng.random((B, T)) < 0.1
  resets[:, [t for t in (1, 16, 17) if t < T]] = True
  return jnp.asarray(np.cumsum(resets, axis=1) + 3, jnp.int32)


def _inputs(rng, B: int, T: int, C: int, W: int, dtype, segments: bool):
  """Random x, w (no zeros), segment_ids or None, and a float32 cotangent."""
  x = jnp.asarray(rng.normal(size=(B, T, C)) * rng.uniform(0.5, 2.0), dtype)
  w = jnp.asarray(rng.normal(size=(W, C)) * 0.5 + rng.choice([-1.0, 1.0], size=(W, C)) * 0.3, dtype)
  sid = _segments(rng, B, T) if segments else None
  dy = jnp.asarray(rng.normal(size=(B, T, C)), jnp.float32)
  return x, w, sid, dy


def _fwd_vjp(fn, head_dim, **kw):
  def run(x, w, sid, dy):
    y, vjp = jax.vjp(lambda x, w: fn(x, w, sid, head_dim=head_dim, **kw), x, w)
    return (y,) + vjp(dy.astype(y.dtype))

  return jax.jit(run)


def _compare(rng, *, head_dim, segments, W, dtype=jnp.float32, T=T, C=C, config=None):
  x, w, sid, dy = _inputs(rng, B, T, C, W, dtype, segments)
  y, dx, dw = _fwd_vjp(short_conv, head_dim, config=config)(x, w, sid, dy)
  ry, rdx, rdw = _fwd_vjp(short_conv_reference, head_dim)(x, w, sid, dy)
  assert y.shape == x.shape and y.dtype == x.dtype
  assert dx.shape == x.shape and dx.dtype == x.dtype
  assert dw.shape == w.shape and dw.dtype == w.dtype
  errs = {"y": _rel(y, ry), "dx": _rel(dx, rdx), "dw": _rel(dw, rdw)}
  print({n: f"{e:.2e}" for n, e in errs.items()})
  fwd_tol, grad_tol = TOL[dtype]
  bad = {n: e for n, e in errs.items() if not e <= (fwd_tol if n == "y" else grad_tol)}
  assert not bad, f"over tolerance: {bad}; all: {errs}"


@pytest.mark.parametrize("head_dim,segments,W", [(K, True, 4), (None, True, 4), (K, False, 2), (None, False, 2)],
                         ids=["norm-seg-w4", "nonorm-seg-w4", "norm-noseg-w2", "nonorm-noseg-w2"])
def test_f32(head_dim, segments, W, rng):
  """T = 40: three row blocks of 16, the last one ragged."""
  _compare(rng, head_dim=head_dim, segments=segments, W=W)


@pytest.mark.parametrize("head_dim,segments", [(K, True), (None, False)], ids=["norm-seg", "nonorm-noseg"])
def test_bf16(head_dim, segments, rng):
  """bf16 x and w (float32 math inside); outputs and grads in the input dtypes."""
  _compare(rng, head_dim=head_dim, segments=segments, W=4, dtype=jnp.bfloat16)


def test_shorter_than_a_block(rng):
  """T = 5 < one block (8 rows): the halo reaches before t=0 and the du windows past T in the same program."""
  _compare(rng, head_dim=K, segments=True, W=3, T=5)


def test_masked_lanes(rng):
  """Heads of K = 12 channels (tiles of 16 lanes, 4 masked) and, without the norm, C = 40 in tiles of 16 (the
  last tile half masked), W = 1."""
  _compare(rng, head_dim=12, segments=True, W=3, C=24)
  config = dataclasses.replace(gpu_triton.INTERPRET, block_c=16)
  _compare(rng, head_dim=None, segments=True, W=1, C=40, config=config)


@pytest.mark.parametrize("head_dim", [24, 72, 96])
def test_head_dims(head_dim, rng):
  """Head dims that are not powers of two: one head per program in a power-of-two lane tile, the lanes past the
  head masked (no padding needed), two heads, segments, W = 4."""
  _compare(rng, head_dim=head_dim, segments=True, W=4, C=2 * head_dim)


def test_reference_matches_model_layers(rng):
  """The reference is the model's causal_depthwise_conv + SiLU (+ l2_normalize per head), float32."""
  x, w, sid, _ = _inputs(rng, B, T, C, 4, jnp.float32, True)
  for s in (sid, None):
    u = causal_depthwise_conv(x, w, s)
    v_model = jax.nn.silu(u)
    qk_model = l2_normalize(v_model.reshape(B, T, C // K, K)).reshape(B, T, C)
    assert _rel(short_conv_reference(x, w, s), v_model) < 1e-6
    assert _rel(short_conv_reference(x, w, s, head_dim=K), qk_model) < 1e-6


def test_bad_arguments(rng):
  x, w, sid, _ = _inputs(rng, B, T, C, 4, jnp.float32, True)
  cases = [
      ((x[0], w, sid), {}, "x must be"),
      ((x, w[0], sid), {}, "w must be"),
      ((x, w[:, :-1], sid), {}, "w has"),
      ((x, w[:0], sid), {}, "W >= 1"),
      ((x, w, sid), {"head_dim": 12}, "head_dim"),
      ((x, w, sid), {"head_dim": 0}, "head_dim"),
      ((x, w, sid[:, :-1]), {}, "segment_ids"),
      ((x, w, sid.astype(jnp.float32)), {}, "segment_ids"),
  ]
  for fn in (short_conv, short_conv_reference):
    for args, kw, match in cases:
      with pytest.raises(ValueError, match=match):
        fn(*args, **kw)


@pytest.mark.parametrize("head_dim,C", [(128, 14 * 128), (None, 14 * 128), (96, 14 * 96)],
                         ids=["norm", "nonorm", "norm-K96"])
def test_lowers_for_cuda(head_dim, C):
  """jit(value_and_grad) of the model's shape (bf16, B=1, T=4096, C=14*128, W=4; and 14 heads of 96) lowers for
  CUDA with the Triton config; all three Triton modules pass the MLIR verifier."""
  with verified_triton_modules() as names:
    lower_for_cuda(head_dim, segments=True, C=C)
  assert sorted(names) == ["short_conv_bwd_du", "short_conv_bwd_dx", "short_conv_fwd"]


def test_mixer_with_kernel_equals_xla_path(rng, monkeypatch):
  """GatedDeltaNet with the short-conv kernel forced (interpret mode) equals its XLA path: outputs and grads."""
  from flax import nnx

  from hydrahead_jax.nn import mixer as mixer_mod
  from hydrahead_jax.config import HeadLayout, ModelConfig
  from hydrahead_jax.nn.layers import rope_angles

  cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                    dtype="float32", la_chunk_size=8, layout=HeadLayout.per_layer(1, [1]))
  seed = int(rng.integers(1 << 30))
  xla_layer, kernel_layer = (mixer_mod.HydraHeadMixer(cfg.replace(conv_implementation=impl), 1, rngs=nnx.Rngs(seed))
                             for impl in ("xla", "pallas"))  # the same parameters, two kernel choices
  x = jnp.asarray(rng.normal(size=(2, 12, cfg.d_model)), jnp.float32)
  seg = jnp.asarray(np.cumsum(rng.random((2, 12)) < 0.2, axis=1), jnp.int32)
  cos_sin = rope_angles(jnp.arange(12, dtype=jnp.int32)[None], cfg.head_dim, cfg.rope_theta)

  @nnx.jit  # one jit: the kernel choice is part of the model's graphdef
  def run(m, x):
    def loss(m, x):
      y = m(x, cos_sin, seg)[0]
      return jnp.sum(y * y), y
    (_, y), (gm, gx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(m, x)
    return y, gx, gm.la.conv_q[...], gm.la.conv_v[...]

  import pallas_kernels.short_conv as package
  calls = []
  monkeypatch.setattr(package, "short_conv", lambda *a, **k: calls.append(1) or short_conv(*a, **k))
  ref = run(xla_layer, x)
  assert not calls
  out = run(kernel_layer, x)
  assert len(calls) == 3  # q, k, v
  for a, b in zip(out, ref):
    assert _rel(a, b) < 1e-4
