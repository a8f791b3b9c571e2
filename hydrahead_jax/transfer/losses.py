"""Transfer losses: per-layer normalised MSE (stage 1) and sequence-chunked KL + CE on next-token
distributions (stages 2 and 3).

The KD loss never materialises a vocabulary-sized tensor at full length: the student's and the teacher's final
hidden states [B, T, D] are cut into chunks of ``chunk`` positions, and one ``lax.scan`` step (rematerialised
in the backward pass) computes both chunks' logits [B, chunk, V], the KL, the CE and the argmax hits, keeping
only sums. ``hydrahead_jax.losses`` (plain training) was not there when this was written; the KL and the CE
share the student's log-softmax here, so one pass serves both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hydrahead_jax.nn.layers import rope_angles
from hydrahead_jax.nn.model import ACT_NAMES, positions_from_segments
from hydrahead_jax.sharding import constrain


# -- model pieces ---------------------------------------------------------------------------------
def default_positions(tokens_BxT, segment_ids_BxT, positions_BxT):
  if positions_BxT is not None:
    return positions_BxT
  if segment_ids_BxT is not None:
    return positions_from_segments(segment_ids_BxT)
  return jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1], dtype=jnp.int32), tokens_BxT.shape)


def final_hidden(model, tokens_BxT, segment_ids_BxT=None, positions_BxT=None):
  """The final-normed hidden states [B, T, D] (``model(tokens)`` without the unembedding; same code path)."""
  if hasattr(model, "hidden"):
    return model.hidden(tokens_BxT, segment_ids_BxT, positions_BxT)
  cfg = model.cfg
  positions = default_positions(tokens_BxT, segment_ids_BxT, positions_BxT)
  cos_sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
  x = constrain(model.embed(tokens_BxT), ACT_NAMES)
  for seg, stack in zip(model.segments_plan, model.segments):
    x, _ = model._run_segment(seg, stack, x, cos_sin, segment_ids_BxT, None, ())
  return model.final_norm(x)


def unembedding(model):
  """(weight, tied, compute dtype): tied = [V, D] embedding table, else the [D, V] LM head."""
  cfg = model.cfg
  if cfg.tie_embeddings:
    return model.embed.embedding[...], True, cfg.dtype
  return model.lm_head[...], False, cfg.dtype


def logits_of(h_BxTxD, unembed) -> jax.Array:
  """float32 logits exactly as ``HydraHeadLM`` computes them."""
  w, tied, dtype = unembed
  if tied:
    return jnp.einsum("btd,vd->btv", h_BxTxD.astype(dtype), w.astype(dtype)).astype(jnp.float32)
  return jnp.einsum("btd,dv->btv", h_BxTxD, w.astype(dtype)).astype(jnp.float32)


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


def chunked_kd(h_student_BxTxD, unembed_student, h_teacher_BxTxD, unembed_teacher, targets_BxT, kl_w_BxT, ce_w_BxT,
               answer_BxT, *, temperature: float = 1.0, chunk: int = 512) -> dict[str, jax.Array]:
  """Sums over tokens of ``kl_w * T^2 KL(softmax(t/T) || softmax(s/T))`` and ``ce_w * CE(s, target)``, with the
  token counts (sums of the weights) and answer-token argmax hits; logits exist one chunk at a time.

  ``h_teacher_BxTxD`` may be None (no KL: CE only).
  """
  B, T, D = h_student_BxTxD.shape
  c = min(chunk, T)
  n = -(-T // c)
  pad = n * c - T

  def split(x):
    if x is None:
      return None
    if pad:
      x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape(B, n, c, *x.shape[2:]), 0, 1)

  xs = (split(h_student_BxTxD), split(h_teacher_BxTxD), split(targets_BxT), split(kl_w_BxT), split(ce_w_BxT),
        split(answer_BxT))
  tau = float(temperature)

  @jax.checkpoint
  def body(carry, x):
    hs, ht, tgt, kw, cw, aw = x
    ls = logits_of(hs, unembed_student)
    lps = jax.nn.log_softmax(ls, -1)
    ce = -jnp.take_along_axis(lps, tgt[..., None], -1)[..., 0]
    hit = (jnp.argmax(ls, -1) == tgt).astype(jnp.float32)
    out = {"ce_sum": jnp.sum(ce * cw), "ce_tokens": jnp.sum(cw), "answers": jnp.sum(aw),
           "answer_hits": jnp.sum(hit * aw), "kl_tokens": jnp.sum(kw)}
    if ht is None:
      out["kl_sum"] = jnp.zeros((), jnp.float32)
    else:
      lt = jax.lax.stop_gradient(logits_of(ht, unembed_teacher))
      lpt = jax.nn.log_softmax(lt / tau, -1)
      lps_t = lps if tau == 1.0 else jax.nn.log_softmax(ls / tau, -1)
      kl = jnp.sum(jnp.exp(lpt) * (lpt - lps_t), -1) * (tau * tau)
      out["kl_sum"] = jnp.sum(kl * kw)
    return jax.tree.map(jnp.add, carry, out), None

  zero = {k: jnp.zeros((), jnp.float32) for k in KD_STATS}
  out, _ = jax.lax.scan(body, zero, xs)  # a None teacher is an empty pytree: the body sees None
  return out
