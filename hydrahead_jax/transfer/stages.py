"""The jitted train steps of the transfer stages and their trainable-parameter plans.

State (what a stage checkpoints): ``{"params": trainable flat params, "opt_state", "step"}``. Parameters that
no phase of the stage trains are not in the state at all: they are arguments of the step (never differentiated,
never written), so they stay bit-identical and cost no optimizer memory. A stage may have several phases (a
``trainable_schedule``, e.g. mixers first, then everything): the optimizer covers the union of the phases'
parameters and each phase has its own compiled step, which differentiates only that phase's parameters and
keeps every other one (and every frozen layer of a stacked tensor) exactly as it was.

Kinds:
- ``align``: the frozen teacher's layer inputs (``mixer_in``) feed every student mixer; loss = mean over layers
  of ``sum ||mixer_l(x_l) - teacher mixer_out_l||^2 / sum ||teacher mixer_out_l||^2`` over the batch's tokens.
  All layers in one step, independently: the student's residual stream, MLPs and head never run.
- ``distil`` / ``long``: teacher and student forward in the same step (teacher under stop_gradient, its own
  dtype); loss = ``kl_weight * mean KL + ce_weight * mean CE`` with the chunked KD of ``transfer.losses``.
  ``teacher_window``: KL only at positions < window, CE only at positions >= window.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hydrahead_jax.train import optim
from hydrahead_jax.train.state import merge
from hydrahead_jax.train.step import BATCH_KEYS, global_norm, microbatches
from hydrahead_jax.transfer import losses
from hydrahead_jax.transfer.config import StageConfig, TransferConfigError, phases

MIXER = "layers.*.mixer.*"


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """Which flat keys train in which phase (``mask[k]``: None = every layer, else a bool per stacked layer)."""

  starts: tuple[int, ...]
  masks: tuple[dict[str, np.ndarray | None], ...]  # per phase: trainable keys of that phase
  union: tuple[str, ...]  # keys trained in some phase (the optimizer's keys), sorted
  decay: dict[str, bool]

  def phase_at(self, step: int) -> int:
    return max(i for i, s in enumerate(self.starts) if s <= step)

  def num_trainable(self, phase: int, shapes: Mapping[str, tuple[int, ...]]) -> int:
    total = 0
    for k, m in self.masks[phase].items():
      n = int(np.prod(shapes[k]))
      total += n if m is None else n * int(m.sum()) // len(m)
    return total


def make_plan(stage: StageConfig, names: Mapping[str, tuple[str, ...]]) -> StagePlan:
  """The stage's phases from its patterns; a pattern matching no parameter is a ``TransferConfigError``."""
  starts, masks, decay = [], [], {}
  key = f"stages.{stage.name}." + ("trainable_schedule" if stage.trainable_schedule else "optim.trainable")
  for start, pats in phases(stage):
    try:
      plan = optim.plan_params(dataclasses.replace(stage.optim, trainable=tuple(pats)), names)
    except ValueError as e:
      raise TransferConfigError(f"transfer config key {key!r}: {e}") from None
    m = {k: plan.layer_mask[k] for k, lab in plan.label.items() if lab == optim.TRAIN}
    if stage.kind == "align":
      bad = sorted(n for k in m for n in names[k] if not fnmatch.fnmatchcase(n, MIXER))
      if bad:
        raise TransferConfigError(f"transfer config key {key!r}: stage kind 'align' trains mixer parameters only "
                                  f"({MIXER}); patterns {list(pats)} also select {bad[0]!r}")
    starts.append(start)
    masks.append(m)
    decay.update(plan.decay)
  union = tuple(sorted(set().union(*masks)))
  return StagePlan(tuple(starts), tuple(masks), union, decay)


def make_optimizer(stage: StageConfig, plan: StagePlan) -> tuple[optax.GradientTransformation, Callable]:
  """Clipping + AdamW (warmup-cosine) over the union of the phases' parameters (masks are applied by the step)."""
  union_plan = optim.ParamPlan(label={k: optim.TRAIN for k in plan.union}, layer_mask={k: None for k in plan.union},
                               decay={k: plan.decay[k] for k in plan.union})
  return optim.make_optimizer(stage.optim, union_plan, stage.steps)


