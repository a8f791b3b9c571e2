"""Model-level tests: layouts, causality, exact FA reference, segment isolation, sharding, configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hydrahead_jax.config import HeadLayout, ModelConfig
from hydrahead_jax.nn.model import HydraHeadLM, create_model, plan_segments
from hydrahead_jax.interop.names import model_from_flat, model_to_flat

L, G = 4, 4
BASE = dict(vocab_size=64, d_model=32, num_layers=L, num_heads=8, num_kv_heads=G, head_dim=8, mlp_dim=64,
            dtype="float32", la_chunk_size=8, rope_theta=10_000.0)

LAYOUTS = {
    "all_fa": HeadLayout.all_fa(L, G),
    "all_la": HeadLayout.all_la(L),
    "layerwise_3to1": HeadLayout.layerwise(L, G, every=4),
    "head_7to1_like": HeadLayout.per_layer(L, [2]),
    "head_mixed": HeadLayout(((0,), (1, 3), (1, 3), ())),
}


def make(layout, seed=0, **kw):
  cfg = ModelConfig(**{**BASE, **kw, "layout": layout})
  return HydraHeadLM(cfg, rngs=nnx.Rngs(seed))


def tokens(rng, B=2, T=20):
  return jnp.asarray(rng.integers(0, BASE["vocab_size"], (B, T)), jnp.int32)


@nnx.jit
def forward(model, tok, seg):
  return model(tok, seg)


@nnx.jit
def loss_and_grad(model, tok):
  def loss_fn(m):
    logits = m(tok)
    return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].max(-1)), logits
  return nnx.value_and_grad(loss_fn, has_aux=True)(model)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_causal_and_finite_grads(name, rng):
  """Forward + backward under jit for every layout; outputs never depend on future tokens."""
  model = make(LAYOUTS[name])
  tok = tokens(rng)
  (loss, base), grads = loss_and_grad(model, tok)
  leaves = jax.tree.leaves(grads)
  assert np.isfinite(float(loss)) and all(bool(jnp.isfinite(g).all()) for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
  s = 11
  tok2 = tok.at[:, s].set((tok[:, s] + 1) % BASE["vocab_size"])
  (_, pert), _ = loss_and_grad(model, tok2)
  np.testing.assert_allclose(pert[:, :s], base[:, :s], atol=1e-5, rtol=0)
  assert float(jnp.abs(pert[:, s:] - base[:, s:]).max()) > 1e-4  # the future does change


def _dense_reference_layer(x, p, cfg):
  """Plain numpy causal GQA attention with QK-norm and RoPE (rotate-half), then W_o."""
  x = np.asarray(x, np.float64)
  T, K, r = x.shape[1], cfg.head_dim, cfg.heads_per_group
  def rms(a, w):
    return a / np.sqrt((a * a).mean(-1, keepdims=True) + cfg.rms_eps) * w
  q = rms(np.einsum("btd,dhk->bthk", x, p["mixer.fa.wq"]), p["mixer.fa.q_norm.scale"])
  k = rms(np.einsum("btd,dgk->btgk", x, p["mixer.fa.wk"]), p["mixer.fa.k_norm.scale"])
  v = np.einsum("btd,dgk->btgk", x, p["mixer.fa.wv"])
  inv = cfg.rope_theta ** (-np.arange(0, K, 2) / K)
  ang = np.arange(T)[:, None] * inv
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
  rot = lambda a: a * cos[None, :, None] + np.concatenate([-a[..., K // 2:], a[..., :K // 2]], -1) * sin[None, :, None]
  q, k = rot(q), rot(k)
  k, v = np.repeat(k, r, axis=2), np.repeat(v, r, axis=2)
  s = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(K)
  s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  o = np.einsum("bhts,bshk->bthk", a, v) * p["mixer.fusion.fa_scale"][:, None]
  return np.einsum("bthk,hkd->btd", o, p["mixer.wo"])


def test_all_fa_mixer_equals_dense_reference(rng):
  model = make(LAYOUTS["all_fa"])
  cfg = model.cfg
  flat = model_to_flat(model)
  # random (non-trivial) norm scales and fusion scales so every parameter matters
  for n in list(flat):
    if n.startswith("layers.0.") and ("norm.scale" in n or "fa_scale" in n):
      flat[n] = rng.uniform(0.5, 1.5, flat[n].shape).astype(np.float32)
  model = model_from_flat(cfg, flat)
  _, logits_inter = nnx.jit(lambda m, t: m.intermediates(t, ("mixer_in", "mixer_out")))(model, tokens(rng, 2, 12))
  # the model's own layer-0 mixer input/output vs a float64 numpy attention on the same input
  p0 = {k[len("layers.0."):]: v.astype(np.float64) for k, v in flat.items() if k.startswith("layers.0.")}
  ref = _dense_reference_layer(np.asarray(logits_inter["mixer_in"][0]), p0, cfg)
  np.testing.assert_allclose(np.asarray(logits_inter["mixer_out"][0]), ref, rtol=1e-4, atol=1e-5)


def test_segment_isolation(rng):
  """A packed document's logits do not depend on the document before it (FA mask, LA state, conv)."""
  model = make(LAYOUTS["head_mixed"])
  a, a2, b = tokens(rng, 1, 13), tokens(rng, 1, 13), tokens(rng, 1, 7)
  seg = jnp.asarray([[1] * 13 + [2] * 7], jnp.int32)
  out = forward(model, jnp.concatenate([a, b], axis=1), seg)
  out2 = forward(model, jnp.concatenate([a2, b], axis=1), seg)
  np.testing.assert_allclose(out2[:, 13:], out[:, 13:], atol=2e-5, rtol=1e-4)
  assert float(jnp.abs(out2[:, :13] - out[:, :13]).max()) > 1e-4
  # the same document at the start of a row (positions restart at 0 either way)
  out3 = forward(model, jnp.concatenate([b, a], axis=1), jnp.asarray([[1] * 7 + [2] * 13], jnp.int32))
  np.testing.assert_allclose(out3[:, :7], out[:, 13:], atol=2e-5, rtol=1e-4)


