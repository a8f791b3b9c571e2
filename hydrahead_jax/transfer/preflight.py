"""Everything the transfer checks before computing: teacher, layout, trainable patterns, lengths, data.

``preflight(cfg)`` raises one ``TransferConfigError`` line (naming the config key) for anything wrong, before the
teacher's weights are read or a step is compiled.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable

from hydrahead_jax.config import HeadLayout, ModelConfig
from hydrahead_jax.interop.format import read_json
from hydrahead_jax.transfer import config as tconfig
from hydrahead_jax.transfer.config import TransferConfig, TransferConfigError


def _err(key: str, msg: str) -> TransferConfigError:
  return TransferConfigError(f"transfer config key {key!r}: {msg}")


@dataclasses.dataclass
class Preflight:
  cfg: TransferConfig  # with stage defaults resolved (long: teacher_window)
  teacher_cfg: ModelConfig
  window: int
  layout: HeadLayout | None
  tokenizer: Any


def teacher_config(cfg: TransferConfig) -> ModelConfig:
  """The teacher's ModelConfig without loading weights (TransferConfigError if it cannot be found)."""
  t = cfg.teacher
  if t.source == "train":
    from hydrahead_jax.train import config_lib

    if not os.path.isfile(t.train_config):
      raise _err("teacher.train_config", f"{t.train_config!r}: no such file (a train.py config for the teacher)")
    try:
      mcfg = config_lib.load(t.train_config, t.train_overrides).model
    except ValueError as e:
      raise _err("teacher.train_config", str(e)) from None
  else:
    from hydrahead_jax.interop.format import read_config
    from hydrahead_jax.interop.load import resolve
    from hydrahead_jax.interop.orbax import MANIFEST, ORBAX_FORMAT
    from hydrahead_jax.interop.safetensors import SAFETENSORS_CONFIG, SAFETENSORS_FORMAT

    try:
      fmt, path = resolve(t.source)
      if fmt == "orbax":
        mcfg = read_config(path, MANIFEST, ORBAX_FORMAT)
      elif fmt == "hydrahead-safetensors":
        mcfg = read_config(path, SAFETENSORS_CONFIG, SAFETENSORS_FORMAT)
      elif fmt == "hf":
        from hydrahead_jax.interop.hf import config_from_hf, read_hf_config

        mcfg = config_from_hf(read_hf_config(path))
      else:
        from hydrahead_jax.interop.gguf import GGUFCheckpoint

        mcfg = GGUFCheckpoint(path).config()
    except (OSError, ValueError, KeyError) as e:
      raise _err("teacher.source", f"{t.source!r}: {e}") from None
  if any(mcfg.num_fa_groups(i) != mcfg.num_kv_heads for i in range(mcfg.num_layers)):
    raise _err("teacher.source", f"{t.source!r} is a hybrid model; the teacher must be all full attention")
  from hydrahead_jax.interop.load import RESTORE_OVERRIDES

  bad = sorted(set(t.model_overrides) - set(RESTORE_OVERRIDES))
  if bad:
    raise _err("teacher.model_overrides", f"cannot set {bad} on the teacher (its parameter shapes are fixed); "
                                          f"allowed: {', '.join(RESTORE_OVERRIDES)}")
  try:
    return mcfg.replace(**dict(t.model_overrides))
  except ValueError as e:
    raise _err("teacher.model_overrides", str(e)) from None


def student_cfg(cfg: TransferConfig, tcfg: ModelConfig, layout: HeadLayout) -> ModelConfig:
  from hydrahead_jax.transfer.surgery import student_config

  kw = dict(cfg.convert.student)
  if cfg.convert.fusion:
    kw["fusion"] = cfg.convert.fusion
  kw.setdefault("param_dtype", "float32")
  kw.setdefault("dtype", cfg.teacher.compute_dtype or tcfg.dtype)
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  bad = sorted(set(kw) - known)
  if bad:
    raise _err("convert.student", f"unknown ModelConfig fields {bad}")
  fixed = sorted(k for k in kw if k in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                                        "head_dim", "mlp_dim", "layout", "tie_embeddings", "qk_norm"))
  if fixed:
    raise _err("convert.student", f"{fixed} are the teacher's (parameter reuse needs the same shapes)")
  try:
    return student_config(tcfg, layout, **kw)
  except (ValueError, TypeError) as e:
    raise _err("convert.student", str(e)) from None


def _names_for(cfgs: Iterable[ModelConfig]) -> dict[str, tuple[str, ...]]:
  from hydrahead_jax.interop.names import flat_names

  names = {}
  for c in cfgs:
    names.update({n: (n,) for n in flat_names(c)})
  return names


def _check_synthetic(key: str, dcfg, tok) -> None:
  from hydrahead_jax.data.synthetic import generate_example

  mix = dcfg.mixture()
  for task, w in dcfg.task_weights.items():
    if w <= 0:
      continue
    try:
      generate_example(task, dcfg.seed, 0, mix.min_len, tok)
    except ValueError as e:
      raise _err(key, f"synthetic task {task!r} does not fit documents of {mix.min_len} tokens ({e}); raise "
                      "data.min_doc_len / data.seq_len or drop the task") from None