def _layer_mask(m: np.ndarray | None, x: jax.Array):
  return None if m is None else jnp.asarray(m).reshape((-1,) + (1,) * (x.ndim - 1))


# -- losses per kind ------------------------------------------------------------------------------
def _align_loss(graphdef, rest, t_graphdef, t_rest, stage: StageConfig, remat: bool):
  def loss(params, teacher_params, mb, num_micro):
    teacher = merge(t_graphdef, teacher_params, t_rest)
    _, inter = teacher.intermediates(mb["inputs"], ("mixer_in", "mixer_out"), mb["segment_ids"], mb["positions"])
    x, t = jax.lax.stop_gradient(inter["mixer_in"]), jax.lax.stop_gradient(inter["mixer_out"])
    student = merge(graphdef, params, rest)
    valid = (mb["segment_ids"] > 0).astype(jnp.float32)
    num, den = losses.align_sums(student, x, t, mb["segment_ids"], mb["positions"], valid, remat=remat)
    nmse = num / jnp.maximum(den, 1e-30)
    return jnp.mean(nmse) / num_micro, {"nmse": nmse / num_micro, "tokens": jnp.sum(valid)}

  return loss


def kd_weights(mb, stage: StageConfig):
  """(KL weights, CE weights) per token: loss_mask, split at the teacher window; answers weighted in the CE.
  The stage's kl_weight / ce_weight multiply the two means, not these."""
  mask = mb["loss_mask"]
  kl_w = mask
  ce_w = mask * (1.0 + (stage.answer_weight - 1.0) * mb["answer_mask"])
  if stage.teacher_window is not None:
    inside = (mb["positions"] < stage.teacher_window).astype(jnp.float32)
    kl_w, ce_w = kl_w * inside, ce_w * (1.0 - inside)
  return kl_w, ce_w


def _kd_loss(graphdef, rest, t_graphdef, t_rest, stage: StageConfig):
  use_teacher = stage.kl_weight > 0

  def loss(params, teacher_params, mb, denoms):
    student = merge(graphdef, params, rest)
    h_s = losses.final_hidden(student, mb["inputs"], mb["segment_ids"], mb["positions"])
    h_t = p_t = None
    if use_teacher:
      teacher = merge(t_graphdef, teacher_params, t_rest)
      h_t = jax.lax.stop_gradient(losses.final_hidden(teacher, mb["inputs"], mb["segment_ids"], mb["positions"]))
      w_t, lay_t = teacher.output_projection()
      p_t = (jax.lax.stop_gradient(w_t), lay_t)
    kl_w, ce_w = kd_weights(mb, stage)
    s = losses.kd_sums(h_s, student.output_projection(), h_t, p_t, mb["targets"], kl_w, ce_w, mb["answer_mask"],
                       temperature=stage.temperature, chunk=stage.logits_chunk, compute_dtype=student.cfg.dtype)
    total = stage.kl_weight * s["kl_sum"] / denoms[0] + stage.ce_weight * s["ce_sum"] / denoms[1]
    return total, s

  return loss


