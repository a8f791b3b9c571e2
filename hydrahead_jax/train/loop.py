"""The training loop: setup, resume, train, evaluate, log, checkpoint, summarise.

Files in the run directory: ``config.json`` (resolved config), ``checkpoints/``, ``metrics.jsonl``
(one JSON object per logged step / evaluation), ``tb/`` (TensorBoard events), ``loss.png`` and
``summary.json``. Metrics are fetched from the device every ``log_every`` steps (and before every
checkpoint), so the host keeps producing batches while the device computes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hydrahead_jax.data.pipeline import (make_eval_batches, make_train_iterator, resolve_tokenizer,
                                         validate_source)
from hydrahead_jax.nn.model import create_model
from hydrahead_jax.train import config_lib, distributed, optim
from hydrahead_jax.train.checkpoint import (Checkpointer, CheckpointUnusable, DamagedCheckpoint,
                                           IncompatibleRunDir, abstract_like, newest_compatible)
from hydrahead_jax.train.config_lib import Config
from hydrahead_jax.train.state import flatten_state, leaf_names, tree_shardings
from hydrahead_jax.train.step import BATCH_KEYS, host_metrics, make_eval_step, make_train_step

BATCH_AXES = ("data", "fsdp")
Callback = Callable[[str, int, "Trainer"], None]  # (event: 'step' | 'checkpoint', step, trainer)


class TrainingDiverged(RuntimeError):
  def __init__(self, step: int, metrics: Mapping[str, float], last_checkpoint: int | None):
    self.step, self.metrics, self.last_checkpoint = step, dict(metrics), last_checkpoint
    super().__init__(
        f"training diverged at step {step}: loss={metrics.get('loss')}, grad_norm="
        f"{metrics.get('grad_norm')}, param_norm={metrics.get('param_norm')} (not finite); stopped "
        f"without saving. Last good checkpoint: "
        f"{'step ' + str(last_checkpoint) if last_checkpoint is not None else 'none'}")


class StepWindow:
  """The steps since their metrics were last read back (one device-to-host transfer per window, not per step).
  ``drain`` fetches them, stops at a non-finite step (TrainingDiverged, after ``on_diverged`` logged it) and times
  the window: the first one (compile + first step) apart, the others as throughput. Used by ``train`` and by the
  transfer's stages."""

  def __init__(self, tokens_per_step: int, keep_losses: int):
    self.tokens_per_step = tokens_per_step
    self.pending: list[tuple] = []
    self.recent: collections.deque = collections.deque(maxlen=keep_losses)  # the last losses: the final loss
    self.first_s: float | None = None
    self.train_s, self.train_steps = 0.0, 0
    self._start, self._steps = time.time(), 0

  def add(self, step: int, metrics: Any, *tags) -> None:
    self.pending.append((step, metrics, tags))
    self._steps += 1

  def first_step_done(self) -> None:
    """Called once the first step has finished: it counts as compile time, not throughput."""
    self._steps = 0

  def exclude(self, seconds: float) -> None:
    """Leaves ``seconds`` spent on something else (an evaluation) out of the window's time."""
    self._start += seconds

  def drain(self, to_host: Callable[[Any], dict], last_saved: int | None,
            on_diverged: Callable[..., None] = lambda *a: None):
    """(rows [(step, to_host(metrics), *tags)], tokens/s of the window (nan without timed steps), its seconds,
    its timed steps)."""
    rows = [(s, to_host(m), *tags) for s, m, tags in self.pending]
    self.pending.clear()
    dt, n = time.time() - self._start, self._steps
    for s, m, *tags in rows:
      if not m["ok"]:
        on_diverged(s, m, *tags)
        raise TrainingDiverged(s, m, last_saved)
    if self.first_s is None:
      self.first_s = dt
    else:
      self.train_s += dt
      self.train_steps += n
    self.recent.extend(m["loss"] for _, m, *_ in rows)
    self._start, self._steps = time.time(), 0
    return rows, (n * self.tokens_per_step / dt if dt > 0 and n else float("nan")), dt, n

  @property
  def tokens_per_s(self) -> float | None:
    """Throughput over every window but the first."""
    return self.train_steps * self.tokens_per_step / self.train_s if self.train_s > 0 else None


