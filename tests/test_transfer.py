"""Three-stage transfer (hydrahead_jax.transfer): stages, losses, resume, errors.

One tiny random all-FA teacher (2 layers, d_model 32, 4 heads in 2 KV groups, byte vocabulary) saved as a model
directory; one straight run of the whole pipeline (selection by exact patching, calibrated conversion, align /
distil (mixers first, then all) / long (corpus + synthetic, RoPE base raised)), shared by the tests; interrupted
runs must reproduce it bitwise. Compiled programs are shared through a persistent compilation cache.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Crash(Exception):
  """Stands for a kill: raised from a callback right after a checkpoint, nothing else is saved."""


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, cache_dir):
  from hydrahead_jax.config import ModelConfig
  from hydrahead_jax.interop.orbax import save_pretrained
  from hydrahead_jax.nn.model import create_model

  cfg = ModelConfig(vocab_size=320, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                    rope_theta=10_000.0, max_position=64, la_implementation="recurrent", la_chunk_size=16,
                    dtype="float32")
  path = str(tmp_path_factory.mktemp("teacher") / "model")
  save_pretrained(create_model(cfg, seed=3), path)
  return path


def tiny_cfg(workdir, teacher, **kw):
  from hydrahead_jax.data.pipeline import DataConfig
  from hydrahead_jax.train.config_lib import CheckpointConfig, OptimConfig
  from hydrahead_jax.transfer import config as C

  short = {"task_weights": {"grammar": 0.5, "mqar": 0.5}, "min_doc_len": 48, "max_doc_len": 65}
  stages = (
      C.align_stage(steps=8, data=DataConfig(seq_len=64, batch_size=4, seed=1, **short), log_every=1,
                    checkpoint_every=4,
                    optim=OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.0, trainable=C.ALIGN_TRAINABLE)),
      C.distil_stage(steps=8, data=DataConfig(seq_len=64, batch_size=4, seed=2, **short), log_every=1,
                     checkpoint_every=3, ce_weight=0.5, temperature=2.0,
                     optim=OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.01),
                     trainable_schedule=((0, ("*.mixer.*",)), (3, ("*",)))),
      C.long_stage(steps=6, data=DataConfig(source="corpus", seq_len=128, batch_size=2, seed=3, synthetic_fraction=0.5,
                                            task_weights={"mqar": 1.0}, min_doc_len=70, max_doc_len=129),
                   log_every=1, checkpoint_every=3, rope="raise_base", rope_theta=40_000.0,
                   optim=OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.01)),
  )
  base = dict(
      teacher=C.TeacherConfig(source=teacher, dtype="float32"),
      layout=C.LayoutConfig(policy="global", budget="3:1", lengths=(40,), tasks=("mqar",), per_task=2,
                            batch_size=4),
      convert=C.ConvertConfig(calib_num=4, calib_length=64, calib_batch=4, heldout_num=0,
                              student={"la_implementation": "recurrent"}),
      corpus=C.CorpusConfig(max_tokens=20_000, doc_chars=4_000, heldout_docs=2),
      stages=stages,
      eval=C.EvalConfig(tasks=("mqar",), lengths=(40,), per_task=2, batch_size=4, text_batches=1),
      checkpoint=CheckpointConfig(keep=3, async_save=False),
      workdir=str(workdir), progress=False)
  base.update(kw)
  return C.TransferConfig(**base)


def _quiet(*_):
  pass


@pytest.fixture(scope="module")
def straight(tmp_path_factory, teacher_dir):
  from hydrahead_jax.transfer.runner import run

  workdir = tmp_path_factory.mktemp("straight")
  lines = []
  summary = run(tiny_cfg(workdir, teacher_dir), print_fn=lines.append)
  assert summary["status"] == "complete", "\n".join(lines)
  return workdir, summary, lines


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _flat(path):
  from hydrahead_jax.interop.load import load_pretrained
  from hydrahead_jax.interop.names import model_to_flat

  cfg, model = load_pretrained(path)
  return cfg, model_to_flat(model)


def test_pipeline_losses_decrease_and_outputs(straight):
  workdir, summary, lines = straight
  rows = _rows(workdir)
  assert rows and all("stage" in r and "stage_step" in r for r in rows)
  for name in ("align", "distil", "long"):
    losses = [r["loss"] for r in rows if r["stage"] == name]
    k = 2
    assert np.mean(losses[-k:]) < np.mean(losses[:k]), (name, losses)
  align = [r for r in rows if r["stage"] == "align"]
  assert align[-1]["nmse_max"] < align[0]["nmse_max"]
  # global steps continue across stages; per-stage tokens / wall / tokens/s reported
  assert [r["step"] for r in rows] == list(range(1, 8 + 8 + 6 + 1))
  for s in summary["stages"]:
    assert s["tokens"] == s["steps"] * s["batch_size"] * s["seq_len"] and s["wall_s"] > 0 and s["tokens_per_s"] > 0
  text = open(os.path.join(workdir, "results.txt")).read()
  for name in ("teacher", "converted", "after align", "after distil", "after long", "tokens/s"):
    assert name in text
  assert os.path.isfile(os.path.join(workdir, "loss.png"))
  # every stage ends with a model directory load_pretrained opens; stage 3's RoPE base is recorded
  import hydrahead_jax

  for name, theta in (("align", 10_000.0), ("distil", 10_000.0), ("long", 40_000.0)):
    cfg, _ = hydrahead_jax.load_pretrained(os.path.join(workdir, "stages", name, "model"))
    assert cfg.rope_theta == theta
    assert cfg.layout.total_fa_groups() == 1
  manifest = json.load(open(os.path.join(workdir, "corpus", "manifest.json")))
  assert manifest["provenance"]["packages"] and manifest["num_tokens"] >= 20_000


def test_align_trains_only_la_and_fusion(straight):
  import fnmatch

  from hydrahead_jax.transfer.config import ALIGN_TRAINABLE

  workdir, _, _ = straight
  _, before = _flat(os.path.join(workdir, "converted"))
  _, after = _flat(os.path.join(workdir, "stages", "align", "model"))
  assert before.keys() == after.keys()
  changed = 0
  for name in before:
    same = before[name].dtype == after[name].dtype and np.array_equal(before[name], after[name])
    if any(fnmatch.fnmatchcase(name, p) for p in ALIGN_TRAINABLE):
      changed += not same
    else:
      assert same, f"{name} changed in stage 1"
  assert changed >= 4


def test_schedule_phase0_trains_mixers_only(straight):
  """Distil phase 0 (steps 1-3): only mixer parameters move; phase 1 moves the rest too."""
  import orbax.checkpoint as ocp

  from flax import nnx

  from hydrahead_jax.interop.load import load_pretrained
  from hydrahead_jax.train.state import flatten_state, leaf_names

  workdir, _, _ = straight
  cfg, model = load_pretrained(os.path.join(workdir, "stages", "align", "model"))
  init = {k: np.asarray(v) for k, v in flatten_state(nnx.state(model, nnx.Param)).items()}
  with ocp.CheckpointManager(os.path.join(workdir, "stages", "distil", "checkpoints")) as m:
    at3 = m.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]
  names = leaf_names(cfg, init)
  moved = {k for k, v in at3.items() if not np.array_equal(np.asarray(v), init[k])}
  assert moved, "nothing trained in phase 0"
  assert all(".mixer." in names[k][0] for k in moved), sorted(moved)
  _, final = _flat(os.path.join(workdir, "stages", "distil", "model"))
  _, start = _flat(os.path.join(workdir, "stages", "align", "model"))
  assert not np.array_equal(final["embed.embedding"], start["embed.embedding"])


def test_kl_is_zero_for_all_fa_student_of_its_teacher(teacher_dir):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from hydrahead_jax.config import HeadLayout
  from hydrahead_jax.data.synthetic import generate_example
  from hydrahead_jax.data.tokenizer import ByteTokenizer
  from hydrahead_jax.interop.load import load_pretrained
  from hydrahead_jax.transfer import config as C
  from hydrahead_jax.transfer import stages
  from hydrahead_jax.transfer.convert import convert_teacher
  from hydrahead_jax.train.state import flatten_state

  _, teacher = load_pretrained(teacher_dir)
  student, _ = convert_teacher(teacher, HeadLayout.all_fa(2, 2))
  tok = ByteTokenizer()
  rows = np.stack([generate_example("mqar", 0, i, 65, tok)["tokens"] for i in range(2)])
  B, T = 2, 64
  mb = {"inputs": jnp.asarray(rows[:, :-1]), "targets": jnp.asarray(rows[:, 1:]),
        "segment_ids": jnp.ones((B, T), jnp.int32), "positions": jnp.broadcast_to(jnp.arange(T), (B, T)),
        "loss_mask": jnp.ones((B, T), jnp.float32), "answer_mask": jnp.zeros((B, T), jnp.float32)}
  stage = C.distil_stage(logits_chunk=24)  # 64 positions in 3 chunks (the last one padded)
  g, p, r = nnx.split(student, nnx.Param, ...)
  tg, tp, tr = nnx.split(teacher, nnx.Param, ...)
  loss_fn = stages._kd_loss(g, r, tg, tr, stage)
  total, s = jax.jit(loss_fn)(flatten_state(p), flatten_state(tp), mb, (jnp.float32(B * T), jnp.float32(B * T)))
  assert float(s["kl_tokens"]) == B * T
  assert abs(float(s["kl_sum"])) < 1e-6 and abs(float(total)) < 1e-6
  # the chunked CE from the final hidden states is the model's own CE
  logits = student(mb["inputs"])
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), mb["targets"][..., None], -1).sum()
  np.testing.assert_allclose(float(s["ce_sum"]), float(ce), rtol=1e-5)


def _params_equal(a_dir, b_dir):
  _, a = _flat(a_dir)
  _, b = _flat(b_dir)
  assert a.keys() == b.keys()
  bad = [k for k in a if not np.array_equal(a[k], b[k])]
  assert not bad, f"differ: {bad[:5]}"


def test_kill_mid_stage2_and_at_stage_switch_resume_bitwise(tmp_path, straight, teacher_dir):
  from hydrahead_jax.transfer.runner import run

  ref, _, _ = straight
  workdir = tmp_path / "resumed"
  cfg = tiny_cfg(workdir, teacher_dir, eval=dataclasses.replace(tiny_cfg(workdir, teacher_dir).eval, enabled=False))

  def crash_at(event, stage, step):
    def cb(ev, st, s, hook):
      if (ev, st, s) == (event, stage, step):
        raise Crash(f"{ev} {st} {s}")
    return cb

  with pytest.raises(Crash):  # killed right after distil's checkpoint at step 3 (steps 4.. never saved)
    run(cfg, callbacks=[crash_at("checkpoint", "distil", 3)], print_fn=_quiet)
  assert not os.path.exists(workdir / "stages" / "distil" / "stage_summary.json")
  with pytest.raises(Crash):  # resumed at distil step 3, killed as distil ends (before stage 3 starts)
    lines = []
    run(cfg, callbacks=[crash_at("stage_end", "distil", 8)], print_fn=lines.append)
  assert any("resuming at step 3" in line for line in lines), lines
  lines = []
  summary = run(cfg, print_fn=lines.append)
  assert summary["status"] == "complete"
  assert any("'distil': done" in line for line in lines) and any("'align': done" in line for line in lines)
  for name in ("align", "distil", "long"):
    _params_equal(os.path.join(ref, "stages", name, "model"), os.path.join(workdir, "stages", name, "model"))
  a = {r["step"]: r["loss"] for r in _rows(ref)}
  b = {r["step"]: r["loss"] for r in _rows(workdir)}
  assert a == b


def test_bad_configs_fail_in_one_line_before_compute(tmp_path, teacher_dir):
  from hydrahead_jax.transfer import config as C
  from hydrahead_jax.transfer.runner import run

  def fails(cfg, key):
    with pytest.raises(C.TransferConfigError) as e:
      run(cfg, print_fn=_quiet)
    msg = str(e.value)
    assert "\n" not in msg and key in msg, msg
    assert not os.path.exists(cfg.workdir), "created files before failing"
    return msg

  base = tiny_cfg(tmp_path / "w", teacher_dir)
  s0 = base.stages[0]
  bad_pattern = base.replace(stages=(dataclasses.replace(s0, optim=dataclasses.replace(
      s0.optim, trainable=("*.mixer.la.nosuch",))),) + base.stages[1:])
  assert "matches no parameter" in fails(bad_pattern, "stages.align.optim.trainable")
  mlp_in_align = base.replace(stages=(dataclasses.replace(s0, optim=dataclasses.replace(
      s0.optim, trainable=("*.mlp.*",))),) + base.stages[1:])
  fails(mlp_in_align, "stages.align")
  too_long = base.replace(stages=(dataclasses.replace(s0, data=dataclasses.replace(s0.data, seq_len=128,
                                                                                   max_doc_len=129)),)
                          + base.stages[1:])
  assert "window" in fails(too_long, "stages.align.data.seq_len")
  shape_override = base.replace(teacher=dataclasses.replace(base.teacher, model_overrides={"d_model": 8}))
  assert "parameter shapes" in fails(shape_override, "teacher.model_overrides")
  prepared = tmp_path / "small_data"
  from hydrahead_jax.data.prepare import prepare

  (tmp_path / "a.txt").write_text("just a few bytes of text")
  prepare([str(tmp_path / "a.txt")], str(prepared))
  s1 = base.stages[1]
  short_data = base.replace(stages=base.stages[:1] + (dataclasses.replace(s1, data=dataclasses.replace(
      s1.data, source=str(prepared))),) + base.stages[2:])
  assert "longer than the data" in fails(short_data, "stages.distil.data.seq_len")
  missing = base.replace(teacher=C.TeacherConfig(source=str(tmp_path / "nowhere")))
  assert "no such file" in fails(missing, "teacher.source")
  with pytest.raises(C.TransferConfigError, match="unknown key 'stages.align.stepz'"):
    C.apply_overrides(base, ["stages.align.stepz=3"])


def test_cli_missing_teacher_is_one_line_exit_2(tmp_path):
  cfg = tmp_path / "cfg.py"
  cfg.write_text(textwrap.dedent(f"""
      from hydrahead_jax.transfer.config import TransferConfig, TeacherConfig, distil_stage
      def get_config():
        return TransferConfig(teacher=TeacherConfig(source={str(tmp_path / 'missing.gguf')!r}),
                              stages=(distil_stage(),), workdir={str(tmp_path / 'w')!r})
  """))
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", str(cfg)], capture_output=True,
                     text=True, env=env, cwd=ROOT, timeout=120)
  assert p.returncode == 2, p.stderr
  err = [line for line in p.stderr.splitlines() if line.strip()]
  assert len(err) == 1 and err[0].startswith("error: ") and "teacher.source" in err[0], p.stderr
  assert not os.path.exists(tmp_path / "w")
