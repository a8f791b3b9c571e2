"""Training entry point: configs, optimizer masks, checkpoints, resume, signals, divergence, CLI.

Every run uses configs/micro.py (2 layers, d_model 32, T=64); compiled programs are shared through
a persistent compilation cache (also across the subprocesses), so each distinct program compiles once.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from run_files import checkpoint_params, logged_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.path.join(ROOT, "configs", "micro.py")


def _env():
  env = dict(os.environ)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def micro(workdir, *overrides):
  from hydrahead_jax.train import config_lib

  base = ["train.progress=false", "train.eval_tasks=", "train.steps=6", "checkpoint.every=3"]
  return config_lib.load(MICRO, base + list(overrides), workdir=str(workdir))


# A training process that can be killed from outside: it prints a line after each finished
# checkpoint save (and, with PAUSE_AT, then sleeps until it is killed) and after each step.
DRIVER = textwrap.dedent("""
    import os, sys, time
    from hydrahead_jax.train import config_lib
    from hydrahead_jax.train.loop import train
    pause_at = int(os.environ.get("PAUSE_AT", "0"))
    def hook(event, step, trainer):
      if event == "checkpoint":
        trainer.checkpointer.wait()
        print(f"SAVED {step}", flush=True)
        if step == pause_at:
          time.sleep(600)
      else:
        print(f"STEP {step}", flush=True)
        if os.environ.get("SLOW"):
          time.sleep(float(os.environ["SLOW"]))
    cfg = config_lib.load(sys.argv[1], sys.argv[3:], workdir=sys.argv[2])
    train(cfg, callbacks=[hook])
    print("DONE", flush=True)