# -- small helpers --------------------------------------------------------------------------------
def make_mesh(cfg: Config) -> jax.sharding.Mesh:
  """data x fsdp x context mesh (axes of size 1 besides 'data' left out); 'context' splits every sequence
  (hydrahead_jax/parallel/context.py)."""
  devices = jax.devices()
  fsdp, cp = cfg.train.fsdp, cfg.train.context_parallel
  dp = cfg.train.data_parallel if cfg.train.data_parallel != -1 else len(devices) // (fsdp * cp)
  n = dp * fsdp * cp
  if n < 1 or n > len(devices):
    raise ValueError(f"train.data_parallel={cfg.train.data_parallel} x train.fsdp={fsdp} x "
                     f"train.context_parallel={cp} needs {n} devices; {len(devices)} available")
  micro = cfg.data.batch_size // cfg.train.grad_accum
  if micro % (dp * fsdp):
    raise ValueError(f"microbatch of {micro} rows (data.batch_size / train.grad_accum) is not divisible "
                     f"by the {dp * fsdp} devices of the data/fsdp mesh axes")
  for what, length in (("data.seq_len", cfg.data.seq_len), ("train.eval_len", cfg.train.eval_len)):
    if length is not None and length % cp:
      raise ValueError(f"{what}={length} is not divisible by train.context_parallel={cp}")
  # Only axes of size > 1 besides 'data': the rule table maps both 'batch' and 'embed' to 'fsdp'.
  sizes = [(a, s) for a, s in (("data", dp), ("fsdp", fsdp), ("context", cp)) if a == "data" or s > 1]
  return jax.make_mesh(tuple(s for _, s in sizes), tuple(a for a, _ in sizes),
                       axis_types=(jax.sharding.AxisType.Auto,) * len(sizes), devices=devices[:n])


def batch_pspec(mesh) -> P:
  """[B, T] batch arrays: rows over the data/fsdp axes, positions over 'context' (when the mesh has it)."""
  rows = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return P(rows, "context") if "context" in mesh.axis_names else P(rows)


class SignalFlag:
  """SIGTERM/SIGINT set a flag (the loop finishes the step, saves and exits); restored on exit."""

  def __init__(self):
    self.received: int | None = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C aborts at once
    self.received = signum

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    return False


class MetricsLog:
  """metrics.jsonl + TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self.tb = None
    if enabled:
      try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415
      except ImportError:
        print("warning: tensorboardX is not installed; no TensorBoard events (metrics.jsonl only)")
      else:
        self.tb = SummaryWriter(os.path.join(workdir, "tb"))

  def truncate_after(self, step: int) -> None:
    """Drops rows logged after ``step`` (a resumed run repeats them)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    with open(self.path, "w") as f:
      for r in rows:
        if r.get("step", 0) <= step:
          f.write(json.dumps(r) + "\n")

  def write(self, row: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({k: _json_float(v) for k, v in row.items()}) + "\n")
    for k, v in row.items():
      if self.tb is not None and k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
        self.tb.add_scalar(k, v, int(row["step"]))

  def close(self) -> None:
    if self.tb is not None:
      self.tb.flush()
      self.tb.close()


def _json_float(v):
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def plot_metrics(metrics_path: str, out_png: str) -> None:
  """Loss curve (and eval retrieval accuracy, when present) from metrics.jsonl."""
  try:
    import matplotlib  # noqa: PLC0415
  except ImportError:
    print("warning: matplotlib is not installed; no loss plot")
    return
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  rows = []
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
  evals = [(r["step"], r["eval/retrieval_acc"]) for r in rows if "eval/retrieval_acc" in r]
  fig, ax = plt.subplots(figsize=(7, 4))
  if train:
    ax.plot(*zip(*train), label="train loss", color="tab:blue")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.grid(alpha=0.3)
  if evals:
    ax2 = ax.twinx()
    ax2.plot(*zip(*evals), "o-", color="tab:orange", label="eval retrieval acc")
    ax2.set_ylabel("retrieval accuracy")
    ax2.set_ylim(0, 1)
    ax2.legend(loc="upper right")
  ax.legend(loc="upper left")
  ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
  fig.tight_layout()
  fig.savefig(out_png, dpi=100)
  plt.close(fig)


# -- the trainer ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Trainer:
  cfg: Config
  mesh: Any
  checkpointer: Checkpointer
  state: Any = None
  data_iter: Any = None
  step: int = 0


def _global_batch(local: Mapping[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k])) for k in BATCH_KEYS}


