"""Teacher -> student conversion: exact FA reuse and head permutation."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hydrahead_jax.config import HeadLayout, ModelConfig
from hydrahead_jax.transfer.surgery import convert_flat, student_config
from hydrahead_jax.nn.model import HydraHeadLM
from hydrahead_jax.interop.names import model_from_flat, model_to_flat

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=3, num_heads=8, num_kv_heads=4, head_dim=8, mlp_dim=64,
                  dtype="float32", la_chunk_size=8)


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
  # feed the teacher's layer inputs: FA heads of the student reproduce the teacher's per-head outputs
  for layer, groups in enumerate(layout.fa_groups):
    heads = [g * 2 + j for g in groups for j in range(2)]
    if not heads:
      continue
    _, s_inter = run(student, tok)
    if layer == 0:  # layer 0 input is identical (same embeddings), so outputs must match exactly
      np.testing.assert_allclose(s_inter["heads"][0, :, :, : len(heads)], t_inter["heads"][0][:, :, heads], atol=1e-5)
  la_wq = model_to_flat(student)["layers.0.mixer.la.wq"]
  np.testing.assert_array_equal(la_wq, tflat["layers.0.mixer.fa.wq"][:, [0, 1, 2, 3, 6, 7]])
