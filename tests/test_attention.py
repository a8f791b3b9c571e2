"""FA on packed rows: segment-aware Pallas flash attention (jax's Pallas GPU op, interpret mode on the CPU) against
the dense-mask reference, the model's run-time dispatch, its per-shard run under a mesh, and its CUDA lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hydrahead_jax.config import HeadLayout, ModelConfig
from hydrahead_jax.nn import attention as attention_mod
from hydrahead_jax.nn.layers import rope_angles
from pallas_kernels.lower_check import lower_for_cuda, verified_triton_modules


def packed_segments(rng, B, T, docs=4):
  """Sorted segment ids with ~docs documents per row (the first row always several)."""
  cuts = rng.random((B, T)) < docs / T
  cuts[0, T // 3] = cuts[0, 2 * T // 3] = True
  cuts[:, 0] = False
  return jnp.asarray(np.cumsum(cuts, axis=1) + 7 * np.arange(B)[:, None], jnp.int32)


def masked_reference(q, k, v, seg, scale):
  """The dense path: XLA attention with the [B, 1, T, T] segment mask (native GQA)."""
  return jax.nn.dot_product_attention(q, k, v, mask=attention_mod.segment_mask(seg), is_causal=True, scale=scale,
                                      implementation="xla")


def rel_rmse(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))


@pytest.mark.parametrize("dtype, K, T, tol", [
    ("float32", 24, 128, (1e-5, 1e-4)),  # head dim padded to 32 inside the kernel
    ("float32", 32, 200, (1e-5, 1e-4)),  # T padded to 256 (exact under causality)
    ("bfloat16", 32, 128, (8e-3, 1.5e-2)),  # measured ~2e-3 / ~4e-3
], ids=["f32-K24", "f32-K32-T200", "bf16-K32"])
def test_pallas_packed_matches_masked_reference(rng, dtype, K, T, tol):
  B, H, G = 2, 4, 2
  dt = jnp.dtype(dtype)
  q, k, v = (jnp.asarray(rng.normal(size=(B, T, h, K)), dt) for h in (H, G, G))
  seg = packed_segments(rng, B, T)
  ct = jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32)
  scale = K**-0.5

  def loss(fn, *qkv):
    o = fn(*qkv)
    return jnp.sum(o.astype(jnp.float32) * ct), o

  pallas = lambda q, k, v: attention_mod.pallas_packed_attention(q, k, v, seg, scale=scale)  # noqa: E731
  (_, o), grads = jax.jit(jax.value_and_grad(lambda *a: loss(pallas, *a), argnums=(0, 1, 2), has_aux=True))(q, k, v)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]  # the reference in f32 on the same (rounded) inputs
  (_, o_ref), grads_ref = jax.value_and_grad(
      lambda *a: loss(lambda q, k, v: masked_reference(q, k, v, seg, scale), *a), argnums=(0, 1, 2),
      has_aux=True)(*f32)
  assert o.dtype == dt and o.shape == (B, T, H, K)
  assert rel_rmse(o, o_ref) < tol[0], rel_rmse(o, o_ref)
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    assert g.shape == g_ref.shape
    assert rel_rmse(g, g_ref) < tol[1], (name, rel_rmse(g, g_ref))


def _fake_cudnn(monkeypatch):
  """cuDNN chosen on the CPU, XLA attention standing in for it; records (kernel, mask given, q shape) per executed
  call (jax.debug.callback: only the branch taken at run time)."""
  calls = []
  real_attention, real_pallas = jax.nn.dot_product_attention, attention_mod.pallas_packed_attention
  monkeypatch.setattr(attention_mod, "attention_implementation", lambda *a: "cudnn")

  def fake(q, k, v, *a, implementation, mask=None, **kw):
    jax.debug.callback(lambda: calls.append(("cudnn", mask is not None, q.shape)))
    return real_attention(q, k, v, *a, mask=mask, implementation="xla", **kw)

  def pallas(q, *a, **kw):
    jax.debug.callback(lambda: calls.append(("pallas", False, q.shape)))
    return real_pallas(q, *a, **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  monkeypatch.setattr(attention_mod, "pallas_packed_attention", pallas)
  return calls


def _layer(packed_impl, heads=4, groups=2):
  cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=heads, num_kv_heads=groups, head_dim=24,
                    mlp_dim=64, dtype="float32", rope_theta=10_000.0, layout=HeadLayout.all_fa(1, groups),
                    fa_packed_implementation=packed_impl)
  return cfg, attention_mod.FullAttention(cfg, groups, rngs=nnx.Rngs(0))


def test_cudnn_path_takes_pallas_for_packed_rows(rng, monkeypatch):
  """On the cuDNN path packed rows run the Pallas kernel ('pallas'; auto beyond PACKED_MASK_MAX_T) and equal the
  dense-mask path ('mask'; auto up to it), gradients too; rows of one document each still run cuDNN without a
  mask."""
  from hydrahead_jax.ops import packed_attention as packed_mod

  calls = _fake_cudnn(monkeypatch)
  cfg, fa = _layer("pallas")
  _, fa_mask = _layer("mask")  # the same weights (same seed)
  B, T = 2, 128
  x = jnp.asarray(rng.normal(size=(B, T, cfg.d_model)), jnp.float32)
  cos_sin = rope_angles(jnp.arange(T, dtype=jnp.int32)[None], cfg.head_dim, cfg.rope_theta)

  @nnx.jit
  def run(fa, x, seg):
    def loss(x):
      y = fa(x, cos_sin, seg)
      return jnp.sum(y * y), y
    return jax.value_and_grad(loss, has_aux=True)(x)

  packed = packed_segments(rng, B, T)
  (_, y), dx = run(fa, x, packed)
  assert [c[0] for c in calls] == ["pallas"], calls  # the forward (the backward is the kernel's own)
  calls.clear()
  (_, y_ref), dx_ref = run(fa_mask, x, packed)
  assert calls == [("cudnn", True, (B, T, 4, 24))], calls
  assert rel_rmse(y, y_ref) < 1e-5 and rel_rmse(dx, dx_ref) < 1e-4, (rel_rmse(y, y_ref), rel_rmse(dx, dx_ref))
  calls.clear()
  one = jnp.asarray([[3] * T, [5] * T], jnp.int32)
  run(fa, x, one)
  assert calls == [("cudnn", False, (B, T, 4, 24))], calls  # one document per row: cuDNN without a mask
  assert packed_mod.packed_implementation(None, 127) == "mask"
  assert packed_mod.packed_implementation(None, packed_mod.PACKED_MASK_MAX_T) == "mask"
  assert packed_mod.packed_implementation(None, packed_mod.PACKED_MASK_MAX_T + 1) == "pallas"
  assert packed_mod.packed_implementation("mask", 65536) == "mask"


def test_pallas_packed_path_runs_per_shard(rng, monkeypatch):
  """Under a data x fsdp x tensor mesh the Pallas kernel runs on each device's batch rows (shard_map; heads whole)
  and the output and input gradient equal the unsharded ones."""
  calls = _fake_cudnn(monkeypatch)
  cfg, fa = _layer("pallas")
  B, T = 4, 128
  x = jnp.asarray(rng.normal(size=(B, T, cfg.d_model)), jnp.float32)
  seg = packed_segments(rng, B, T)
  cos_sin = rope_angles(jnp.arange(T, dtype=jnp.int32)[None], cfg.head_dim, cfg.rope_theta)

  def run(x):  # a fresh jit per mesh
    def loss(x):
      y = fa(x, cos_sin, seg)
      return jnp.sum(y * y), y
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(x)

  (_, y_ref), dx_ref = run(x)
  assert calls == [("pallas", False, (B, T, 4, 24))], calls
  calls.clear()
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    (_, y), dx = run(x)
  assert calls and set(calls) == {("pallas", False, (1, T, 4, 24))}, calls  # batch rows per device
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=2e-4, atol=2e-4)


def test_pallas_packed_path_lowers_for_cuda():
  """Forward and backward of the packed path at a Qwen3-0.6B FA shape (16 query heads, 8 KV groups, head dim 128,
  bf16, T = 4096) build verified Triton IR for CUDA from the CPU."""
  B, T, H, G, K = 1, 4096, 16, 8, 128

  def loss(q, k, v, seg):
    o = attention_mod.pallas_packed_attention(q, k, v, seg, scale=K**-0.5, interpret=False)
    return jnp.sum(o.astype(jnp.float32))

  S = jax.ShapeDtypeStruct
  args = (S((B, T, H, K), jnp.bfloat16), S((B, T, G, K), jnp.bfloat16), S((B, T, G, K), jnp.bfloat16),
          S((B, T), jnp.int32))
  with verified_triton_modules() as names:
    lower_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 2)), *args)
  assert names == ["mha_forward", "mha_preprocess_backward", "mha_backward"], names
