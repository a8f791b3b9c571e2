"""Reliability under faults (docs/reliability.md): damaged / partial checkpoints, failed saves, bad
prepared data, one-line CLI errors. Fault injection: tests/faults.py.

Every training run uses configs/micro.py for 6 steps with checkpoints at 3 and 6, so all runs share
one compiled train step (persistent compilation cache, also across the subprocesses). One straight
run is made per module and copied, then damaged, by the tests.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from run_files import checkpoint_params, logged_losses

import faults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.path.join(ROOT, "configs", "micro.py")
BASE = ["train.progress=false", "train.eval_tasks=", "train.steps=6", "checkpoint.every=3",
        "checkpoint.keep=3"]


def _env():
  env = dict(os.environ)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.pop("HYDRAHEAD_DEBUG", None)
  return env


def micro(workdir, *overrides):
  from hydrahead_jax.train import config_lib

  return config_lib.load(MICRO, BASE + list(overrides), workdir=str(workdir))


def run(workdir, *overrides, callbacks=()):
  """Trains in-process; returns (summary, printed lines)."""
  from hydrahead_jax.train.loop import train

  lines = []
  summary = train(micro(workdir, *overrides), callbacks=callbacks, print_fn=lines.append)
  return summary, lines


def entries(workdir):
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def warnings(lines):
  return [line for line in lines if line.startswith("warning:")]


def assert_params_equal(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir):
  """A run straight to step 6 (checkpoints 3 and 6); tests copy it before damaging it."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  summary, _ = run(workdir)
  assert summary["step"] == 6 and entries(workdir) == ["3", "6"]
  return workdir


def copy_run(straight, tmp_path, name="run"):
  dst = str(tmp_path / name)
  shutil.copytree(straight, dst)
  return dst


# -- damaged checkpoints ----------------------------------------------------------------------------
def test_corrupt_newest_step_falls_back_bitwise(straight, tmp_path):
  """Bytes flipped in an array-data file of step 6 (TensorStore does not checksum those: before
  the digest they restored as NaNs) -> one line, 6 set aside, resume from 3; the run's final
  params and losses equal the straight run's bit for bit."""
  workdir = copy_run(straight, tmp_path)
  bad_file = faults.state_files(os.path.join(workdir, "checkpoints", "6"), "data")[-1]
  faults.flip_bytes(bad_file)
  damaged_bytes = open(bad_file, "rb").read()

  summary, lines = run(workdir)
  [warn] = warnings(lines)
  assert "checkpoint step 6 cannot be restored" in warn and "checksum" in warn, warn
  assert "6.damaged-1" in warn and "trying step 3" in warn, warn
  assert any(line.startswith(f"resumed from {workdir}/checkpoints/3 (step 3)") for line in lines)
  assert summary["step"] == 6 and summary["checkpoint"] == 6
  assert entries(workdir) == ["3", "6", "6.damaged-1"]
  moved = os.path.join(workdir, "checkpoints", "6.damaged-1", os.path.relpath(
      bad_file, os.path.join(workdir, "checkpoints", "6")))
  assert open(moved, "rb").read() == damaged_bytes  # kept as it was, not deleted or rewritten
  assert_params_equal(checkpoint_params(workdir, 6), checkpoint_params(straight, 6))
  assert logged_losses(workdir) == logged_losses(straight)


def test_partial_and_unreadable_steps_are_set_aside(straight, tmp_path):
  """A partial step dir (only state/_METADATA, no commit marker) and a step whose config item is
  damaged (the config read goes through the same protection) -> both set aside in one line each;
  the run resumes from the newest good step (6) without touching it."""
  workdir = copy_run(straight, tmp_path)
  ckpts = os.path.join(workdir, "checkpoints")
  faults.partial_step(ckpts, 9, template_step=6)
  shutil.copytree(os.path.join(ckpts, "6"), os.path.join(ckpts, "8"))
  faults.truncate(os.path.join(ckpts, "8", "config", "metadata"))
  before = open(os.path.join(ckpts, "6", "commit_success.txt")).read()

  summary, lines = run(workdir)
  w9, w8 = warnings(lines)
  assert w9.startswith("warning: checkpoint step 9 cannot be restored (incomplete: no commit_success.txt")
  assert "9.damaged-1" in w9 and "trying step 8" in w9
  assert w8.startswith("warning: checkpoint step 8 cannot be restored (") and "8.damaged-1" in w8
  assert summary["step"] == 6 and summary["checkpoint"] == 6
  assert entries(workdir) == ["3", "6", "8.damaged-1", "9.damaged-1"]
  assert open(os.path.join(ckpts, "6", "commit_success.txt")).read() == before
  assert_params_equal(checkpoint_params(workdir, 6), checkpoint_params(straight, 6))

  # set aside again later: the next free name, the earlier one untouched
  faults.partial_step(ckpts, 9, template_step=6)
  _, lines = run(workdir)
  assert "9.damaged-2" in warnings(lines)[0]
  assert entries(workdir) == ["3", "6", "8.damaged-1", "9.damaged-1", "9.damaged-2"]


