"""Transfer losses: per-layer normalised MSE (stage 1) and the KL + CE on next-token distributions (stages 2
and 3) from final hidden states.

The KD never materialises a vocabulary-sized tensor at full length: ``hydrahead_jax.losses`` projects one
sequence chunk at a time (custom VJP: the forward keeps one logsumexp per token, the backward recomputes the
chunk's logits), for the student's CE and for the KL between the teacher's and the student's distributions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hydrahead_jax import losses as chunked
from hydrahead_jax.nn.layers import rope_angles


def final_hidden(model, tokens_BxT, segment_ids_BxT=None, positions_BxT=None):
  """The final-normed hidden states [B, T, D] (``model(tokens)`` without the vocabulary projection)."""
  return model.hidden(tokens_BxT, segment_ids_BxT, positions_BxT)


# -- stage 1 --------------------------------------------------------------------------------------
def _nmse_sums(y_BxTxD, t_BxTxD, valid_BxT):
  d = (y_BxTxD.astype(jnp.float32) - t_BxTxD.astype(jnp.float32))
  t = t_BxTxD.astype(jnp.float32)
  return jnp.sum(jnp.sum(d * d, -1) * valid_BxT), jnp.sum(jnp.sum(t * t, -1) * valid_BxT)


def align_sums(student, mixer_in_LxBxTxD, mixer_out_LxBxTxD, segment_ids_BxT, positions_BxT, valid_BxT,
               remat: bool = False):
  """Per layer (sum ||mixer(x_l) - t_l||^2, sum ||t_l||^2) over valid tokens, every student mixer fed the
  teacher's layer input ``x_l``; layers are independent (no residual stream between them). [L], [L]."""
  cfg = student.cfg
  cos_sin = rope_angles(positions_BxT, cfg.head_dim, cfg.rope_theta)
  nums, dens = [], []

  def one(mixer, x, t):
    y, _ = mixer(x, cos_sin, segment_ids_BxT)
    return _nmse_sums(y, t, valid_BxT)

  for seg, stack in zip(student.segments_plan, student.segments):
    x = mixer_in_LxBxTxD[seg.start:seg.start + seg.length]
    t = mixer_out_LxBxTxD[seg.start:seg.start + seg.length]
    if seg.stacked:
      graphdef, state = nnx.split(stack.mixer)

      def body(carry, inp, graphdef=graphdef):
        st, x_l, t_l = inp
        return carry, one(nnx.merge(graphdef, st), x_l, t_l)

      if remat:
        body = jax.checkpoint(body)
      _, (n, d) = jax.lax.scan(body, None, (state, x, t))
    else:
      n, d = one(stack.mixer, x[0], t[0])
      n, d = n[None], d[None]
    nums.append(n)
    dens.append(d)
  return jnp.concatenate(nums), jnp.concatenate(dens)


# -- stages 2 and 3 -------------------------------------------------------------------------------
KD_STATS = ("kl_sum", "kl_tokens", "ce_sum", "ce_tokens", "answers", "answer_hits")


def kd_sums(h_student_BxTxD, proj_student, h_teacher_BxTxD, proj_teacher, targets_BxT, kl_w_BxT, ce_w_BxT,
            answer_BxT, *, temperature: float = 1.0, chunk: int = 512, compute_dtype=None) -> dict[str, jax.Array]:
  """Sums over tokens of ``kl_w * T^2 KL(softmax(t/T) || softmax(s/T))`` and ``ce_w * CE(s, target)``, the token
  counts (sums of the weights) and answer-token argmax hits. ``proj_*`` = ``model.output_projection()`` (weight,
  layout); ``h_teacher_BxTxD`` None: no KL (CE only)."""
  w_s, lay_s = proj_student
  ce, hit = chunked.chunked_cross_entropy(h_student_BxTxD, w_s, targets_BxT, w_layout=lay_s, chunk=chunk,
                                          compute_dtype=compute_dtype)
  out = {"ce_sum": jnp.sum(ce * ce_w_BxT), "ce_tokens": jnp.sum(ce_w_BxT), "answers": jnp.sum(answer_BxT),
         "answer_hits": jnp.sum(hit.astype(jnp.float32) * answer_BxT), "kl_tokens": jnp.sum(kl_w_BxT)}
  if h_teacher_BxTxD is None:
    out["kl_sum"] = jnp.zeros((), jnp.float32)
  else:
    w_t, lay_t = proj_teacher
    kl = chunked.chunked_kl_tokens(h_student_BxTxD, w_s, h_teacher_BxTxD, w_t, temperature=temperature, chunk=chunk,
                                   student_layout=lay_s, teacher_layout=lay_t, compute_dtype=compute_dtype)
    out["kl_sum"] = jnp.sum(kl * kl_w_BxT) * (temperature * temperature)
  return out
