"""optax AdamW + warmup-cosine, gradient clipping, a weight-decay mask and freezing by name.

Patterns are ``fnmatch`` globs over canonical parameter names (``layers.3.mixer.la.wq``; ``*``
spans dots). A parameter trains iff it matches one of ``optim.trainable`` and none of
``optim.freeze``. Wholly frozen parameters get ``optax.set_to_zero`` (no optimizer state); a
stacked segment whose layers are only partly frozen gets a per-layer mask on its gradient and on its
update, so frozen layers stay bit-identical (weight decay included). Gradient clipping sees only
trainable gradients.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hydrahead_jax.train.config_lib import OptimConfig

TRAIN, FROZEN = "train", "frozen"


def _matches(name: str, patterns: Sequence[str]) -> bool:
  return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_patterns(field: str, patterns: Sequence[str], all_names: Sequence[str]) -> None:
  for p in patterns:
    if not any(fnmatch.fnmatchcase(n, p) for n in all_names):
      raise ValueError(f"optim.{field}: pattern {p!r} matches no parameter name "
                       f"(names look like {all_names[0]!r}, {all_names[-1]!r})")


@dataclasses.dataclass(frozen=True)
class ParamPlan:
  """Per flat key: ``label`` (train/frozen), ``layer_mask`` (None or bool per stacked layer), ``decay``."""

  label: dict[str, str]
  layer_mask: dict[str, np.ndarray | None]
  decay: dict[str, bool]

  def num_trainable(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
    total = 0
    for k, shape in shapes.items():
      n = int(np.prod(shape))
      if self.label[k] == TRAIN:
        m = self.layer_mask[k]
        total += n if m is None else n * int(m.sum()) // len(m)
    return total


def plan_params(cfg: OptimConfig, names: Mapping[str, tuple[str, ...]]) -> ParamPlan:
  """Decides, from names alone, which parameters (and layers) train and which decay."""
  all_names = sorted(n for ns in names.values() for n in ns)
  for field in ("trainable", "freeze", "no_decay"):
    if field != "no_decay":
      _check_patterns(field, getattr(cfg, field), all_names)
  label, layer_mask, decay = {}, {}, {}
  for key, ns in names.items():
    train = np.array([_matches(n, cfg.trainable) and not _matches(n, cfg.freeze) for n in ns])
    label[key] = TRAIN if train.any() else FROZEN
    layer_mask[key] = None if train.all() or not train.any() else train
    decay[key] = not any(_matches(n, cfg.no_decay) for n in ns)
  if all(v == FROZEN for v in label.values()):
    raise ValueError("optim.trainable/freeze: every parameter is frozen")
  return ParamPlan(label, layer_mask, decay)


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup 0 -> lr, then cosine to lr * min_lr_ratio at ``total_steps``."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


class _Empty(NamedTuple):
  pass


def _mask_layers(masks: Mapping[str, np.ndarray | None]) -> optax.GradientTransformation:
  """Multiplies the leading (layer) axis of selected leaves by a 0/1 mask."""

  def apply(updates):
    out = {}
    for k, u in updates.items():
      m = masks.get(k)
      if m is None or isinstance(u, optax.MaskedNode):
        out[k] = u
      else:
        out[k] = u * jnp.asarray(m, u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))
    return out

  return optax.GradientTransformation(lambda params: _Empty(), lambda u, s, p=None: (apply(u), s))


def make_optimizer(cfg: OptimConfig, plan: ParamPlan, total_steps: int
                   ) -> tuple[optax.GradientTransformation, Callable]:
  """The optax transformation (updates flat param dicts) and its learning-rate schedule."""
  sched = schedule(cfg, total_steps)
  layer_masks = {k: m for k, m in plan.layer_mask.items() if m is not None}
  chain = []
  if layer_masks:
    chain.append(_mask_layers(layer_masks))
  if cfg.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.clip_norm))
  chain.append(optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=lambda params: {k: plan.decay[k] for k in params}))
  if layer_masks:
    chain.append(_mask_layers(layer_masks))
  inner = optax.chain(*chain)
  if all(v == TRAIN for v in plan.label.values()):
    return inner, sched
  tx = optax.multi_transform({TRAIN: inner, FROZEN: optax.set_to_zero()},
                             lambda params: {k: plan.label[k] for k in params})
  return tx, sched


def describe(plan: ParamPlan, shapes: Mapping[str, tuple[int, ...]]) -> str:
  total = sum(int(np.prod(s)) for s in shapes.values())
  trainable = plan.num_trainable(shapes)
  no_decay = sum(int(np.prod(s)) for k, s in shapes.items() if not plan.decay[k])
  frozen = [k for k, v in plan.label.items() if v == FROZEN]
  partial = [k for k, v in plan.layer_mask.items() if v is not None]
  out = f"{trainable:,} of {total:,} parameters trainable; {no_decay:,} without weight decay"
  if frozen or partial:
    out += f"; frozen tensors: {len(frozen)}, partly frozen (per layer): {len(partial)}"
  return out


def opt_state_shardings(tx: optax.GradientTransformation, params: Mapping[str, Any], param_shardings
                        ) -> Any:
  """Shardings of ``tx.init(params)``: moments like their parameter, scalars replicated."""
  abstract = jax.eval_shape(tx.init, params)
  some = next(iter(param_shardings.values()))
  replicated = jax.sharding.NamedSharding(some.mesh, jax.sharding.PartitionSpec())

  def pick(path, leaf):
    for p in reversed(path):
      key = getattr(p, "key", None)
      if isinstance(key, str) and key in param_shardings and \
          tuple(leaf.shape) == tuple(params[key].shape):
        return param_shardings[key]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract)
