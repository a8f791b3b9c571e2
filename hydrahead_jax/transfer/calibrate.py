"""Fusion-scale calibration of a converted student: LA head output RMS matched to the teacher's head.

In the student, an LA head's contribution before W_o is ``la_norm_scale * RMSNorm(o) * gate`` with
``gate = SiLU(W_z x + z_bias)`` (a converted head starts with W_z = 0, i.e. the constant SiLU(z_bias); the
general case is measured, not assumed). The teacher's contribution of the head it replaces is its raw
output (FA heads enter W_o unscaled). Calibration sets, per LA head and channel c,

    la_norm_scale[c] = sqrt( E[teacher_raw[c]^2] / E[(RMSNorm(o) * gate)[c]^2] )

with expectations over all tokens of the calibration batches, so that the channel RMS of the fused output
equals the teacher's. Teacher heads are matched through ``conversion.head_order`` (the student stores its
FA groups first). With fusion ``rmsnorm_all`` the FA heads' ``fa_norm_scale`` is calibrated the same way (no
gate); with ``none`` there is nothing to calibrate.

Inputs of the student's heads (``inputs``):
- ``"teacher"`` (default): every student layer reads the teacher's layer input (``mixer_in``), as in the
  attention-alignment stage of the transfer; one pass calibrates every layer, independent of the others.
- ``"student"``: the student's own forward. Each LA head's input then depends on the layers below, which are
  themselves being calibrated, so the measurement is repeated (``iterations`` full passes).
"""

from __future__ import annotations

import functools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hydrahead_jax.transfer.surgery import head_order
from hydrahead_jax.nn.layers import rms_normalize, rope_angles
from hydrahead_jax.interop.names import load_flat_into, model_from_flat, model_to_flat

INPUTS = ("teacher", "student")


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _teacher_ms(graphdef, state, tokens_BxT):
  """Sum over tokens of raw head outputs squared: [L, H, K]."""
  model = nnx.merge(graphdef, state)
  _, inter = model.intermediates(tokens_BxT, ("heads",))
  h = inter["heads"].astype(jnp.float32)
  return jnp.sum(h * h, axis=(1, 2))


def _gated_norm_ms(raw_BxTxHxK, x_BxTxD, gate, eps):
  """Sum over tokens of (RMSNorm(o) * gate)^2: [H, K]; ``gate`` = (w_z, z_bias) or None."""
  u = rms_normalize(raw_BxTxHxK, eps)
  if gate is not None:
    w_z, z_bias = gate
    u = u * jax.nn.silu(jnp.einsum("btd,dhk->bthk", x_BxTxD.astype(jnp.float32), w_z.astype(jnp.float32)) + z_bias)
  return jnp.sum(u * u, axis=(0, 1))


@functools.partial(jax.jit, static_argnames=("graphdef", "meta", "eps"))
def _student_ms(graphdef, state, tokens_BxT, gates, *, meta, eps):
  """Student's own forward; per layer the sum over tokens of (RMSNorm(o) * gate)^2 of the calibrated heads.

  ``meta[l] = (first, count, gated)``: the calibrated heads are ``[first, first + count)`` of the layer's raw
  outputs; ``gates[l] = (w_z, z_bias)`` when ``gated``.
  """
  model = nnx.merge(graphdef, state)
  _, inter = model.intermediates(tokens_BxT, ("heads", "mixer_in"))
  return [None if not count else
          _gated_norm_ms(inter["heads"][l][:, :, first:first + count], inter["mixer_in"][l],
                         gates[l] if gated else None, eps)
          for l, (first, count, gated) in enumerate(meta)]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _teacher_run(graphdef, state, tokens_BxT):
  """Teacher's layer inputs [L, B, T, D] and sum over tokens of squared raw head outputs [L, H, K]."""
  model = nnx.merge(graphdef, state)
  _, inter = model.intermediates(tokens_BxT, ("heads", "mixer_in"))
  h = inter["heads"].astype(jnp.float32)
  return inter["mixer_in"], jnp.sum(h * h, axis=(1, 2))


