"""Fusion-scale calibration of a converted student: LA head output RMS matched to the teacher's head.

In the student, an LA head's contribution before W_o is ``la_norm_scale * RMSNorm(o) * gate`` with
``gate = SiLU(W_z x + z_bias)`` (a converted head starts with W_z = 0, i.e. the constant SiLU(z_bias); the
general case is measured, not assumed). The teacher's contribution of the head it replaces is its raw
output (FA heads enter W_o unscaled). Calibration sets, per LA head and channel c,

    la_norm_scale[c] = sqrt( E[teacher_raw[c]^2] / E[(RMSNorm(o) * gate)[c]^2] )

with expectations over all tokens of the calibration batches, so that the channel RMS of the fused output
equals the teacher's. Teacher heads are matched through ``conversion.head_order`` (the student stores its
FA groups first). Each LA head's input depends on the calibrated layers below it, so the measurement is
repeated (``iterations``, each one full student pass). With fusion ``rmsnorm_all`` the FA heads'
``fa_norm_scale`` is calibrated the same way (no gate); with ``none`` there is nothing to calibrate.
"""

from __future__ import annotations

import functools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hydrahead_jax.conversion import head_order
from hydrahead_jax.layers import rms_normalize
from hydrahead_jax.params import load_flat_into, model_to_flat


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _teacher_ms(graphdef, state, tokens_BxT):
  """Sum over tokens of raw head outputs squared: [L, H, K]."""
  model = nnx.merge(graphdef, state)
  _, inter = model(tokens_BxT, return_intermediates=("heads",))
  h = inter["heads"].astype(jnp.float32)
  return jnp.sum(h * h, axis=(1, 2))


@functools.partial(jax.jit, static_argnames=("graphdef", "meta", "eps"))
def _student_ms(graphdef, state, tokens_BxT, gates, *, meta, eps):
  """Per layer: sum over tokens of (RMSNorm(o) * gate)^2 for the heads being calibrated: [Hc, K] each.

  ``meta[l] = (first, count, gated)``: the calibrated heads are ``[first, first + count)`` of the layer's raw
  outputs; ``gates[l] = (w_z, z_bias)`` when ``gated``.
  """
  model = nnx.merge(graphdef, state)
  _, inter = model(tokens_BxT, return_intermediates=("heads", "mixer_in"))
  out = []
  for l, (first, count, gated) in enumerate(meta):
    if not count:
      out.append(None)
      continue
    u = rms_normalize(inter["heads"][l][:, :, first:first + count], eps)
    if gated:
      w_z, z_bias = gates[l]
      x = inter["mixer_in"][l].astype(jnp.float32)
      u = u * jax.nn.silu(jnp.einsum("btd,dhk->bthk", x, w_z.astype(jnp.float32)) + z_bias)
    out.append(jnp.sum(u * u, axis=(0, 1)))
  return out


def _count(batches: Sequence[np.ndarray]) -> int:
  return int(sum(np.asarray(b).shape[0] * np.asarray(b).shape[1] for b in batches))


def teacher_head_rms(teacher, batches: Iterable[np.ndarray]) -> np.ndarray:
  """Per-channel RMS of the teacher's raw head outputs [L, H, K] (teacher head order)."""
  batches = list(batches)
  graphdef, state = nnx.split(teacher)
  acc = sum(np.asarray(_teacher_ms(graphdef, state, jnp.asarray(b)), np.float64) for b in batches)
  return np.sqrt(acc / _count(batches))


def _plan(student):
  """Per layer: (first calibrated head, count, gated, param name, teacher head indices)."""
  cfg = student.cfg
  if cfg.fusion == "none":
    raise ValueError("calibrate: the student's fusion is 'none' (no scales to calibrate)")
  plan = []
  for l in range(cfg.num_layers):
    fa_heads, la_heads = head_order(cfg.layout, l, cfg.num_kv_heads, cfg.heads_per_group)
    if cfg.fusion == "rmsnorm_all" and len(fa_heads):
      plan.append((l, 0, len(fa_heads), False, "fa_norm_scale", fa_heads))
    if len(la_heads):
      plan.append((l, len(fa_heads), len(la_heads), cfg.la_output_gate, "la_norm_scale", la_heads))
  return plan