def test_scanned_equals_unrolled_and_flat_roundtrip(rng):
  layout = LAYOUTS["head_mixed"]
  scanned = make(layout, scan_layers=True)
  assert len(plan_segments(scanned.cfg)) == 3  # (0,), (1,3)x2 stacked, ()
  unrolled = model_from_flat(scanned.cfg.replace(scan_layers=False), model_to_flat(scanned))
  tok = tokens(rng)
  np.testing.assert_allclose(forward(scanned, tok, None), forward(unrolled, tok, None), atol=1e-5, rtol=1e-5)
  back = model_to_flat(unrolled)
  for k, v in model_to_flat(scanned).items():
    np.testing.assert_array_equal(back[k], v)


def test_head_patch_and_intermediates(rng):
  model = make(LAYOUTS["head_mixed"])
  tok = tokens(rng)
  run = nnx.jit(lambda m, t, p: m.intermediates(t, ("heads",), head_patch=p))
  H = model.cfg.num_heads
  zero_mask = jnp.zeros((L, H))
  logits, inter = run(model, tok, (zero_mask, jnp.zeros((L, 2, 20, H, 8))))
  assert inter["heads"].shape == (L, 2, 20, H, 8)
  # patching every head with its own clean value changes nothing
  same, _ = run(model, tok, (jnp.ones((L, H)), inter["heads"]))
  np.testing.assert_allclose(same, logits, atol=1e-5)
  # patching one head with noise changes the output
  mask = zero_mask.at[1, 3].set(1.0)
  noisy, _ = run(model, tok, (mask, inter["heads"] + 1.0))
  assert float(jnp.abs(noisy - logits).max()) > 1e-3


def test_sharded_matches_unsharded(rng):
  layout = LAYOUTS["head_mixed"]
  cfg = ModelConfig(**{**BASE, "layout": layout})
  ref_model = create_model(cfg, seed=3)
  tok = tokens(rng, B=4, T=16)
  ref = forward(ref_model, tok, None)
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    model = create_model(cfg, seed=3, mesh=mesh)
    wq = model.segments[1].mixer.la.wq[...]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)  # layers, embed, heads, head_dim
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    out = forward(model, jax.device_put(tok, batch_sharding), None)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4, rtol=1e-4)