# -- the step -------------------------------------------------------------------------------------
def make_step(stage: StageConfig, plan: StagePlan, phase: int, graphdef, rest, t_graphdef, t_rest,
              tx: optax.GradientTransformation, schedule: Callable, remat_align: bool = False) -> Callable:
  """``step(state, frozen_params, teacher_params, batch) -> (state, metrics)`` for one phase."""
  mask = plan.masks[phase]
  phase_keys = tuple(sorted(mask))
  n_micro = stage.grad_accum
  if stage.kind == "align":
    loss_fn = _align_loss(graphdef, rest, t_graphdef, t_rest, stage, remat_align)
  else:
    loss_fn = _kd_loss(graphdef, rest, t_graphdef, t_rest, stage)

  def microbatch_loss(phase_params, other_params, teacher_params, mb, aux):
    return loss_fn({**other_params, **phase_params}, teacher_params, mb, aux)

  grad_fn = jax.value_and_grad(microbatch_loss, has_aux=True)

  def step(state, frozen, teacher_params, batch):
    params = state["params"]
    phase_p = {k: params[k] for k in phase_keys}
    other = {**frozen, **{k: v for k, v in params.items() if k not in mask}}
    if stage.kind == "align":
      aux = float(n_micro)
    else:
      kl_w, ce_w = kd_weights(batch, stage)
      aux = (jnp.maximum(jnp.sum(kl_w), 1e-9), jnp.maximum(jnp.sum(ce_w), 1e-9))
    mb_all = {k: batch[k] for k in BATCH_KEYS}
    if n_micro == 1:
      (loss, stats), g_phase = grad_fn(phase_p, other, teacher_params, mb_all, aux)
    else:
      mbs = microbatches(mb_all, n_micro)
      zeros = jax.tree.map(jnp.zeros_like, phase_p)
      first = jax.tree.map(lambda x: x[0], mbs)
      stats_shape = jax.eval_shape(lambda: grad_fn(phase_p, other, teacher_params, first, aux)[0][1])
      zero_stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape)

      def body(carry, mb):
        g_acc, s_acc, l_acc = carry
        (l, st), g = grad_fn(phase_p, other, teacher_params, mb, aux)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, st), l_acc + l), None

      (g_phase, stats, loss), _ = jax.lax.scan(body, (zeros, zero_stats, jnp.zeros((), jnp.float32)), mbs)
    grads = {}
    for k in plan.union:  # the optimizer's keys; zero gradient outside this phase
      if k in mask:
        lm = _layer_mask(mask[k], g_phase[k])
        grads[k] = g_phase[k] if lm is None else g_phase[k] * lm.astype(g_phase[k].dtype)
      else:
        grads[k] = jnp.zeros_like(params[k])
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    stepped = optax.apply_updates(params, updates)
    new_params = {}
    for k in plan.union:  # exactly the old value wherever this phase does not train
      if k not in mask:
        new_params[k] = params[k]
      else:
        lm = _layer_mask(mask[k], params[k])
        new_params[k] = stepped[k] if lm is None else jnp.where(lm, stepped[k], params[k])
    grad_norm = global_norm(grads)
    param_norm = global_norm(new_params)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = {"params": keep(new_params, params), "opt_state": keep(opt_state, state["opt_state"]),
                 "step": state["step"] + ok.astype(state["step"].dtype)}
    metrics = {"loss": loss, "grad_norm": grad_norm, "param_norm": param_norm,
               "lr": jnp.asarray(schedule(state["step"]), jnp.float32), "ok": ok.astype(jnp.int32), **stats}
    return new_state, metrics

  return step


def host_metrics(stage: StageConfig, m: Mapping[str, Any]) -> dict[str, Any]:
  """Device metrics -> the logged row (means instead of sums)."""
  m = jax.device_get(dict(m))
  out = {k: float(m[k]) for k in ("loss", "grad_norm", "param_norm", "lr")}
  out["ok"] = int(m["ok"])
  if stage.kind == "align":
    nmse = np.asarray(m["nmse"], np.float64)
    out.update({"nmse_mean": float(nmse.mean()), "nmse_max": float(nmse.max()),
                "nmse_per_layer": [round(float(x), 6) for x in nmse]})
  else:
    if stage.kl_weight > 0 and float(m["kl_tokens"]) > 0:
      out["kl"] = float(m["kl_sum"]) / float(m["kl_tokens"])
    if float(m["ce_tokens"]) > 0:
      out["ce"] = float(m["ce_sum"]) / float(m["ce_tokens"])  # answer-weighted mean
    if float(m["answers"]) > 0:
      out["answer_acc"] = float(m["answer_hits"]) / float(m["answers"])
  return out