def student_fused_ms(student, batches: Sequence[np.ndarray], plan=None) -> list[np.ndarray]:
  """Mean square per channel of ``RMSNorm(o) * gate`` (scale excluded) for every planned entry."""
  cfg = student.cfg
  plan = _plan(student) if plan is None else plan
  flat = model_to_flat(student)
  graphdef, state = nnx.split(student)
  results = []
  for kind in ("fa_norm_scale", "la_norm_scale"):  # one jitted pass per kind of entry present
    entries = [p for p in plan if p[4] == kind]
    if not entries:
      continue
    meta = [(0, 0, False)] * cfg.num_layers
    gates = [None] * cfg.num_layers
    for l, first, count, gated, _, _ in entries:
      meta[l] = (first, count, bool(gated))
      if gated:
        gates[l] = (jnp.asarray(flat[f"layers.{l}.mixer.la.w_z"]), jnp.asarray(flat[f"layers.{l}.mixer.la.z_bias"]))
    acc = None
    for b in batches:
      out = _student_ms(graphdef, state, jnp.asarray(b), gates, meta=tuple(meta), eps=float(cfg.rms_eps))
      out = [None if o is None else np.asarray(o, np.float64) for o in out]
      acc = out if acc is None else [None if a is None else a + o for a, o in zip(acc, out)]
    n = _count(batches)
    results += [(e, acc[e[0]] / n) for e in entries]
  order = {id(p): i for i, p in enumerate(plan)}
  return [ms for _, ms in sorted(results, key=lambda r: order[id(r[0])])]


def calibrate_fusion(student, teacher, batches: Sequence[np.ndarray], *, iterations: int = 3,
                     teacher_rms: np.ndarray | None = None, progress: bool = False) -> dict:
  """Sets the student's fusion scales in place; returns a report (RMS ratios student/teacher per pass)."""
  if iterations < 1:
    raise ValueError(f"calibrate.iterations: must be >= 1, got {iterations}")
  batches = [np.asarray(b) for b in batches]
  t_rms = teacher_head_rms(teacher, batches) if teacher_rms is None else teacher_rms
  plan = _plan(student)
  history = []
  it = range(iterations)
  if progress:
    from tqdm.auto import tqdm

    it = tqdm(it, desc="calibrating fusion scales", leave=False)
  for _ in it:
    ms = student_fused_ms(student, batches, plan)
    flat = model_to_flat(student)
    ratios = []
    for (l, _, _, _, name, t_heads), u_ms in zip(plan, ms):
      key = f"layers.{l}.mixer.fusion.{name}"
      before = np.sqrt(np.mean(flat[key].astype(np.float64) ** 2 * u_ms, axis=-1))
      target = t_rms[l, t_heads]
      ratios.append(before / np.sqrt(np.mean(target ** 2, axis=-1)))
      flat[key] = (target / np.sqrt(np.maximum(u_ms, 1e-30))).astype(flat[key].dtype)
    load_flat_into(student, flat)
    history.append(float(np.max(np.abs(np.log(np.concatenate(ratios))))) if ratios else 0.0)
  return {"iterations": iterations, "max_abs_log_rms_ratio_before_each_pass": history,
          "num_calibrated_heads": int(sum(p[2] for p in plan)), "tokens": _count(batches)}


def rms_match(student, teacher, batches: Sequence[np.ndarray]) -> dict:
  """Held-out check: student fused-output RMS / teacher raw RMS per calibrated head, overall and per channel."""
  batches = [np.asarray(b) for b in batches]
  t_rms = teacher_head_rms(teacher, batches)
  plan = _plan(student)
  ms = student_fused_ms(student, batches, plan)
  flat = model_to_flat(student)
  head_ratio, chan_ratio = [], []
  for (l, _, _, _, name, t_heads), u_ms in zip(plan, ms):
    s_ms = flat[f"layers.{l}.mixer.fusion.{name}"].astype(np.float64) ** 2 * u_ms  # [Hc, K]
    t_ms = t_rms[l, t_heads] ** 2
    head_ratio.append(np.sqrt(s_ms.mean(-1) / t_ms.mean(-1)))
    chan_ratio.append(np.sqrt(s_ms / np.maximum(t_ms, 1e-30)).ravel())
  head_ratio = np.concatenate(head_ratio) if head_ratio else np.zeros(0)
  chan_ratio = np.concatenate(chan_ratio) if chan_ratio else np.zeros(0)
  return {"head_ratio": head_ratio, "channel_ratio": chan_ratio,
          "max_head_dev": float(np.max(np.abs(head_ratio - 1))) if head_ratio.size else 0.0,
          "median_channel_dev": float(np.median(np.abs(chan_ratio - 1))) if chan_ratio.size else 0.0}