def test_kernels_run_per_shard(rng, monkeypatch):
  """Under a data x fsdp x tensor mesh the Pallas GDN and short-conv kernels (interpret mode) run on each device's
  batch rows and heads, the fusion kernel and cuDNN attention on their batch rows (shard_map), and the mixer's
  output and input gradient equal the unsharded ones."""
  import pallas_kernels.short_conv as conv_package
  from hydrahead_jax.nn import attention as attention_mod, gated_deltanet as gdn_mod, mixer as mixer_mod
  from hydrahead_jax.nn.layers import rope_angles

  cfg = ModelConfig(**{**BASE, "num_heads": 8, "num_kv_heads": 4, "layout": HeadLayout.per_layer(1, [2]),
                       "num_layers": 1, "la_implementation": "pallas", "conv_implementation": "pallas",
                       "fusion_implementation": "pallas"})
  layer = mixer_mod.HydraHeadMixer(cfg, 2, rngs=nnx.Rngs(int(rng.integers(1 << 30))))  # 4 FA + 4 LA heads
  B, T = 4, 16
  x = jnp.asarray(rng.normal(size=(B, T, cfg.d_model)), jnp.float32)
  seg = jnp.asarray(np.cumsum(rng.random((B, T)) < 0.2, axis=1), jnp.int32)
  cos_sin = rope_angles(jnp.arange(T, dtype=jnp.int32)[None], cfg.head_dim, cfg.rope_theta)
  shapes = []
  real_gdn, real_conv = gdn_mod.gated_delta_rule, conv_package.short_conv
  monkeypatch.setattr(gdn_mod, "gated_delta_rule", lambda q, *a, **k: shapes.append(("gdn", q.shape)) or
                      real_gdn(q, *a, **k))
  monkeypatch.setattr(conv_package, "short_conv", lambda x, *a, **k: shapes.append(("conv", x.shape)) or
                      real_conv(x, *a, **k))
  import pallas_kernels.fusion_norm as fusion_package
  real_fusion = fusion_package.fused_head_fusion
  monkeypatch.setattr(fusion_package, "fused_head_fusion", lambda o_fa, *a, **k: shapes.append(("fusion", o_fa.shape))
                      or real_fusion(o_fa, *a, **k))
  # The cuDNN attention path (per batch-row shard on GPU), with XLA attention standing in for cuDNN on the CPU.
  real_attention = jax.nn.dot_product_attention
  monkeypatch.setattr(attention_mod, "attention_implementation", lambda *a: "cudnn")
  monkeypatch.setattr(jax.nn, "dot_product_attention", lambda q, *a, implementation, **k: shapes.append(
      ("attention", q.shape, implementation)) or real_attention(q, *a, implementation="xla", **k))

  def run(x):  # a fresh jit per mesh
    def loss(x):
      y = layer(x, cos_sin, seg)[0]
      return jnp.sum(y * y), y
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(x)

  (_, y_ref), dx_ref = run(x)
  assert ("gdn", (B, T, 4, cfg.head_dim)) in shapes
  shapes.clear()
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    (_, y), dx = run(x)
  # per device: batch / (data x fsdp), LA heads / tensor
  assert ("gdn", (1, T, 2, cfg.head_dim)) in shapes, shapes
  assert ("conv", (1, T, 2 * cfg.head_dim)) in shapes, shapes
  assert ("fusion", (1, T, 4, cfg.head_dim)) in shapes, shapes  # batch rows only
  assert ("attention", (1, T, 4, cfg.head_dim), "cudnn") in shapes, shapes  # batch rows only
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=2e-4, atol=2e-4)


def test_cudnn_path_skips_the_mask_only_for_one_document_rows(rng, monkeypatch):
  """cuDNN takes a segment mask as a dense T x T bias: with every row one document it runs without it (a run-time
  branch), with packed documents the mask still isolates them. XLA attention stands in for cuDNN on the CPU and
  records whether the executed branch passed a mask."""
  from hydrahead_jax.nn import attention as attention_mod
  from hydrahead_jax.nn.layers import rope_angles

  real_attention = jax.nn.dot_product_attention
  monkeypatch.setattr(attention_mod, "attention_implementation", lambda *a: "cudnn")
  calls = []

  def fake(q, k, v, *a, implementation, mask=None, **kw):
    jax.debug.callback(lambda: calls.append(mask is not None))  # runs only in the branch taken
    return real_attention(q, k, v, *a, mask=mask, implementation="xla", **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  cfg = ModelConfig(**{**BASE, "layout": HeadLayout.all_fa(1, G), "num_layers": 1})
  fa = attention_mod.FullAttention(cfg, G, rngs=nnx.Rngs(0))
  B, T = 2, 12
  x = jnp.asarray(rng.normal(size=(B, T, cfg.d_model)), jnp.float32)
  cos_sin = rope_angles(jnp.arange(T, dtype=jnp.int32)[None], cfg.head_dim, cfg.rope_theta)
  run = nnx.jit(lambda fa, x, seg: fa(x, cos_sin, seg))
  one = jnp.asarray([[3] * T, [5] * T], jnp.int32)  # one document per row (different ids per row)
  packed = jnp.asarray([[1] * 5 + [2] * 7, [4] * T], jnp.int32)
  calls.clear()
  np.testing.assert_allclose(np.asarray(run(fa, x, one)), np.asarray(run(fa, x, None)), rtol=1e-5, atol=1e-6)
  assert calls == [False, False], calls  # the one-document call took the mask-free branch (then the None call)
  calls.clear()
  out = np.asarray(run(fa, x, packed))
  assert calls == [True], calls
  mixed = np.asarray(run(fa, x, one))
  np.testing.assert_allclose(out[1], mixed[1], rtol=1e-5, atol=1e-6)  # row 1 is one document either way
  np.testing.assert_allclose(out[0, :5], mixed[0, :5], rtol=1e-5, atol=1e-6)  # causal: the first document
  assert float(np.abs(out[0, 5:] - mixed[0, 5:]).max()) > 1e-4  # the second document does not see the first


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(layout=HeadLayout(((0,), (4,), (), ()))), "layout.fa_groups[1]"),
        (dict(num_heads=6), "model.num_heads"),
        (dict(layout=HeadLayout(((0,), ()))), "layout.fa_groups"),
        (dict(fusion="layernorm"), "model.fusion"),
        (dict(remat="sometimes"), "model.remat"),
        (dict(d_model=0), "model.d_model"),
        (dict(fa_context_algorithm="ring"), "model.fa_context_algorithm"),
        (dict(fa_packed_implementation="dense"), "model.fa_packed_implementation"),
    ],
)
def test_bad_config_errors(kw, field):
  with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
    ModelConfig(**{**BASE, **kw})