def test_no_restorable_step_is_one_error(tmp_path, cache_dir):
  from hydrahead_jax.cli import UserError
  from hydrahead_jax.train.checkpoint import CheckpointUnusable

  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "5" / "state").mkdir(parents=True)
  (workdir / "checkpoints" / "5" / "state" / "_METADATA").write_text("{}")
  with pytest.raises(CheckpointUnusable) as e:
    run(workdir)
  assert isinstance(e.value, UserError) and "\n" not in str(e.value)
  assert "no checkpoint in" in str(e.value) and "5.damaged-1" in str(e.value)
  assert entries(workdir) == ["5.damaged-1"]


def test_fallback_off_exits_2_with_one_line_and_changes_nothing(straight, tmp_path, cache_dir):
  workdir = copy_run(straight, tmp_path)
  ckpts = os.path.join(workdir, "checkpoints")
  faults.partial_step(ckpts, 9, template_step=6)
  before = entries(workdir)
  out = subprocess.run([sys.executable, "train.py", "--config", MICRO, "--workdir", workdir,
                        *[a for kv in BASE for a in ("--set", kv)], "--set", "checkpoint.fallback=false"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
  err = out.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: checkpoint step 9 in "), out.stderr
  assert "checkpoint.fallback=false, so nothing was changed" in err[0] and "resume from step 6" in err[0]
  assert "Traceback" not in out.stdout + out.stderr
  assert entries(workdir) == before


# -- failed saves -----------------------------------------------------------------------------------
def test_failed_final_save_stops_and_keeps_previous(straight, tmp_path):
  """The commit marker of step 6 cannot be written (disk full): the async save fails in the
  background, surfaces at the final wait; the run stops (on_save_error=stop) with one line, no step
  6 is left (not even its temporary directory), and step 3 still restores bit for bit."""
  from hydrahead_jax.train.checkpoint import CheckpointSaveFailed

  workdir = str(tmp_path / "run")
  with faults.failing_writes(r"/checkpoints/6\.orbax-checkpoint-tmp[^/]*/commit_success") as failed:
    with pytest.raises(CheckpointSaveFailed) as e:
      run(workdir)
  assert failed and e.value.exit_code == 4
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("checkpoint save at step 6 failed (")
  assert "No space left on device" in msg and "previous checkpoint (step 3) is intact" in msg
  assert entries(workdir) == ["3"]
  assert_params_equal(checkpoint_params(workdir, 3), checkpoint_params(straight, 3))


def test_failed_save_continue_warns_and_trains_on(straight, tmp_path):
  """on_save_error=continue: the save at step 3 fails while it is started (its data-iterator file
  cannot be written); one warning line, training goes on and step 6 is saved normally."""
  workdir = str(tmp_path / "run")
  with faults.failing_writes(r"/checkpoints/3\.orbax-checkpoint-tmp") as failed:
    summary, lines = run(workdir, "checkpoint.on_save_error=continue")
  assert failed
  [warn] = warnings(lines)
  assert warn.startswith("warning: checkpoint save at step 3 failed (") and "continuing" in warn
  assert summary["step"] == 6 and summary["checkpoint"] == 6
  assert entries(workdir) == ["6"]
  assert_params_equal(checkpoint_params(workdir, 6), checkpoint_params(straight, 6))


# -- data faults ------------------------------------------------------------------------------------
@pytest.fixture
def prepared(tmp_path):
  from hydrahead_jax.data import prepare as prep

  docs = tmp_path / "docs.jsonl"
  docs.write_text("\n".join(json.dumps({"text": f"document {i}: " + "words " * (5 + i)}) for i in range(6)))
  out = tmp_path / "prepared"
  prep.prepare([str(docs)], str(out), docs_per_shard=3)
  return out


def _rewrite_shard(path, docs):
  from array_record.python.array_record_module import ArrayRecordWriter

  os.remove(path)
  w = ArrayRecordWriter(str(path), "group_size:1")
  for d in docs:
    w.write(np.asarray(d, "<i4").tobytes())
  w.close()


def test_data_faults_one_line_each(prepared, tmp_path):
  from hydrahead_jax.cli import UserError
  from hydrahead_jax.data.pipeline import DataConfig, DataSourceError, validate_source

  def error(path, vocab=320):
    with pytest.raises(DataSourceError) as e:
      validate_source(DataConfig(source=str(path)), vocab)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    return str(e.value)

  validate_source(DataConfig(source=str(prepared)), 320)  # the good one passes
  assert "no such directory" in error(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  assert "empty directory" in error(tmp_path / "empty")
  assert "is smaller than the vocabulary" in error(prepared, vocab=100)

  manifest = json.loads((prepared / "manifest.json").read_text())
  bad = tmp_path / "bad"

  def variant(edit_manifest=None, edit_dir=None):
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(prepared, bad)
    m = json.loads(json.dumps(manifest))
    if edit_manifest:
      edit_manifest(m)
      (bad / "manifest.json").write_text(json.dumps(m))
    if edit_dir:
      edit_dir(bad)
    return bad

  msg = error(variant(edit_dir=lambda d: os.remove(d / manifest["shards"][1]["file"])))
  assert "shard-00001.array_record' listed in manifest.json is missing" in msg
  msg = error(variant(edit_manifest=lambda m: m["shards"][0].update(num_docs=5)))
  assert "num_docs=6 but its shards list 8 documents" in msg
  msg = error(variant(edit_manifest=lambda m: (m["shards"][0].update(num_docs=5), m.update(num_docs=8))))
  assert "holds 3 documents but manifest.json lists 5" in msg
  msg = error(variant(edit_manifest=lambda m: m["shards"][1].update(num_tokens=1)))
  assert "tokens but manifest.json lists 1" in msg
  msg = error(variant(edit_manifest=lambda m: m.update(shards=[])))
  assert "lists no shards" in msg
  msg = error(variant(edit_dir=lambda d: (d / "manifest.json").write_text("{not json")))
  assert "not valid JSON" in msg
  shard0 = manifest["shards"][0]
  msg = error(variant(edit_dir=lambda d: _rewrite_shard(d / shard0["file"], [[1, 2, 3], [4, 100000], [5]])))
  assert "document 1 has token id 100000, outside [0, 320)" in msg


def test_data_fault_stops_before_the_first_step(prepared, tmp_path, cache_dir):
  from hydrahead_jax.data.pipeline import DataSourceError

  shard0 = json.loads((prepared / "manifest.json").read_text())["shards"][0]
  _rewrite_shard(prepared / shard0["file"], [[7, 400], [8, 9], [10, 11]])
  events = []
  with pytest.raises(DataSourceError, match="document 0 has token id 400"):
    run(tmp_path / "run", f"data.source={prepared}", callbacks=[lambda *a: events.append(a)])
  assert events == []
  assert os.listdir(tmp_path / "run" / "checkpoints") == []


# -- CLI --------------------------------------------------------------------------------------------
def test_cli_helper(capsys, monkeypatch):
  from hydrahead_jax.cli import UserError, cli_main

  monkeypatch.delenv("HYDRAHEAD_DEBUG", raising=False)
  seen = []

  @cli_main
  def main(argv=None):
    seen.append(list(argv))
    if argv and argv[0] == "user":
      raise UserError("bad input 'x'\nsecond line")
    if argv and argv[0] == "internal":
      raise KeyError("bug")
    return 0

  assert main(["ok"]) == 0
  assert main(["user"]) == 2
  assert capsys.readouterr().err == "error: bad input 'x'; second line\n"
  assert main(["user", "--debug"]) == 2 and seen[-1] == ["user"]
  err = capsys.readouterr().err
  assert "Traceback" in err and err.endswith("error: bad input 'x'; second line\n")
  monkeypatch.setenv("HYDRAHEAD_DEBUG", "1")
  assert main(["user"]) == 2 and "Traceback" in capsys.readouterr().err
  with pytest.raises(KeyError):  # internal errors keep their traceback
    main(["internal"])


def test_train_cli_user_error_is_one_line(tmp_path, cache_dir):
  cases = [(["--set", "optim.lrr=1"], "error: config: unknown key 'optim.lrr'"),
           (["--set", f"data.source={tmp_path / 'nowhere'}", "--workdir", str(tmp_path / "run")],
            f"error: data.source '{tmp_path / 'nowhere'}': no such directory")]
  for args, start in cases:
    out = subprocess.run([sys.executable, "train.py", "--config", MICRO, *args], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and out.stderr.startswith(start), out.stderr
  out = subprocess.run([sys.executable, "train.py", "--config", MICRO, "--set", "optim.lrr=1", "--debug"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "Traceback" in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("error: config: unknown key")
