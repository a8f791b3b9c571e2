"""Fused head fusion (pallas_kernels/fusion_norm): the Triton kernels in Pallas interpret mode vs the reference.

Forward and every gradient (FA and LA outputs, the scales, the gate's pre-activation z and bias) for each variant,
with and without the LA gate, f32 and bf16,
all-FA / all-LA layers, head dims that are not powers of two (zero-padded to one inside the op), bad arguments, and
the mixer with the kernel forced equal to its default path.
Relative RMSE: forward 1e-5 (f32) / 1e-2 (bf16), gradients 1e-4 (f32) / 1e-2 (bf16).
Shapes are tiny (B=2, T=12 -> 24 rows, padded to 2 programs of 16 rows); one jit per case.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.fusion_norm import fused_head_fusion, fused_head_fusion_reference, gpu_triton
from pallas_kernels.lower_check import lower_for_cuda, verified_triton_modules

B, T, H, K = 2, 12, 4, 16
TOL = {jnp.float32: (1e-5, 1e-4), jnp.bfloat16: (1e-2, 1e-2)}
ARGS = ("o_fa", "o_la", "fa_scale", "fa_norm_scale", "la_norm_scale", "z", "z_bias")


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.all(np.isfinite(a)), "non-finite values"
  return float(np.sqrt(np.mean((a - b)**2)) / (np.sqrt(np.mean(b**2)) + 1e-30))


def _inputs(rng, variant, fa_heads, gated, dtype, z_bias=True, K=K):
  """Random head outputs, scales around 1 (never zero), gate pre-activation and bias: the differentiable args."""
  Hf, Hl = fa_heads, H - fa_heads
  normal = lambda shape, loc=0.0: rng.normal(loc, 1.0, size=shape).astype(np.float32)  # noqa: E731
  args = {}
  if Hf:
    args["o_fa"] = jnp.asarray(normal((B, T, Hf, K)) * rng.uniform(0.5, 3.0), dtype)
  if Hl:
    args["o_la"] = jnp.asarray(normal((B, T, Hl, K)) * rng.uniform(0.5, 3.0), dtype)
  if variant == "scale_norm" and Hf:
    args["fa_scale"] = jnp.asarray(normal((Hf,), 1.0))
  if variant == "rmsnorm_all" and Hf:
    args["fa_norm_scale"] = jnp.asarray(normal((Hf, K), 1.0))
  if variant != "none" and Hl:
    args["la_norm_scale"] = jnp.asarray(normal((Hl, K), 1.0))
  if gated:
    args["z"] = jnp.asarray(normal((B, T, Hl, K)) * 2.0, dtype)
    if z_bias:
      args["z_bias"] = jnp.asarray(normal((Hl, K)), jnp.float32)
  return args


def _fwd_grad(fn, variant, eps):
  def run(args, dy):
    def loss(args):
      y = fn(*(args.get(n) for n in ARGS), eps=eps, variant=variant)
      return jnp.sum(y.astype(jnp.float32) * dy), y

    grads, y = jax.grad(loss, has_aux=True)(args)
    return y, grads

  return jax.jit(run)


def _call(fn):
  """fn with (o_fa, o_la, scales..., z, z_bias, eps=, variant=) -> positional contract."""
  def wrapped(o_fa, o_la, fs, fns, lns, z, zb, *, eps, variant):
    return fn(o_fa, o_la, variant, fs, fns, lns, z, zb, eps)
  return wrapped


def _compare(rng, variant, fa_heads, gated, dtype=jnp.float32, eps=1e-6, z_bias=True, K=K):
  args = _inputs(rng, variant, fa_heads, gated, dtype, z_bias, K)
  dy = jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32)
  y, grads = _fwd_grad(_call(fused_head_fusion), variant, eps)(args, dy)
  ry, rgrads = _fwd_grad(_call(fused_head_fusion_reference), variant, eps)(args, dy)
  assert y.dtype == dtype and y.shape == (B, T, H, K)
  assert set(grads) == set(args)
  for n, g in grads.items():
    assert g.dtype == args[n].dtype and g.shape == args[n].shape, n
  errs = {"y": _rel(y, ry)} | {n: _rel(grads[n], rgrads[n]) for n in grads}
  print({n: f"{e:.2e}" for n, e in errs.items()})
  fwd_tol, grad_tol = TOL[dtype]
  bad = {n: e for n, e in errs.items() if not e <= (fwd_tol if n == "y" else grad_tol)}
  assert not bad, f"over tolerance: {bad}; all: {errs}"


@pytest.mark.parametrize("gated", [True, False], ids=["gate", "nogate"])
@pytest.mark.parametrize("variant", ["scale_norm", "rmsnorm_all", "none"])
def test_variants_f32(variant, gated, rng):
  _compare(rng, variant, 1, gated)


@pytest.mark.parametrize("variant,gated", [("scale_norm", True), ("rmsnorm_all", False)])
def test_bf16(variant, gated, rng):
  """bf16 head outputs and gate (float32 math inside); grads in the input dtypes."""
  _compare(rng, variant, 2, gated, jnp.bfloat16)


@pytest.mark.parametrize("head_dim", [24, 72, 96])
def test_head_dims(head_dim, rng):
  """Any head dim (Triton needs powers of two: the op zero-pads K, the norm averages over the true K): both norms,
  the scale matrix, the gate and its bias, one FA and three LA heads."""
  _compare(rng, "rmsnorm_all", 1, True, K=head_dim)


@pytest.mark.parametrize("head_dim", [24, 128])
def test_lowers_for_cuda(head_dim):
  """Forward + all gradients with the GPU Config lower for CUDA (Triton IR verified, no GPU needed), also for a
  head dim that is not a power of two (Triton's tensor sizes are met by the op's zero padding)."""
  Hf, Hl, N = 2, 6, 64

  def loss(o_fa, o_la, fs, ls, z, zb):
    y = fused_head_fusion(o_fa, o_la, "scale_norm", fs, None, ls, z, zb, config=gpu_triton.Config())
    return jnp.sum(y.astype(jnp.float32))

  S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
  args = (S((1, N, Hf, head_dim), bf), S((1, N, Hl, head_dim), bf), S((Hf,), jnp.float32),
          S((Hl, head_dim), jnp.float32), S((1, N, Hl, head_dim), bf), S((Hl, head_dim), jnp.float32))
  with verified_triton_modules() as names:
    lower_for_cuda(jax.value_and_grad(loss, argnums=tuple(range(6))), *args)
  assert names == ["fusion_norm_fwd", "fusion_norm_bwd"]


def test_all_fa_layer(rng):
  """Only FA heads: no LA scale, no gate."""
  _compare(rng, "rmsnorm_all", H, False)


def test_all_la_layer(rng):
  """Only LA heads, gated without a bias; a large eps (it enters the norm's gradient)."""
  _compare(rng, "scale_norm", 0, True, eps=0.5, z_bias=False)


def test_bad_arguments(rng):
  a = _inputs(rng, "scale_norm", 1, True, jnp.float32)
  o_fa, o_la, fs, ls, z, zb = a["o_fa"], a["o_la"], a["fa_scale"], a["la_norm_scale"], a["z"], a["z_bias"]
  with pytest.raises(ValueError, match="variant"):
    fused_head_fusion(o_fa, o_la, "layernorm", fs, None, ls, z, zb)
  with pytest.raises(ValueError, match="la_norm_scale"):
    fused_head_fusion(o_fa, o_la, "scale_norm", fs, None, None, z, zb)
  with pytest.raises(ValueError, match="fa_norm_scale"):
    fused_head_fusion(o_fa, o_la, "scale_norm", fs, ls[:1], ls, z, zb)
  with pytest.raises(ValueError, match="z "):
    fused_head_fusion(o_fa, o_la, "scale_norm", fs, None, ls, z[:, :, :1], zb)
  with pytest.raises(ValueError, match="z_bias"):
    fused_head_fusion(o_fa, o_la, "scale_norm", fs, None, ls, None, zb)
  with pytest.raises(ValueError, match="differ"):
    fused_head_fusion(o_fa[:, :5], o_la, "scale_norm", fs, None, ls, z, zb)
  with pytest.raises(ValueError, match="both None"):
    fused_head_fusion(None, None, "none")


def test_mixer_uses_kernel_when_forced(rng, monkeypatch):
  """HydraHeadMixer with the fused kernel forced (interpret mode) equals its default (XLA) path."""
  from hydrahead_jax.nn import mixer as mixer_mod
  from hydrahead_jax.config import HeadLayout, ModelConfig
  from hydrahead_jax.nn.layers import rope_angles

  cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                    dtype="float32", la_chunk_size=8, la_output_gate=True, layout=HeadLayout.per_layer(1, [1]))
  seed = int(rng.integers(1 << 30))
  mixers = [mixer_mod.HydraHeadMixer(cfg.replace(fusion_implementation=impl), 1, rngs=nnx.Rngs(seed))
            for impl in ("xla", "pallas")]  # the same parameters, two kernel choices
  fa_scale = jnp.asarray(rng.normal(1.0, 0.5, mixers[0].fusion.fa_scale.shape), jnp.float32)
  la_norm_scale = jnp.asarray(rng.normal(1.0, 0.5, mixers[0].fusion.la_norm_scale.shape), jnp.float32)
  z_bias = jnp.asarray(rng.normal(0.0, 1.0, mixers[0].la.z_bias.shape), jnp.float32)
  for mixer in mixers:
    mixer.fusion.fa_scale[...], mixer.fusion.la_norm_scale[...], mixer.la.z_bias[...] = fa_scale, la_norm_scale, z_bias
  x = jnp.asarray(rng.normal(size=(1, 10, cfg.d_model)), jnp.float32)
  pos = jnp.arange(10, dtype=jnp.int32)[None]
  cos_sin = rope_angles(pos, cfg.head_dim, cfg.rope_theta)

  run = nnx.jit(lambda m, x: m(x, cos_sin, None))  # one jit: the kernel choice is part of the model's graphdef

  import pallas_kernels.fusion_norm as package
  calls = []
  monkeypatch.setattr(package, "fused_head_fusion", lambda *a, **k: calls.append(1) or fused_head_fusion(*a, **k))
  y_ref, raw_ref = run(mixers[0], x)
  assert not calls
  y, raw = run(mixers[1], x)
  assert calls
  np.testing.assert_array_equal(np.asarray(raw), np.asarray(raw_ref))
  assert _rel(y, y_ref) < 1e-5
