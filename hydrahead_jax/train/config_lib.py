"""Typed run configuration: sections, config files, ``--set dotted.key=value`` overrides, JSON.

A config file is a small Python file defining ``get_config() -> Config``. Sections are frozen
dataclasses: ``model`` (``hydrahead_jax.config.ModelConfig``), ``data``
(``hydrahead_jax.data.pipeline.DataConfig``), ``optim``, ``train`` and ``checkpoint``. Every value is
checked against its field's annotation (also values set in config files), and every bad key or
value is one ``ValueError`` naming the dotted key.

Override values are parsed by the field's type: ``int``/``float``/``bool``/``str``, ``X | None``
(``None``), tuples (``a,b`` or a Python literal), mappings (``k:v,k:v`` or a dict literal) and
``model.layout`` (``all_fa``, ``all_la``, ``per_layer:0,1``, ``layerwise:4``, a list literal of
per-layer FA groups, or a layout JSON file).
"""

from __future__ import annotations

import ast
import collections.abc
import dataclasses
import difflib
import json
import os
import types
import typing
from typing import Any, Mapping, Sequence

from hydrahead_jax.cli import import_config_file
from hydrahead_jax.config import HeadLayout, ModelConfig
from hydrahead_jax.data.pipeline import DataConfig

# Names are canonical flat parameter names (hydrahead_jax.interop.names); fnmatch patterns, '*' spans dots.
DEFAULT_NO_DECAY = ("*norm*", "*bias*", "*.a_log", "*.conv_*", "*.fusion.*")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup then cosine decay to ``lr * min_lr_ratio``."""

  lr: float = 3e-4
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0  # global gradient-norm clipping; 0 = off
  no_decay: tuple[str, ...] = DEFAULT_NO_DECAY  # parameter-name patterns without weight decay
  trainable: tuple[str, ...] = ("*",)  # a parameter trains iff it matches one of these ...
  freeze: tuple[str, ...] = ()  # ... and none of these

  def __post_init__(self):
    _typecheck(self, 'optim')
    if self.lr < 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.clip_norm < 0:
      raise ValueError("optim: lr, warmup_steps, weight_decay and clip_norm must be >= 0")
    if not 0.0 <= self.min_lr_ratio <= 1.0:
      raise ValueError(f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
      raise ValueError(f"optim.b1/b2: must be in [0, 1), got {self.b1}, {self.b2}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Loop length, batching, evaluation, logging and device layout."""

  steps: int = 1000  # optimizer steps
  grad_accum: int = 1  # microbatches per step (data.batch_size is the global batch per step)
  answer_loss_weight: float = 1.0  # answer tokens (retrieval targets) count this many times in the loss
  # CE over chunks of this many positions with the vocabulary projection inside (hydrahead_jax.losses: exact
  # gradients, logits [B, loss_chunk, V] at a time instead of [B, T, V]); 0 = full logits
  loss_chunk: int = 2048
  seed: int = 0  # parameter init
  log_every: int = 10
  eval_every: int = 0  # 0: evaluate only at the end
  eval_tasks: tuple[str, ...] = ("mqar", "niah_single")
  eval_examples: int = 32  # per task
  eval_len: int | None = None  # None: data.seq_len
  eval_seed: int = 1234
  eval_batch_size: int = 16
  data_parallel: int = -1  # devices on the 'data' mesh axis; -1: all (divided by fsdp)
  fsdp: int = 1
  context_parallel: int = 1  # devices on the 'context' mesh axis: each sequence split over them (docs/parallelism.md)
  progress: bool = True  # tqdm progress bar
  distributed: bool = False  # call jax.distributed.initialize() (multi-host)
  xla_flags: str = ""  # appended to XLA_FLAGS by train.py before JAX starts (ignored once it has)

  def __post_init__(self):
    _typecheck(self, 'train')
    for name in ("steps", "grad_accum", "log_every", "eval_examples", "eval_batch_size", "fsdp", "context_parallel"):
      if getattr(self, name) < 1:
        raise ValueError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
    if self.answer_loss_weight < 0:
      raise ValueError(f"train.answer_loss_weight: must be >= 0, got {self.answer_loss_weight}")
    if self.eval_every < 0:
      raise ValueError(f"train.eval_every: must be >= 0, got {self.eval_every}")
    if self.loss_chunk < 0:
      raise ValueError(f"train.loss_chunk: must be >= 0 (0 = full logits), got {self.loss_chunk}")
    if self.data_parallel == 0 or self.data_parallel < -1:
      raise ValueError(f"train.data_parallel: must be >= 1 or -1 (all devices), got {self.data_parallel}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 500  # steps between saves (and always at the end)
  keep: int = 3  # most recent checkpoints kept
  async_save: bool = True
  resume: bool = True  # resume from the latest checkpoint in the run directory
  # A checkpoint that cannot be restored (corrupt, incomplete) is moved aside to <step>.damaged-<n>
  # and the run resumes from the newest one that restores; False: stop (exit 2), change nothing.
  fallback: bool = True
  on_save_error: str = "stop"  # a failed save (e.g. disk full): 'stop' (exit 4) or 'continue' (warn)

  def __post_init__(self):
    _typecheck(self, 'checkpoint')
    if self.every < 1 or self.keep < 1:
      raise ValueError(f"checkpoint.every and checkpoint.keep must be >= 1, got {self.every}, {self.keep}")
    if self.on_save_error not in ("stop", "continue"):
      raise ValueError(f"checkpoint.on_save_error: must be 'stop' or 'continue', got {self.on_save_error!r}")


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  workdir: str = "runs/default"

  def __post_init__(self):
    if self.data.batch_size % self.train.grad_accum:
      raise ValueError(f"data.batch_size={self.data.batch_size} is not divisible by "
                       f"train.grad_accum={self.train.grad_accum}")
    if self.data.source == "synthetic" and self.data.tokenizer is None:
      from hydrahead_jax.data.tokenizer import ByteTokenizer  # noqa: PLC0415
      vocab = ByteTokenizer().vocab_size
      if self.model.vocab_size < vocab:
        raise ValueError(f"model.vocab_size={self.model.vocab_size} is smaller than the byte "
                         f"tokenizer's vocabulary ({vocab})")

  def replace(self, **kw) -> "Config":
    return dataclasses.replace(self, **kw)


SECTIONS = ("model", "data", "optim", "train", "checkpoint")
TOP_LEVEL = ("workdir",)


def _typecheck(obj, section: str) -> None:
  """Checks (and normalises, e.g. int -> float, list -> tuple) every field of a section dataclass."""
  hints = _hints(type(obj))
  for f in dataclasses.fields(obj):
    object.__setattr__(obj, f.name, _check_value(f"{section}.{f.name}", getattr(obj, f.name), hints[f.name]))


# -- types ----------------------------------------------------------------------------------------
def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _is_union(tp) -> bool:
  return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _is_mapping(tp) -> bool:
  return typing.get_origin(tp) in (collections.abc.Mapping, dict) or tp in (dict, Mapping)


def _type_name(tp) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(key: str, value: Any, tp) -> Any:
  """Returns ``value`` converted to ``tp`` (JSON lists -> tuples) or raises naming ``key``."""
  bad = ValueError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r} "
                   f"({type(value).__name__})")
  if tp is Any:
    return value
  if _is_union(tp):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    for a in args:
      if a is type(None):
        continue
      try:
        return _check_value(key, value, a)
      except ValueError:
        pass
    raise bad
  origin = typing.get_origin(tp)
  if tp is bool:
    if isinstance(value, bool):
      return value
    raise bad
  if tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    raise bad
  if tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    raise bad
  if tp is str:
    if isinstance(value, str):
      return value
    raise bad
  if tp is HeadLayout:
    if isinstance(value, HeadLayout):
      return value
    if isinstance(value, (list, tuple)):
      return HeadLayout(tuple(tuple(x) for x in value))
    if isinstance(value, Mapping) and "fa_groups" in value:
      return HeadLayout(tuple(tuple(x) for x in value["fa_groups"]))
    raise bad
  if origin is tuple:
    args = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
      raise bad
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_check_value(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if len(args) != len(value):
      raise bad
    return tuple(_check_value(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
  if _is_mapping(tp):
    args = typing.get_args(tp) or (Any, Any)
    if not isinstance(value, Mapping):
      raise bad
    return {_check_value(f"{key}.<key>", k, args[0]): _check_value(f"{key}[{k!r}]", v, args[1])
            for k, v in value.items()}
  raise ValueError(f"config key {key!r}: unsupported field type {tp}")


def _parse_string(key: str, text: str, tp, section_values: Mapping[str, Any] | None = None) -> Any:
  """Parses an override string for a field of type ``tp``."""
  s = text.strip()
  if _is_union(tp):
    args = typing.get_args(tp)
    if type(None) in args and s in ("None", "none", "null"):
      return None
    errors = []
    for a in args:
      if a is type(None):
        continue
      try:
        return _parse_string(key, text, a, section_values)
      except ValueError as e:
        errors.append(str(e))
    raise ValueError(errors[0] if errors else f"config key {key!r}: cannot parse {text!r}")
  origin = typing.get_origin(tp)
  if tp is str:
    return text
  if tp is bool:
    low = s.lower()
    if low in ("true", "1", "yes", "on"):
      return True
    if low in ("false", "0", "no", "off"):
      return False
    raise ValueError(f"config key {key!r}: expected bool (true/false), got {text!r}")
  if tp is int:
    try:
      return int(s.replace("_", ""))
    except ValueError:
      try:
        f = float(s)
      except ValueError:
        f = None
      if f is not None and f.is_integer():
        return int(f)
      raise ValueError(f"config key {key!r}: expected int, got {text!r}") from None
  if tp is float:
    try:
      return float(s.replace("_", ""))
    except ValueError:
      raise ValueError(f"config key {key!r}: expected float, got {text!r}") from None
  if tp is HeadLayout:
    return parse_layout(key, s, section_values or {})
  if origin is tuple:
    args = typing.get_args(tp)
    if s.startswith(("(", "[")):
      value = _literal(key, s)
    else:
      value = [p.strip() for p in s.split(",") if p.strip()] if s else []
    elem = args[0] if args else str
    return tuple(v if not isinstance(v, str) or elem is str else _parse_string(f"{key}[{i}]", v, elem)
                 for i, v in enumerate(value))
  if _is_mapping(tp):
    if s.startswith("{"):
      value = _literal(key, s)
    else:
      value = {}
      for part in filter(None, (p.strip() for p in s.split(","))):
        if ":" not in part:
          raise ValueError(f"config key {key!r}: expected 'name:value,...' or a dict literal, got {text!r}")
        k, v = part.split(":", 1)
        value[k.strip()] = _literal(key, v.strip())
    return value
  return _literal(key, s)


def _literal(key: str, s: str) -> Any:
  try:
    return ast.literal_eval(s)
  except (ValueError, SyntaxError):
    raise ValueError(f"config key {key!r}: cannot parse {s!r} as a Python literal") from None


def parse_layout(key: str, spec: str, model_values: Mapping[str, Any]) -> HeadLayout:
  """Layout from a spec string, for the (possibly overridden) num_layers / num_kv_heads."""
  L = int(model_values.get("num_layers", 0))
  G = int(model_values.get("num_kv_heads", 0))
  try:
    if spec == "all_fa":
      return HeadLayout.all_fa(L, G)
    if spec == "all_la":
      return HeadLayout.all_la(L)
    if spec.startswith("per_layer:"):
      groups = [int(x) for x in spec.split(":", 1)[1].split(",") if x.strip()]
      return HeadLayout.per_layer(L, groups)
    if spec.startswith("layerwise:"):
      return HeadLayout.layerwise(L, G, int(spec.split(":", 1)[1]))
    if spec.startswith(("[", "(")):
      return HeadLayout(tuple(tuple(x) for x in ast.literal_eval(spec)))
    if spec.endswith(".json") and os.path.isfile(spec):
      with open(spec) as f:
        return HeadLayout.from_json(f.read())
  except (ValueError, SyntaxError, TypeError) as e:
    raise ValueError(f"config key {key!r}: bad layout {spec!r}: {e}") from None
  raise ValueError(f"config key {key!r}: bad layout {spec!r}; use all_fa, all_la, per_layer:0[,1..], "
                   "layerwise:N, a list like [[0],[0,1]] or a layout .json file")


# -- validation and overrides ---------------------------------------------------------------------
def _unknown(key: str, known: Sequence[str], where: str) -> ValueError:
  close = difflib.get_close_matches(key.split(".")[-1], list(known), n=1)
  hint = f"; did you mean {close[0]!r}?" if close else ""
  return ValueError(f"config: unknown key {key!r}{hint} ({where} has: {', '.join(known)})")


def _rebuild(section: str, cls, values: Mapping[str, Any], changed: Sequence[str]) -> Any:
  try:
    return cls(**values)
  except ValueError as e:
    keys = ", ".join(f"{section}.{k}" for k in changed) or section
    raise ValueError(f"config key {keys!r}: {e}") from None
  except TypeError as e:
    raise ValueError(f"config section {section!r}: {e}") from None


def _section_values(obj) -> dict[str, Any]:
  return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _uniform_layout(layout: HeadLayout) -> tuple[int, ...] | None:
  groups = set(layout.fa_groups)
  return next(iter(groups)) if len(groups) == 1 else None


def validate(cfg: Config) -> Config:
  """Type-checks every field (config files can hold anything) and returns a normalised copy."""
  if not isinstance(cfg, Config):
    raise ValueError(f"config: get_config() must return hydrahead_jax.train.config_lib.Config, got {type(cfg)}")
  out = {}
  for name in SECTIONS:
    obj = getattr(cfg, name)
    cls = type(Config().__getattribute__(name))
    if not isinstance(obj, cls):
      raise ValueError(f"config key {name!r}: expected a {cls.__name__}, got {type(obj).__name__}")
    hints = _hints(cls)
    vals = {k: _check_value(f"{name}.{k}", v, hints[k]) for k, v in _section_values(obj).items()}
    out[name] = _rebuild(name, cls, vals, [])
  workdir = _check_value("workdir", cfg.workdir, str)
  try:
    return Config(**out, workdir=workdir)
  except ValueError as e:
    raise ValueError(f"config: {e}") from None


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
  """Applies ``dotted.key=value`` strings (in order; a section is rebuilt and validated once)."""
  pending: dict[str, dict[str, str]] = {}
  top: dict[str, str] = {}
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"config: override {item!r} is not of the form dotted.key=value")
    key, value = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if len(parts) == 1:
      if key not in TOP_LEVEL:
        raise _unknown(key, SECTIONS + TOP_LEVEL, "the config")
      top[key] = value
      continue
    section, field = parts[0], ".".join(parts[1:])
    if section not in SECTIONS:
      raise _unknown(key, SECTIONS + TOP_LEVEL, "the config")
    names = [f.name for f in dataclasses.fields(getattr(cfg, section))]
    if field not in names:
      raise _unknown(key, names, f"section {section!r}")
    pending.setdefault(section, {})[field] = value
  new = {}
  for section, fields in pending.items():
    obj = getattr(cfg, section)
    cls, hints = type(obj), _hints(type(obj))
    vals = _section_values(obj)
    deferred = {}
    for field, text in fields.items():
      if hints[field] is HeadLayout or (_is_union(hints[field]) and HeadLayout in typing.get_args(hints[field])):
        deferred[field] = text
        continue
      vals[field] = _check_value(f"{section}.{field}", _parse_string(f"{section}.{field}", text, hints[field]),
                                 hints[field])
    for field, text in deferred.items():  # layouts depend on the final num_layers / num_kv_heads
      vals[field] = _parse_string(f"{section}.{field}", text, hints[field], vals)
    if section == "model" and "layout" not in fields and vals["num_layers"] != obj.num_layers:
      groups = _uniform_layout(obj.layout)
      if groups is not None:  # same FA groups in every layer: keep that pattern at the new depth
        vals["layout"] = HeadLayout.per_layer(vals["num_layers"], groups)
    new[section] = _rebuild(section, cls, vals, list(fields))
  for key, text in top.items():
    new[key] = text
  try:
    return validate(dataclasses.replace(cfg, **new))
  except ValueError as e:
    if str(e).startswith("config"):
      raise
    raise ValueError(f"config: {e}") from None


def load_config_file(path: str) -> Config:
  """Imports a Python config file and returns its validated ``get_config()``."""
  module = import_config_file(path)
  try:
    cfg = module.get_config()
  except TypeError as e:  # e.g. a str where a section's own checks compare numbers
    raise ValueError(f"config file {path!r}: bad value in get_config(): {e}") from None
  return validate(cfg)


def load(path: str, overrides: Sequence[str] = (), workdir: str | None = None) -> Config:
  """The training config of a file with overrides (``train.py`` also takes transfer configs:
  ``hydrahead_jax.transfer.config.load_any``)."""
  cfg = apply_overrides(load_config_file(path), overrides)
  return cfg.replace(workdir=workdir) if workdir else cfg


# -- JSON -----------------------------------------------------------------------------------------
def _jsonable(x: Any) -> Any:
  if isinstance(x, HeadLayout):
    return [list(g) for g in x.fa_groups]
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x


def to_dict(cfg: Config) -> dict[str, Any]:
  out = {name: {k: _jsonable(v) for k, v in _section_values(getattr(cfg, name)).items()} for name in SECTIONS}
  out["workdir"] = cfg.workdir
  return out


def to_json(cfg: Config) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def from_dict(d: Mapping[str, Any]) -> Config:
  unknown = sorted(set(d) - set(SECTIONS) - set(TOP_LEVEL))
  if unknown:
    raise _unknown(unknown[0], SECTIONS + TOP_LEVEL, "the config")
  out = {}
  for name in SECTIONS:
    cls = type(getattr(Config(), name))
    hints = _hints(cls)
    vals = dict(d.get(name, {}))
    for k in vals:
      if k not in hints:
        raise _unknown(f"{name}.{k}", list(hints), f"section {name!r}")
    vals = {k: _check_value(f"{name}.{k}", v, hints[k]) for k, v in vals.items()}
    out[name] = _rebuild(name, cls, vals, [])
  return validate(Config(**out, workdir=d.get("workdir", "runs/default")))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping) and k in SECTIONS and not prefix:
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


# Keys that may change between a checkpoint and a resumed run (they change neither the shapes of
# saved state nor the meaning of the saved data-iterator position).
RESUME_SAFE = (
    "workdir", "model.remat", "model.la_implementation", "model.la_chunk_size", "model.dtype",
    "model.fa_implementation", "model.fa_packed_implementation", "model.fa_context_algorithm",
    "model.conv_implementation",
    "model.fusion_implementation",
    "data.num_workers", "data.read_threads", "data.prefetch_buffer",
    "optim.lr", "optim.warmup_steps", "optim.min_lr_ratio", "optim.b1", "optim.b2", "optim.eps",
    "optim.weight_decay", "optim.clip_norm", "optim.no_decay",
    "train.steps", "train.grad_accum", "train.log_every", "train.eval_every", "train.eval_tasks",
    "train.eval_examples", "train.eval_len", "train.eval_seed", "train.eval_batch_size",
    "train.progress", "train.distributed", "train.xla_flags", "train.answer_loss_weight", "train.seed",
    "train.loss_chunk",
    "train.data_parallel", "train.fsdp", "train.context_parallel",
    "checkpoint.every", "checkpoint.keep", "checkpoint.async_save", "checkpoint.resume",
    "checkpoint.fallback", "checkpoint.on_save_error",
)


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """Dotted keys whose values differ between two ``to_dict`` outputs."""
  a, b = flatten(old), flatten(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def incompatible(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  return {k: v for k, v in diff(old, new).items() if k not in RESUME_SAFE}