@functools.partial(nnx.jit, static_argnames=("first", "count", "eps"))
def _mixer_ms(mixer, x_BxTxD, cos, sin, gate, *, first, count, eps):
  """One student layer's mixer on a given input: sum over tokens of (RMSNorm(o) * gate)^2 [count, K]."""
  _, raw = mixer(x_BxTxD, (cos, sin), None)
  return _gated_norm_ms(raw[:, :, first:first + count], x_BxTxD, gate, eps)


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


def _gates(flat, plan, num_layers):
  gates = [None] * num_layers
  for l, _, _, gated, _, _ in plan:
    if gated:
      gates[l] = (jnp.asarray(flat[f"layers.{l}.mixer.la.w_z"]), jnp.asarray(flat[f"layers.{l}.mixer.la.z_bias"]))
  return gates


def _ms_student_inputs(student, batches, plan):
  cfg = student.cfg
  gates = _gates(model_to_flat(student), plan, cfg.num_layers)
  graphdef, state = nnx.split(student)
  results = {}
  for kind in ("fa_norm_scale", "la_norm_scale"):  # one jitted pass per kind of entry present
    entries = [p for p in plan if p[4] == kind]
    if not entries:
      continue
    meta = [(0, 0, False)] * cfg.num_layers
    for l, first, count, gated, _, _ in entries:
      meta[l] = (first, count, bool(gated))
    acc = None
    for b in batches:
      out = _student_ms(graphdef, state, jnp.asarray(b), gates, meta=tuple(meta), eps=float(cfg.rms_eps))
      out = [None if o is None else np.asarray(o, np.float64) for o in out]
      acc = out if acc is None else [None if a is None else a + o for a, o in zip(acc, out)]
    results.update({id(e): acc[e[0]] for e in entries})
  return [results[id(p)] for p in plan], None


def _ms_teacher_inputs(student, teacher, batches, plan):
  cfg = student.cfg
  per_layer = model_from_flat(cfg.replace(scan_layers=False), model_to_flat(student))  # one Block per layer
  gates = _gates(model_to_flat(student), plan, cfg.num_layers)
  graphdef, state = nnx.split(teacher)
  acc = [np.zeros((p[2], cfg.head_dim)) for p in plan]
  t_acc = None
  for b in batches:
    x_all, t_ms = _teacher_run(graphdef, state, jnp.asarray(b))
    t_acc = np.asarray(t_ms, np.float64) + (0 if t_acc is None else t_acc)
    B, T = b.shape
    cos, sin = rope_angles(jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), cfg.head_dim, cfg.rope_theta)
    for i, (l, first, count, _, _, _) in enumerate(plan):
      ms = _mixer_ms(per_layer.segments[l].mixer, x_all[l], cos, sin, gates[l], first=first, count=count,
                     eps=float(cfg.rms_eps))
      acc[i] += np.asarray(ms, np.float64)
  return acc, t_acc


def student_fused_ms(student, batches: Sequence[np.ndarray], plan=None, *, inputs: str = "teacher",
                     teacher=None) -> tuple[list[np.ndarray], np.ndarray | None]:
  """Mean square per channel of ``RMSNorm(o) * gate`` (scale excluded) for every planned entry, and (teacher
  inputs only) the teacher's per-channel mean square of raw head outputs [L, H, K] on the same tokens."""
  if inputs not in INPUTS:
    raise ValueError(f"calibrate.inputs: {inputs!r}; choose one of {INPUTS}")
  plan = _plan(student) if plan is None else plan
  n = _count(batches)
  if inputs == "student":
    acc, t_acc = _ms_student_inputs(student, batches, plan)
  else:
    if teacher is None:
      raise ValueError("calibrate: inputs='teacher' needs the teacher model")
    acc, t_acc = _ms_teacher_inputs(student, teacher, batches, plan)
  return [a / n for a in acc], (None if t_acc is None else t_acc / n)