""")


def _spawn(tmp_path, workdir, overrides, **env):
  script = tmp_path / "driver.py"
  script.write_text(DRIVER)
  base = ["train.progress=false", "train.eval_tasks=", "train.steps=6", "checkpoint.every=3"]
  return subprocess.Popen([sys.executable, str(script), MICRO, str(workdir), *base, *overrides],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**_env(), **env}, cwd=ROOT)


def _wait_for(proc, prefix, timeout=240):
  lines, t0 = [], time.time()
  while time.time() - t0 < timeout:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line)
    if line.startswith(prefix):
      return lines
  proc.kill()
  raise AssertionError(f"never saw {prefix!r}; output:\n{''.join(lines)[-4000:]}")


# -- config -----------------------------------------------------------------------------------------
def test_config_overrides_and_errors(tmp_path):
  from hydrahead_jax.train import config_lib

  cfg = micro(tmp_path, "optim.lr=1e-3", "data.task_weights=mqar:1,grammar:0.5", "model.num_layers=3",
              "train.eval_tasks=mqar,niah_single", "train.eval_len=None", "model.remat=full")
  assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
  assert dict(cfg.data.task_weights) == {"mqar": 1.0, "grammar": 0.5}
  assert cfg.model.num_layers == 3 and cfg.model.layout.fa_groups == ((0,), (0,), (0,))
  assert cfg.train.eval_tasks == ("mqar", "niah_single") and cfg.train.eval_len is None
  assert config_lib.from_dict(json.loads(config_lib.to_json(cfg))) == cfg
  assert micro(tmp_path, "model.layout=[[1],[0, 1]]").model.layout.fa_groups == ((1,), (0, 1))
  assert micro(tmp_path, "model.layout=all_la").model.layout.total_fa_groups() == 0

  cases = {
      "optim.lrr=1": ["unknown key 'optim.lrr'", "did you mean 'lr'"],
      "trian.steps=3": ["unknown key 'trian.steps'"],
      "train.steps=abc": ["'train.steps'", "expected int"],
      "train.progress=maybe": ["'train.progress'", "bool"],
      "model.layout=[[5],[0]]": ["'model.layout'", "out of range"],
      "model.layout=[[0]]": ["'model.layout'", "num_layers=2"],
      "model.layout=sometimes": ["'model.layout'", "bad layout"],
      "model.fusion=softmax": ["'model.fusion'", "unknown variant"],
      "data.batch_size=5": ["data.batch_size=5", "grad_accum"],
      "train.steps": ["dotted.key=value"],
  }
  for override, needles in cases.items():
    with pytest.raises(ValueError) as e:
      micro(tmp_path, override, *(["train.grad_accum=2"] if "batch_size" in override else []))
    for n in needles:
      assert n in str(e.value), (override, str(e.value))

  bad_file = tmp_path / "bad.py"
  bad_file.write_text(textwrap.dedent("""
      import dataclasses
      def get_config():
        from hydrahead_jax.train.config_lib import Config, TrainConfig
        return Config(train=dataclasses.replace(TrainConfig(), steps="10"))
  """))
  with pytest.raises(ValueError, match="'train.steps'"):
    config_lib.load(str(bad_file))


def test_optimizer_freeze_and_decay_masks():
  import jax
  import jax.numpy as jnp
  import optax

  from hydrahead_jax.nn.model import abstract_model
  from hydrahead_jax.train import config_lib, optim
  from hydrahead_jax.train.state import flatten_state, leaf_names
  from flax import nnx

  cfg = config_lib.load(MICRO)
  params = flatten_state(nnx.state(abstract_model(cfg.model), nnx.Param))
  params = {k: jnp.ones(v.shape, jnp.float32) for k, v in params.items()}
  names = leaf_names(cfg.model, params)
  ocfg = config_lib.OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=0.0,
                                freeze=("embed.*", "layers.0.mlp.*"))
  plan = optim.plan_params(ocfg, names)
  assert names["segments.0.mlp.w_up"] == ("layers.0.mlp.w_up", "layers.1.mlp.w_up")
  assert plan.label["embed.embedding"] == optim.FROZEN
  assert list(plan.layer_mask["segments.0.mlp.w_up"]) == [False, True]
  for key in ("final_norm.scale", "segments.0.mixer.la.a_log", "segments.0.mixer.la.dt_bias",
              "segments.0.mixer.la.conv_q", "segments.0.mixer.fusion.fa_scale",
              "segments.0.mixer.fa.q_norm.scale", "segments.0.mixer.la.z_bias"):
    assert not plan.decay[key], key
  for key in ("segments.0.mixer.la.wq", "segments.0.mlp.w_up", "segments.0.mixer.wo", "embed.embedding"):
    assert plan.decay[key], key

  tx, _ = optim.make_optimizer(ocfg, plan, total_steps=10)
  state = jax.jit(tx.init)(params)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zero_grads, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new["embed.embedding"], 1.0)  # frozen
  np.testing.assert_array_equal(new["segments.0.mlp.w_up"][0], 1.0)  # frozen layer of a stacked leaf
  assert float(new["segments.0.mlp.w_up"][1].max()) < 1.0  # trainable layer: decayed
  np.testing.assert_array_equal(new["final_norm.scale"], 1.0)  # no decay
  assert float(new["segments.0.mixer.la.wq"].max()) < 1.0

  with pytest.raises(ValueError, match="optim.freeze: pattern 'layers.9.*' matches no parameter"):
    optim.plan_params(config_lib.OptimConfig(freeze=("layers.9.*",)), names)


# -- data position through a checkpoint ------------------------------------------------------------
def test_step_window_times_throughput_apart_from_compile_and_stops_on_nan(monkeypatch):
  """The metrics window both loops use (train and the transfer's stages): first window = compile time, the rest
  throughput (less excluded evaluation time); a non-finite step is reported, then raises TrainingDiverged."""
  from hydrahead_jax.train import loop

  clock = [100.0]
  monkeypatch.setattr(loop.time, "time", lambda: clock[0])
  w = loop.StepWindow(tokens_per_step=10, keep_losses=3)
  ok = lambda loss: {"ok": True, "loss": loss}  # noqa: E731
  w.add(1, ok(5.0))
  w.first_step_done()
  clock[0] += 7.0
  rows, tok_s, dt, n = w.drain(dict, None)
  assert w.first_s == 7.0 and np.isnan(tok_s) and n == 0 and w.tokens_per_s is None and rows[0][0] == 1
  for step in (2, 3, 4, 5):
    w.add(step, ok(float(step)), "phase0")
  clock[0] += 6.0
  w.exclude(2.0)  # an evaluation inside the window
  rows, tok_s, dt, n = w.drain(dict, 1)
  assert (dt, n, tok_s) == (4.0, 4, 10.0) and [r[2] for r in rows] == ["phase0"] * 4
  assert list(w.recent) == [3.0, 4.0, 5.0] and w.tokens_per_s == 10.0 and not w.pending
  seen = []
  w.add(6, {"ok": False, "loss": float("nan"), "grad_norm": float("inf")})
  with pytest.raises(loop.TrainingDiverged, match="step 6.*Last good checkpoint: step 5"):
    w.drain(dict, 5, lambda s, m: seen.append(s))
  assert seen == [6]


def test_data_iterator_resumes_at_next_batch_via_checkpoint(tmp_path):
  from hydrahead_jax.data.pipeline import make_train_iterator
  from hydrahead_jax.train.checkpoint import Checkpointer

  cfg = micro(tmp_path)
  straight = make_train_iterator(cfg.data)
  expected = [next(straight) for _ in range(5)]
  it = make_train_iterator(cfg.data)
  for _ in range(3):
    next(it)
  ck = Checkpointer(str(tmp_path), cfg.checkpoint)
  ck.save(3, {"x": np.zeros(2, np.float32)}, it, {"note": "test"})
  next(it)  # advancing after the (async) save must not change what was saved
  ck.close()
  fresh = make_train_iterator(cfg.data)
  ck = Checkpointer(str(tmp_path), cfg.checkpoint)
  import jax
  ck.restore(3, {"x": jax.ShapeDtypeStruct((2,), np.float32)}, fresh)
  ck.close()
  for want in expected[3:]:
    got = next(fresh)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# -- resume exactness, SIGTERM, incompatible run dir ----------------------------------------------
def test_resume_after_kill_is_exact(tmp_path, cache_dir):
  from hydrahead_jax.train.loop import train

  straight = tmp_path / "straight"
  train(micro(straight), print_fn=lambda *_: None)

  resumed = tmp_path / "resumed"
  proc = _spawn(tmp_path, resumed, [], PAUSE_AT="3")
  _wait_for(proc, "SAVED 3")
  proc.send_signal(signal.SIGKILL)  # not a clean exit
  proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL
  assert sorted(int(d) for d in os.listdir(resumed / "checkpoints") if d.isdigit()) == [3]

  summary = train(micro(resumed), print_fn=lambda *_: None)
  assert summary["step"] == 6
  a, b = logged_losses(straight), logged_losses(resumed)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  assert a == b
  pa, pb = checkpoint_params(straight, 6), checkpoint_params(resumed, 6)
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)

  # a different model in the same run directory is refused, and nothing is overwritten
  from hydrahead_jax.train.checkpoint import IncompatibleRunDir

  before = sorted(os.listdir(resumed / "checkpoints"))
  with pytest.raises(IncompatibleRunDir, match=r"model.d_model: checkpoint has 32, this run has 64"):
    train(micro(resumed, "model.d_model=64", "model.head_dim=16"), print_fn=lambda *_: None)
  assert sorted(os.listdir(resumed / "checkpoints")) == before


def test_sigterm_saves_and_resumes(tmp_path, cache_dir):
  from hydrahead_jax.train.loop import train

  workdir = tmp_path / "run"
  proc = _spawn(tmp_path, workdir, ["checkpoint.every=100"], SLOW="1.0")
  _wait_for(proc, "STEP 2")
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, out
  saved = [int(line.split()[1]) for line in out.splitlines() if line.startswith("SAVED")]
  assert len(saved) == 1 and 2 <= saved[0] < 6 and "DONE" in out, out
  summary = train(micro(workdir, "checkpoint.every=100"), print_fn=lambda *_: None)
  assert summary["step"] == 6 and summary["status"] == "complete"
  assert sorted(logged_losses(workdir)) == list(range(1, 7))


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, cache_dir):
  import jax.numpy as jnp

  from hydrahead_jax.train.loop import TrainingDiverged, train

  def poison(event, step, trainer):  # after step 2 (and its checkpoint) a weight becomes NaN
    if event == "step" and step == 2:
      params = dict(trainer.state["params"])
      params["final_norm.scale"] = params["final_norm.scale"] * jnp.nan
      trainer.state = {**trainer.state, "params": params}

  with pytest.raises(TrainingDiverged, match="diverged at step 3") as e:
    train(micro(tmp_path, "checkpoint.every=1"), callbacks=[poison], print_fn=lambda *_: None)
  assert e.value.step == 3 and e.value.last_checkpoint == 2
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps == [1, 2]
  for v in checkpoint_params(str(tmp_path), 2).values():
    assert np.isfinite(v).all()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows[-1]["step"] == 3 and rows[-1]["ok"] == 0


# -- CLI --------------------------------------------------------------------------------------------
def test_cli_micro_smoke(tmp_path, cache_dir):
  workdir = tmp_path / "cli"
  # steps=6: the same compiled train step as the other tests (the schedule length is part of it)
  out = subprocess.run([sys.executable, "train.py", "--config", MICRO, "--workdir", str(workdir),
                        "--set", "train.progress=false", "--set", "train.steps=6"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert out.stdout.count("resolved config:") == 1 and "summary (complete, step 6)" in out.stdout
  assert json.load(open(workdir / "config.json"))["model"]["d_model"] == 32
  assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [4, 6]
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
  assert any("eval/retrieval_acc" in r for r in rows)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tb"))
  assert (workdir / "loss.png").stat().st_size > 1000
  summary = json.load(open(workdir / "summary.json"))
  assert summary["step"] == 6 and np.isfinite(summary["final_loss"])


def test_cli_config_error_exit_code(capsys):
  import importlib.util

  spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  assert cli.main(["--config", MICRO, "--set", "optim.lrr=1"]) == 2
  assert "unknown key 'optim.lrr'" in capsys.readouterr().err
  assert cli.main(["--config", MICRO, "--print-config", "--set", "train.steps=7"]) == 0
  assert json.loads(capsys.readouterr().out)["train"]["steps"] == 7