def _replicated_array(x: np.ndarray, sharding) -> jax.Array:
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def build_eval_sets(cfg: Config, n_devices: int) -> dict[str, list[dict[str, np.ndarray]]]:
  """Held-out retrieval batches per task (make_eval_batches), padded to whole eval batches."""
  tok = resolve_tokenizer(cfg.data)
  length = cfg.train.eval_len or cfg.data.seq_len
  bs = -(-cfg.train.eval_batch_size // n_devices) * n_devices
  out = {}
  for task in cfg.train.eval_tasks:
    full = make_eval_batches(task, cfg.train.eval_examples, length, cfg.train.eval_seed, tok)
    n = full["inputs"].shape[0]
    pad = (-n) % bs
    chunks = []
    for s in range(0, n + pad, bs):
      b = {}
      for k in BATCH_KEYS:
        x = full[k]
        if pad:
          filler = np.zeros((pad,) + x.shape[1:], x.dtype)
          if k == "segment_ids":
            filler += 1
          x = np.concatenate([x, filler])
        b[k] = x[s:s + bs]
      chunks.append(b)
    out[task] = chunks
  return out


def train(cfg: Config, callbacks: Iterable[Callback] = (), print_fn: Callable[[str], None] = print
          ) -> dict[str, Any]:
  """Runs (or resumes) the training run described by ``cfg``; returns the summary dict.

  Raises ``IncompatibleRunDir`` (run directory holds checkpoints of another config),
  ``CheckpointUnusable`` (no checkpoint restores, or one does not and ``checkpoint.fallback`` is
  off), ``CheckpointSaveFailed`` (``checkpoint.on_save_error='stop'``), ``DataSourceError`` (bad
  prepared data; before the first step) and ``TrainingDiverged`` (non-finite loss / gradient norm;
  nothing saved for that step). All but the last are ``hydrahead_jax.cli.UserError``.
  """
  t_start = time.time()
  distributed.initialize(cfg.train.distributed)  # HYDRAHEAD_* env vars or JAX's auto-detection
  is_main = jax.process_index() == 0
  workdir = cfg.workdir
  os.makedirs(workdir, exist_ok=True)
  cfg_dict = config_lib.to_dict(cfg)
  ckpt = Checkpointer(workdir, cfg.checkpoint, print_fn if is_main else lambda *_: None)
  try:  # before the first step: the run directory and the data are usable
    latest, changes = _check_run_dir(ckpt, cfg, cfg_dict)
    validate_source(cfg.data, cfg.model.vocab_size)
  except BaseException:
    ckpt.close()
    raise
  if is_main:
    print_fn("resolved config:\n" + config_lib.to_json(cfg))
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(cfg) + "\n")

  mesh = make_mesh(cfg)
  n_dev = mesh.devices.size
  batch_sharding = NamedSharding(mesh, batch_pspec(mesh))
  replicated = NamedSharding(mesh, P())
  log = MetricsLog(workdir, is_main)
  trainer = Trainer(cfg, mesh, ckpt)
  callbacks = list(callbacks)

  with jax.set_mesh(mesh), SignalFlag() as signals, contextlib.ExitStack() as stack:
    stack.callback(log.close)
    stack.callback(ckpt.close)
    # model, optimizer, state
    model = create_model(cfg.model, seed=cfg.train.seed, mesh=mesh)
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    params = flatten_state(params_state)
    del model, params_state
    names = leaf_names(cfg.model, params)
    plan = optim.plan_params(cfg.optim, names)
    tx, sched = optim.make_optimizer(cfg.optim, plan, cfg.train.steps)
    p_shard = tree_shardings(params)
    o_shard = optim.opt_state_shardings(tx, params, p_shard)
    opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)
    state = {"params": params, "opt_state": opt_state, "step": jax.device_put(jnp.zeros((), jnp.int32), replicated)}
    state_shardings = {"params": p_shard, "opt_state": o_shard, "step": replicated}
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    if is_main:
      print_fn(f"model: {sum(int(np.prod(s)) for s in shapes.values()):,} parameters; layout "
               f"{cfg.model.layout.describe(cfg.model.num_kv_heads)}; {optim.describe(plan, shapes)}")
      axes = ", ".join(f"{k}={v}" for k, v in dict(mesh.shape).items())
      print_fn(f"devices: {n_dev} x {jax.devices()[0].device_kind} (mesh {axes}), processes: {jax.process_count()}")

    # data
    pc = jax.process_count()
    if cfg.data.batch_size % pc:
      raise ValueError(f"data.batch_size={cfg.data.batch_size} is not divisible by {pc} JAX processes")
    dcfg = dataclasses.replace(cfg.data, batch_size=cfg.data.batch_size // pc)
    data_iter = make_train_iterator(dcfg, jax.process_index(), pc)
    start = 0
    if latest is not None:
      state, start, changes = _restore_newest(ckpt, latest, changes, state, data_iter, cfg_dict)
      log.truncate_after(start)
      if is_main:
        if changes:
          print_fn("resuming with changed (resume-safe) keys: " +
                   ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        print_fn(f"resumed from {ckpt.directory}/{start} (step {start})")
    elif is_main and os.path.exists(log.path):
      os.remove(log.path)  # no checkpoint: a fresh run starts fresh logs
    trainer.state, trainer.data_iter, trainer.step = state, data_iter, start

    step_fn = jax.jit(make_train_step(graphdef, rest, tx, sched, cfg.train.grad_accum,
                                      cfg.train.answer_loss_weight, loss_chunk=cfg.train.loss_chunk),
                      out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    eval_fn = jax.jit(make_eval_step(graphdef, rest, loss_chunk=cfg.train.loss_chunk), out_shardings=replicated)
    eval_sets = build_eval_sets(cfg, n_dev) if cfg.train.eval_tasks else {}

    def run_eval(step: int) -> dict[str, float]:
      row: dict[str, float] = {"step": step}
      accs = []
      for task, chunks in eval_sets.items():
        sums = collections.Counter()
        for b in chunks:
          out = jax.device_get(eval_fn(trainer.state["params"],
                                       {k: _replicated_array(b[k], batch_sharding) for k in BATCH_KEYS}))
          sums.update({k: float(v) for k, v in out.items()})
        acc = sums["answer_hits"] / max(sums["answers"], 1.0)
        row[f"eval/{task}/answer_acc"] = acc
        row[f"eval/{task}/exact_match"] = sums["rows_correct"] / max(sums["rows"], 1.0)
        row[f"eval/{task}/loss"] = sums["ce_sum"] / max(sums["tokens"], 1.0)
        accs.append(acc)
      if accs:
        row["eval/retrieval_acc"] = float(np.mean(accs))
      log.write(row)
      return row

    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    pbar = None
    if cfg.train.progress and is_main:
      from tqdm.auto import tqdm  # noqa: PLC0415
      pbar = tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                  mininterval=0.5)
      stack.callback(pbar.close)
    window = StepWindow(tokens_per_step, max(10, cfg.train.log_every))
    last_eval: dict[str, float] = {}
    last_saved = latest

    def flush() -> None:
      if not window.pending:
        return
      rows, tok_s, dt, window_steps = window.drain(host_metrics, last_saved,
                                                   lambda s, m: log.write({"step": s, **m}))
      now = time.time()
      for s, m in rows:
        row = {"step": s, "loss": m["loss"], "grad_norm": m["grad_norm"], "param_norm": m["param_norm"],
               "lr": m["lr"], "tokens_per_s": tok_s, "time": now - t_start}
        if "answer_acc" in m:
          row["answer_acc"] = m["answer_acc"]
        if s % cfg.train.log_every == 0 or s == rows[-1][0]:
          log.write(row)
      if pbar is not None:
        pbar.update(len(rows))
        pbar.set_postfix(loss=f"{rows[-1][1]['loss']:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
      elif is_main and rows[-1][0] % cfg.train.log_every == 0:
        s, m = rows[-1]
        eta = (cfg.train.steps - s) * dt / max(window_steps, 1) if window_steps else float("nan")
        print_fn(f"step {s}/{cfg.train.steps} loss {m['loss']:.4f} grad_norm {m['grad_norm']:.3f} "
                 f"tok/s {tok_s:,.0f} eta {eta:.0f}s")

    def save(step: int) -> None:
      nonlocal last_saved
      if not ckpt.save(step, trainer.state, data_iter, cfg_dict):
        return  # failed, reported; checkpoint.on_save_error='continue'
      last_saved = step
      for cb in callbacks:
        cb("checkpoint", step, trainer)

    total = cfg.train.steps
    step = start
    first = True
    while step < total and signals.received is None:
      local = next(data_iter)
      batch = _global_batch(local, batch_sharding)
      trainer.state, metrics = step_fn(trainer.state, batch)
      step += 1
      trainer.step = step
      window.add(step, metrics)
      if first:  # compile + first step, timed separately from the throughput
        jax.block_until_ready(metrics)
        window.first_step_done()
        first = False
        flush_now = True
      else:
        flush_now = False
      do_save = step % cfg.checkpoint.every == 0 or step == total or signals.received is not None
      do_eval = cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0 and step < total
      if flush_now or do_save or do_eval or step % cfg.train.log_every == 0:
        flush()
      if do_save:
        save(step)
      if do_eval:
        t_eval = time.time()
        last_eval = run_eval(step)
        window.exclude(time.time() - t_eval)
      for cb in callbacks:
        cb("step", step, trainer)
    flush()
    if pbar is not None:
      pbar.close()
    interrupted = signals.received is not None
    if last_saved != step:
      save(step)
    ckpt.wait()
    if interrupted:
      if is_main:
        print_fn(f"received {signal.Signals(signals.received).name}: saved checkpoint at step {step}; exiting")
    elif eval_sets and (not last_eval or last_eval.get("step") != step):
      last_eval = run_eval(step)
    if is_main:
      plot_metrics(log.path, os.path.join(workdir, "loss.png"))

  wall = time.time() - t_start
  summary = {
      "step": step,
      "status": "interrupted" if interrupted else "complete",
      "final_loss": float(np.mean(window.recent)) if window.recent else None,
      "eval": {k: v for k, v in last_eval.items() if k != "step"},
      "retrieval_acc": last_eval.get("eval/retrieval_acc"),
      "tokens_per_s": window.tokens_per_s,
      "compile_and_first_step_s": window.first_s,
      "wall_s": wall,
      "workdir": workdir,
      "checkpoint": ckpt.last_committed,
  }
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    print_fn(format_summary(summary))
  return summary


def _check_run_dir(ckpt: Checkpointer, cfg: Config, cfg_dict: Mapping[str, Any]
                   ) -> tuple[int | None, dict]:
  """The newest checkpoint step whose config reads back and is compatible (None: fresh run) and
  its resume-safe config changes.

  Damaged steps are set aside on the way (or stop the run, ``checkpoint.fallback=False``)."""
  steps = ckpt.all_steps()
  if steps and not cfg.checkpoint.resume:
    raise IncompatibleRunDir(f"run directory {cfg.workdir!r} already holds checkpoints (latest step {steps[-1]}) "
                             "and checkpoint.resume=false; refusing to overwrite them. Use another --workdir.")
  latest, changes = newest_compatible(ckpt, cfg_dict)
  if steps and latest is None:
    raise _none_restores(ckpt)
  if latest is not None:  # not a damaged step: the data item of another process count does not restore
    distributed.check_process_count(ckpt.step_dir(latest), jax.process_count())
  if latest is None and ckpt.damaged_dirs():
    ckpt.print_fn(f"note: {ckpt.directory} holds only checkpoints set aside as damaged "
                  f"({', '.join(os.path.basename(d) for d in ckpt.damaged_dirs())}); starting from step 0")
  return latest, changes


def _none_restores(ckpt: Checkpointer) -> CheckpointUnusable:
  aside = ", ".join(os.path.basename(d) for d in ckpt.damaged_dirs())
  return CheckpointUnusable(
      f"no checkpoint in {ckpt.directory} can be restored; every step was moved aside as damaged "
      f"({aside}), nothing was deleted. Rerun the same command to start this run again from step 0 "
      "in this directory, or use another --workdir")


def _restore_newest(ckpt: Checkpointer, step: int, changes: dict, state: Any, data_iter,
                    cfg_dict: Mapping[str, Any]) -> tuple[Any, int, dict]:
  """Restores the newest step that restores, from ``step`` (config already checked) down; damaged
  steps are set aside. Returns (state, step, the resume-safe config changes of that step)."""
  while True:
    try:
      restored = ckpt.restore(step, abstract_like(state), data_iter)
      got = int(jax.device_get(restored["step"]))
      if got != step:
        raise DamagedCheckpoint(step, f"it holds the train state of step {got}")
      return restored, step, changes
    except DamagedCheckpoint as e:
      ckpt.handle_damaged(e)
      step, changes = newest_compatible(ckpt, cfg_dict)
      if step is None:
        raise _none_restores(ckpt) from None


def format_summary(s: Mapping[str, Any]) -> str:
  def f(x, fmt):
    return "n/a" if x is None else format(x, fmt)

  lines = [f"summary ({s['status']}, step {s['step']}):",
           f"  final train loss   {f(s['final_loss'], '.4f')}  (mean of the last logged steps)",
           f"  eval retrieval acc {f(s['retrieval_acc'], '.3f')}  (teacher-forced answer tokens; chance "
           "~0.1 for digits)"]
  for k, v in s["eval"].items():
    lines.append(f"    {k:34s} {v:.4f}")
  lines += [f"  tokens/s           {f(s['tokens_per_s'], ',.0f')}  (after compile)",
            f"  compile+1st step   {f(s['compile_and_first_step_s'], '.1f')} s",
            f"  wall time          {s['wall_s']:.1f} s",
            f"  run directory      {s['workdir']} (checkpoint step {s['checkpoint']})"]
  return "\n".join(lines)
