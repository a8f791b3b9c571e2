"""Teacher -> student conversion: exact FA reuse, head permutation and LA parameter reuse, on every layer."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hydrahead_jax.config import HeadLayout, ModelConfig
from hydrahead_jax.interop.names import model_from_flat, model_to_flat
from hydrahead_jax.nn.layers import rope_angles
from hydrahead_jax.nn.model import HydraHeadLM
from hydrahead_jax.transfer.surgery import convert_flat, head_order, student_config

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=3, num_heads=8, num_kv_heads=4, head_dim=8, mlp_dim=64,
                  dtype="float32", la_chunk_size=8, scan_layers=False)
R = CFG.heads_per_group


def test_conversion_reuses_fa_heads_exactly(rng):
  teacher = HydraHeadLM(CFG, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  tflat = model_to_flat(teacher)
  tok = jnp.asarray(rng.integers(0, 64, (2, 16)), jnp.int32)
  run = nnx.jit(lambda m, t: m.intermediates(t, ("heads", "mixer_in")))
  t_logits, t_inter = run(teacher, tok)

  # a permuted all-FA layout is still the teacher (W_o rows follow the heads)
  perm = student_config(CFG, HeadLayout(((3, 1, 0, 2),) * 3))
  np.testing.assert_allclose(run(model_from_flat(perm, convert_flat(tflat, perm)), tok)[0], t_logits, atol=1e-5)

  layout = HeadLayout(((2,), (0, 3), ()))
  scfg = student_config(CFG, layout)
  student = model_from_flat(scfg, convert_flat(tflat, scfg))
  sflat = model_to_flat(student)
  cos_sin = rope_angles(jnp.arange(16, dtype=jnp.int32)[None], CFG.head_dim, CFG.rope_theta)
  checked_fa = 0
  for layer in range(CFG.num_layers):
    fa_heads, la_heads = head_order(layout, layer, CFG.num_kv_heads, R)
    p = f"layers.{layer}."
    # every layer: fed the teacher's layer input, the student's FA heads reproduce the teacher's per-head outputs
    _, raw = student.segments[layer].mixer(t_inter["mixer_in"][layer], cos_sin, None)
    if len(fa_heads):
      np.testing.assert_allclose(raw[:, :, : len(fa_heads)], t_inter["heads"][layer][:, :, fa_heads], atol=1e-5,
                                 err_msg=f"layer {layer}")
      checked_fa += 1
    # LA heads take their own q slice and their group's k/v; W_o rows follow the new head order
    np.testing.assert_array_equal(sflat[p + "mixer.la.wq"], tflat[p + "mixer.fa.wq"][:, la_heads])
    np.testing.assert_array_equal(sflat[p + "mixer.la.wk"], tflat[p + "mixer.fa.wk"][:, la_heads // R])
    np.testing.assert_array_equal(sflat[p + "mixer.la.wv"], tflat[p + "mixer.fa.wv"][:, la_heads // R])
    np.testing.assert_array_equal(sflat[p + "mixer.wo"], tflat[p + "mixer.wo"][np.concatenate([fa_heads, la_heads])])
    for name in ("attn_norm.scale", "mlp_norm.scale", "mlp.w_gate", "mlp.w_up", "mlp.w_down"):
      np.testing.assert_array_equal(sflat[p + name], tflat[p + name])
  assert checked_fa == 2


def _output_and_grads(model, tok):
  def loss(m):
    y = m(tok)
    return jnp.mean(y ** 2), y

  (_, y), grads = nnx.value_and_grad(loss, has_aux=True)(model)
  return y, grads


def test_la_sharing_modes(rng):
  """Shared k/v (and gates) per KV group: fewer parameters, exact reuse of the teacher's group k/v, a forward and
  its gradients that are finite; the sharing equals per-head k/v copies at conversion (identical outputs)."""
  import jax

  teacher = HydraHeadLM(CFG, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  tflat = model_to_flat(teacher)
  tok = jnp.asarray(rng.integers(0, 64, (2, 16)), jnp.int32)
  layout = HeadLayout(((2,), (0, 3), ()))
  outs, params = {}, {}
  for mode in ("none", "kv", "kv_gates"):
    scfg = student_config(CFG, layout, la_sharing=mode)
    student = model_from_flat(scfg, convert_flat(tflat, scfg))
    params[mode] = student.num_params()
    sflat = model_to_flat(student)
    for layer in range(CFG.num_layers):
      _, la_heads = head_order(layout, layer, CFG.num_kv_heads, R)
      p = f"layers.{layer}."
      groups = la_heads // R if mode == "none" else la_heads[::R] // R
      np.testing.assert_array_equal(sflat[p + "mixer.la.wk"], tflat[p + "mixer.fa.wk"][:, groups])
      n_gates = len(la_heads) // R if mode == "kv_gates" else len(la_heads)
      assert sflat[p + "mixer.la.w_a"].shape == (CFG.d_model, n_gates)
    outs[mode], grads = nnx.jit(_output_and_grads)(student, tok)  # one program: the output and its gradients
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  # at conversion every head of a group copies the same k/v and starts with the same gates: sharing is exact
  np.testing.assert_allclose(outs["kv"], outs["none"], atol=1e-5)
  np.testing.assert_allclose(outs["kv_gates"], outs["none"], atol=1e-5)
  assert params["kv_gates"] < params["kv"] < params["none"]


def test_non_finite_calibration_is_one_error_and_leaves_the_student_untouched(rng, monkeypatch):
  """A kernel that returns NaN head outputs (as the old GDN inverse did on a GPU) must stop the conversion with one
  line naming the layers, before any scale is written (the run directory then has no converted model)."""
  import pytest

  from hydrahead_jax.transfer import calibrate

  teacher = HydraHeadLM(CFG, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  scfg = student_config(CFG, HeadLayout(((2,), (0, 3), ())))
  student = model_from_flat(scfg, convert_flat(model_to_flat(teacher), scfg))
  before = {k: np.asarray(v) for k, v in model_to_flat(student).items()}
  real = calibrate.student_fused_ms

  def nan_in_layer_1(student, batches, plan, **kw):
    ms, t_ms = real(student, batches, plan, **kw)
    return [m * np.nan if p[0] == 1 else m for m, p in zip(ms, plan)], t_ms

  monkeypatch.setattr(calibrate, "student_fused_ms", nan_in_layer_1)
  batches = [np.asarray(rng.integers(0, 64, (2, 16)), np.int32)]
  with pytest.raises(FloatingPointError, match=r"non-finite scales in layers \[1\]"):
    calibrate.calibrate_fusion(student, teacher, batches)
  after = model_to_flat(student)
  assert all(np.array_equal(before[k], np.asarray(after[k])) for k in before)