def calibrate_fusion(student, teacher, batches: Sequence[np.ndarray], *, inputs: str = "teacher",
                     iterations: int = 3, progress: bool = False) -> dict:
  """Sets the student's fusion scales in place; returns a report.

  ``inputs='teacher'``: one pass (teacher layer inputs). ``inputs='student'``: ``iterations`` passes of the
  student's own forward; the report lists the largest |log(student RMS / teacher RMS)| before each pass.
  """
  if iterations < 1:
    raise ValueError(f"calibrate.iterations: must be >= 1, got {iterations}")
  batches = [np.asarray(b) for b in batches]
  plan = _plan(student)
  t_rms = teacher_head_rms(teacher, batches) if inputs == "student" else None
  passes = iterations if inputs == "student" else 1
  history = []
  it = range(passes)
  if progress:
    from tqdm.auto import tqdm

    it = tqdm(it, desc="calibrating fusion scales", leave=False)
  for _ in it:
    ms, t_ms = student_fused_ms(student, batches, plan, inputs=inputs, teacher=teacher)
    if t_ms is not None:
      t_rms = np.sqrt(t_ms)
    flat = dict(model_to_flat(student))
    ratios = []
    for (l, _, _, _, name, t_heads), u_ms in zip(plan, ms):
      key = f"layers.{l}.mixer.fusion.{name}"
      before = np.sqrt(np.mean(flat[key].astype(np.float64) ** 2 * u_ms, axis=-1))
      target = t_rms[l, t_heads]
      ratios.append(before / np.sqrt(np.mean(target ** 2, axis=-1)))
      flat[key] = (target / np.sqrt(np.maximum(u_ms, 1e-30))).astype(flat[key].dtype)
    bad = [l for (l, _, _, _, name, _) in plan if not np.isfinite(flat[f"layers.{l}.mixer.fusion.{name}"]).all()]
    if bad:
      raise FloatingPointError(
          f"fusion calibration: non-finite scales in layers {bad} (the student's or the teacher's head outputs on "
          f"the calibration text are not finite); nothing was saved. Check the LA kernel on this device, e.g. "
          f"convert with la_implementation='chunked'")
    load_flat_into(student, flat)
    history.append(float(np.max(np.abs(np.log(np.concatenate(ratios))))) if ratios else 0.0)
  return {"inputs": inputs, "passes": passes, "max_abs_log_rms_ratio_before_each_pass": history,
          "num_calibrated_heads": int(sum(p[2] for p in plan)), "tokens": _count(batches)}


def rms_match(student, teacher, batches: Sequence[np.ndarray], *, inputs: str = "teacher") -> dict:
  """Held-out check: student fused-output RMS / teacher raw RMS per calibrated head, overall and per channel."""
  batches = [np.asarray(b) for b in batches]
  plan = _plan(student)
  ms, t_ms = student_fused_ms(student, batches, plan, inputs=inputs, teacher=teacher)
  t_rms = np.sqrt(t_ms) if t_ms is not None else teacher_head_rms(teacher, batches)
  flat = model_to_flat(student)
  head_ratio, chan_ratio = [], []
  for (l, _, _, _, name, t_heads), u_ms in zip(plan, ms):
    s_ms = flat[f"layers.{l}.mixer.fusion.{name}"].astype(np.float64) ** 2 * u_ms  # [Hc, K]
    t2 = t_rms[l, t_heads] ** 2
    head_ratio.append(np.sqrt(s_ms.mean(-1) / t2.mean(-1)))
    chan_ratio.append(np.sqrt(s_ms / np.maximum(t2, 1e-30)).ravel())
  head_ratio = np.concatenate(head_ratio) if head_ratio else np.zeros(0)
  chan_ratio = np.concatenate(chan_ratio) if chan_ratio else np.zeros(0)
  return {"inputs": inputs, "head_ratio": head_ratio, "channel_ratio": chan_ratio,
          "max_head_dev": float(np.max(np.abs(head_ratio - 1))) if head_ratio.size else 0.0,
          "median_head_dev": float(np.median(np.abs(head_ratio - 1))) if head_ratio.size else 0.0,
          "median_channel_dev": float(np.median(np.abs(chan_ratio - 1))) if chan_ratio.size else 0.0}