def preflight(cfg: TransferConfig) -> Preflight:
  """Checks teacher, layout, student fields, trainable patterns, lengths vs data / teacher window, probes."""
  from hydrahead_jax.interop.load import tokenizer_for
  from hydrahead_jax.transfer.stages import make_plan

  cfg = tconfig.validate(cfg)
  tcfg = teacher_config(cfg)
  window = cfg.teacher.window or tcfg.max_position
  if cfg.teacher.source == "train":
    from hydrahead_jax.data.pipeline import resolve_tokenizer
    from hydrahead_jax.train import config_lib

    tok = resolve_tokenizer(config_lib.load(cfg.teacher.train_config, cfg.teacher.train_overrides).data)
  else:
    try:
      tok = tokenizer_for(cfg.teacher.source, cfg.teacher.tokenizer)
    except (OSError, ValueError) as e:
      raise _err("teacher.tokenizer", str(e)) from None
  layout = None
  if cfg.layout.file is not None:
    from hydrahead_jax.selection.policies import read_layout

    if not os.path.isfile(cfg.layout.file):
      raise _err("layout.file", f"{cfg.layout.file!r}: no such file (a layout JSON written by the selection)")
    try:
      layout = read_layout(cfg.layout.file)
      layout.validate(tcfg.num_layers, tcfg.num_kv_heads)
    except ValueError as e:
      raise _err("layout.file", str(e)) from None
  else:
    from hydrahead_jax.selection.policies import parse_budget
    from hydrahead_jax.selection.probes import make_probes

    try:
      parse_budget(cfg.layout.budget, tcfg.num_layers, tcfg.num_kv_heads)
    except ValueError as e:
      raise _err("layout.budget", str(e)) from None
    for L in cfg.layout.lengths:
      if L >= window:
        raise _err("layout.lengths", f"probes of {L} tokens do not fit the teacher's window ({window}); head scores "
                                     "beyond it measure extrapolation, not the teacher")
      try:
        make_probes(tok, L, tasks=cfg.layout.tasks, per_task=1, seed=cfg.layout.seed)
      except (ValueError, RuntimeError) as e:
        raise _err("layout.lengths", f"probes of {L} tokens: {e}") from None
  if layout is not None:
    names = _names_for([student_cfg(cfg, tcfg, layout)])
  else:  # any layout is possible: patterns must match a name of some layout
    G = tcfg.num_kv_heads
    cands = [HeadLayout.all_fa(tcfg.num_layers, G), HeadLayout.all_la(tcfg.num_layers)]
    names = _names_for([student_cfg(cfg, tcfg, lay) for lay in cands])
  stages = []
  for s in cfg.stages:
    p = f"stages.{s.name}"
    make_plan(s, names)
    d = s.data
    if s.kind == "long" and s.teacher_window is None:
      s = dataclasses.replace(s, teacher_window=window)
    uses_teacher = s.kind == "align" or s.kl_weight > 0
    reach = max_position(d)  # the largest input position a batch can hold
    if uses_teacher and s.teacher_window is None and reach >= window:
      raise _err(f"{p}.data.seq_len", f"positions up to {reach} ({_reach_why(d)}) reach beyond the teacher's window "
                                      f"({window} tokens); set {p}.teacher_window (KL inside it, CE beyond) or use "
                                      "a 'long' stage")
    if s.kind == "align" and reach >= window:
      raise _err(f"{p}.data.seq_len", f"positions up to {reach} ({_reach_why(d)}) reach beyond the teacher's window "
                                      f"({window}); stage-1 alignment needs the teacher's own attention outputs")
    if s.kind == "long" and reach < s.teacher_window:
      raise _err(f"{p}.data.seq_len", f"positions only up to {reach} ({_reach_why(d)}) never reach the teacher "
                                      f"window ({s.teacher_window}): no position would be trained beyond it")
    if d.source == "synthetic" or d.synthetic_fraction > 0:
      _check_synthetic(f"{p}.data", d, tok)
    if d.source not in ("synthetic", tconfig.CORPUS):
      check_prepared(f"{p}.data.source", d.source, d.seq_len)
    elif d.source == tconfig.CORPUS:
      out = cfg.corpus.out or os.path.join(cfg.workdir, "corpus")
      if os.path.isfile(os.path.join(out, "manifest.json")):
        check_prepared(f"{p}.data.source", out, d.seq_len)
      elif cfg.corpus.max_tokens < d.seq_len + 1:
        raise _err(f"{p}.data.seq_len", f"{d.seq_len} is longer than the whole corpus (corpus.max_tokens="
                                        f"{cfg.corpus.max_tokens})")
    stages.append(s)
  if cfg.eval.enabled:
    from hydrahead_jax.selection.probes import make_probes

    for L in cfg.eval.lengths:
      try:
        make_probes(tok, L, tasks=cfg.eval.tasks, per_task=1, seed=cfg.eval.seed)
      except (ValueError, RuntimeError) as e:
        raise _err("eval.lengths", f"probes of {L} tokens: {e}") from None
  return Preflight(cfg.replace(stages=tuple(stages)), tcfg, window, layout, tok)


def max_position(d) -> int:
  """The largest input position a batch of ``d`` can hold: documents are split into pieces of ``seq_len + 1``
  tokens (positions restart per piece); synthetic-only sources have documents of at most ``max_doc_len``."""
  longest = d.seq_len + 1
  if d.source == "synthetic" or d.synthetic_fraction >= 1:
    longest = min(longest, d.mixture().max_len)
  return longest - 2


def _reach_why(d) -> str:
  if d.source == "synthetic" or d.synthetic_fraction >= 1:
    return f"synthetic documents of up to {min(d.seq_len + 1, d.mixture().max_len)} tokens"
  return f"data.seq_len={d.seq_len}"


def check_prepared(key: str, path: str, seq_len: int) -> None:
  mf = os.path.join(path, "manifest.json")
  if not os.path.isfile(mf):
    raise _err(key, f"{path!r}: no manifest.json (a directory written by hydrahead_jax.data.prepare, "
                    f"'synthetic' or '{tconfig.CORPUS}')")
  m = read_json(mf)
  n = int(m.get("num_tokens", 0))
  if n < seq_len + 1:
    raise _err(key.rsplit(".", 1)[0] + ".seq_len", f"{seq_len} is longer than the data ({path!r} holds {n} tokens)")
