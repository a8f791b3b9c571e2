"""The replication study harness (hydrahead_jax.study): a tiny study end to end (teacher + two student arms, one
stage of two steps each), resume, import of an existing run, the report with missing arms, the verdict logic on
synthetic results, one-line errors. In-process (``cli.main``), sharing compiled programs through a persistent
compilation cache."""

import dataclasses
import json
import os
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _keep_xla_flags(monkeypatch):
  """The study CLI appends its configs' XLA flags to XLA_FLAGS for the process it starts in; restore them after each
  test, or later tests' subprocesses inherit them (a train.py child compiled at another optimisation level gave
  test_train's kill-and-resume run other losses than the in-process run from step 3 on)."""
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cache_dir):
  """A random all-FA teacher (window 42), a one-stage transfer recipe, a layout file and a 4-arm study config."""
  from hydrahead_jax.config import HeadLayout, ModelConfig
  from hydrahead_jax.interop.orbax import save_pretrained
  from hydrahead_jax.nn.model import create_model
  from hydrahead_jax.selection.policies import write_layout

  d = tmp_path_factory.mktemp("study")
  cfg = ModelConfig(vocab_size=320, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                    rope_theta=10_000.0, max_position=42, qk_norm=False, la_implementation="recurrent",
                    la_chunk_size=16, dtype="float32")
  save_pretrained(create_model(cfg, seed=3), str(d / "teacher"))
  write_layout(str(d / "layout.json"), HeadLayout(((1,), ())), {"policy": "file", "describe": "test layout"})
  (d / "transfer.py").write_text(textwrap.dedent(f"""
      from hydrahead_jax.data.pipeline import DataConfig
      from hydrahead_jax.train.config_lib import CheckpointConfig, OptimConfig
      from hydrahead_jax.transfer import config as C

      def get_config():
        return C.TransferConfig(
            teacher=C.TeacherConfig(source={str(d / 'teacher')!r}, dtype="float32"),
            convert=C.ConvertConfig(calib_num=0, heldout_num=0,
                                    student={{"la_implementation": "recurrent"}}),
            stages=(C.distil_stage(steps=2, data=DataConfig(seq_len=64, batch_size=2, seed=1, min_doc_len=37,
                                                            max_doc_len=42, task_weights={{"mqar": 1.0}}),
                                   optim=OptimConfig(lr=1e-2, warmup_steps=1), log_every=1, checkpoint_every=2),),
            eval=C.EvalConfig(enabled=False), checkpoint=CheckpointConfig(keep=1, async_save=False),
            workdir="unused", progress=False)
      """))
  (d / "study.py").write_text(textwrap.dedent(f"""
      from hydrahead_jax.study.config import ArmConfig, LayoutSpec, StudyConfig, StudyEval

      def get_config():
        arms = (ArmConfig("1", "teacher", role="teacher", kind="teacher"),
                ArmConfig("2", "head-level", role="head_exact", layout=LayoutSpec(file={str(d / 'layout.json')!r})),
                ArmConfig("6", "layer-wise", role="layerwise_3to1", layout=LayoutSpec(policy="layerwise_even",
                                                                                      budget="1:1"),
                          note="left out of the fixture"),
                ArmConfig("7", "all LA", role="all_la", layout=LayoutSpec(policy="all_la")))
        return StudyConfig(name="test", transfer={str(d / 'transfer.py')!r}, arms=arms, budgets={{"b": ()}},
                           budget="b", minutes_per_arm=1.0,
                           eval=StudyEval(tasks=("mqar", "ppl"), retrieval_tasks=("mqar",), lengths=(32, 64),
                                          examples=2, chat="off", ppl_docs=1, batch_size=2, chunk_size=32,
                                          max_new_tokens=4, proxy_length=32, proxy_docs=2, proxy_batch=2),
                           workroot={str(d / 'runs')!r}, out_dir={str(d / 'out')!r},
                           report={str(d / 'results.md')!r})
      """))
  return d


def _main(args, capsys):
  from hydrahead_jax.study.cli import main

  rc = main(args)
  out = capsys.readouterr()
  return rc, out.out, out.err


@pytest.fixture(scope="module")
def ran(setup):
  """Arms 1, 2 and 7 run once; arm 6 left missing."""
  from hydrahead_jax.study.cli import main

  assert main(["--config", str(setup / "study.py"), "--arms", "1,2,7", "--report"]) == 0
  return setup


def _result(d, arm):
  with open(d / "out" / f"arm{arm}.json") as f:
    return json.load(f)


def test_end_to_end_results(ran):
  r1, r2, r7 = (_result(ran, a) for a in ("1", "2", "7"))
  assert r1["transfer"] is None and r1["cost"]["fa_groups"] == 4 and r1["proxy"]["kl"] == 0.0
  assert r2["cost"]["fa_groups"] == 1 and r7["cost"]["fa_groups"] == 0 and r7["cost"]["cache_bytes_per_token"] == 0
  # FA K/V bytes per token: 2 (K and V) x FA groups x head_dim x 4 bytes (float32 compute)
  assert r2["cost"]["cache_bytes_per_token"] == 2 * 1 * 8 * 4 and r1["cost"]["cache_bytes_per_token"] == 2 * 4 * 8 * 4
  for r in (r2, r7):
    assert r["transfer"]["tokens_per_stage"] == {"distil": 2 * 2 * 64}
    assert r["transfer"]["tokens_per_s"] > 0 and r["budget"]["transfer_minutes"] > 0
    assert 0 <= r["proxy"]["top1_agreement"] <= 1 and r["proxy"]["kl"] > 0 and r["proxy"]["docs"] == 2
    assert os.path.isfile(r["transfer"]["final_model"] + "/hydrahead_manifest.json")
  for r in (r1, r2, r7):
    cells = r["eval"]["cells"]["mqar"]
    assert set(cells) == {"32", "64"} and all(c["n"] == 2 and len(c["scores"]) == 2 for c in cells.values())
    assert r["eval"]["ppl"]["length"] == 64 and r["eval"]["settings"]["seed"] == 0
    assert r["env"]["date"] and r["env"]["jax"] and r["teacher_window"] == 42
  assert r2["layout"]["fa_groups"] == [[1], []] and r7["layout"]["policy"] == "all_la"
  # the derived layout file is kept next to the results
  assert json.load(open(ran / "out" / "layouts" / "arm7.json"))["fa_groups"] == [[], []]


def test_report_lists_missing_arm(ran):
  text = (ran / "results.md").read_text()
  assert "arm 6 (layer-wise): missing" in text and "(not run or imported yet); left out of the fixture" in text
  assert "1. **head-level 7:1 keeps retrieval about as well as layer-wise 3:1: INCONCLUSIVE.** arm 6" in text
  for png in ("accuracy_vs_length.png", "accuracy_heatmap.png"):
    assert os.path.getsize(ran / "out" / png) > 1000 and f"](out/{png})" in text
  assert "| 7 | all LA | 0 FA / 4 LA groups" in text


def test_rerun_skips_done_and_evaluation_resumes(ran, capsys):
  before = {a: (ran / "out" / f"arm{a}.json").read_text() for a in ("1", "2")}
  rc, out, _ = _main(["--config", str(ran / "study.py"), "--arms", "1,2"], capsys)
  assert rc == 0 and out.count("skipped") == 2
  assert all((ran / "out" / f"arm{a}.json").read_text() == t for a, t in before.items())
  # a lost result file (e.g. the stretch ended during the evaluation): transfer and eval cells come from their caches
  os.remove(ran / "out" / "arm2.json")
  rc, out, _ = _main(["--config", str(ran / "study.py"), "--arms", "2"], capsys)
  assert rc == 0 and "stage 1/1 'distil': done" in out and "2 cells from the cache" in out
  again = json.loads((ran / "out" / "arm2.json").read_text())
  assert again["eval"]["cells"] == json.loads(before["2"])["eval"]["cells"]


def test_interrupted_transfer_exits_3(setup, capsys, monkeypatch):
  """A transfer stopped by SIGTERM (status 'interrupted'): no result, exit code 3, 'rerun' (the runner resumes)."""
  from hydrahead_jax.transfer import runner

  monkeypatch.setattr(runner, "run", lambda cfg, print_fn=print: {"status": "interrupted"})
  rc, _, err = _main(["--config", str(setup / "study.py"), "--arms", "6"], capsys)
  assert rc == 3 and "arm 6: transfer interrupted" in err and "rerun the same command" in err
  assert not os.path.exists(setup / "out" / "arm6.json")
  assert json.load(open(setup / "runs" / "arm6" / "study_time.json"))["transfer_s"] >= 0


def _eval_results(d, summary):
  """A results.json as ``python -m hydrahead_jax.eval`` writes it, from the study's own cells of arm 2."""
  r2 = _result(d, "2")
  cells = {t: {L: {"gen_acc": c["acc"], "lp_acc": c["lp_acc"], "logprob": c["logprob"], "n": c["n"],
                   "examples": [{"gen_score": s} for s in c["scores"]]} for L, c in per.items()}
           for t, per in r2["eval"]["cells"].items()}
  res = {"config": {"models": ["smollm2", summary["final_model"]], "tasks": ["mqar", "ppl"], "lengths": [32, 64],
                    "examples": 2, "seed": 0, "chat": "off", "ppl_docs": 1, "max_new_tokens": 4, "corpus": "x"},
         "models": {"smollm2": {"spec": "smollm2", "params": 1, "tasks": cells, "ppl": None},
                    "model": {"spec": summary["final_model"], "params": r2["cost"]["params"], "tasks": cells,
                              "ppl": r2["eval"]["ppl"]}}}
  path = d / "eval_results.json"
  path.write_text(json.dumps(res))
  return str(path)


def test_import_existing_run(ran, capsys):
  summary_path = ran / "runs" / "arm2" / "summary.json"
  summary = json.loads(summary_path.read_text())
  ev = _eval_results(ran, summary)
  out_dir = str(ran / "imported")
  args = ["import", "--config", str(ran / "study.py"), "--out-dir", out_dir, "--eval", ev]
  rc, out, err = _main(args + ["--arm", "2", "--transfer-summary", str(summary_path), "--report"], capsys)
  assert rc == 0, err
  r = json.load(open(os.path.join(out_dir, "arm2.json")))
  ran2 = _result(ran, "2")
  assert r["source"] == "import" and r["imported_from"]["model"] == "model"  # found through the summary
  assert r["transfer"]["tokens_per_stage"] == ran2["transfer"]["tokens_per_stage"]
  assert r["cost"]["cache_bytes_per_token"] == ran2["cost"]["cache_bytes_per_token"] and r["proxy"] is None
  assert r["eval"]["settings"]["examples"] == 2 and r["eval"]["cells"]["mqar"]["32"]["n"] == 2
  assert "budget_note" not in r  # same tokens per stage as the study's budget
  assert "arm 1 (teacher): missing" in open(os.path.join(out_dir, "results.md")).read()
  # the wrong arm: the run's layout is not the all-LA arm's
  rc, _, err = _main(args + ["--arm", "7", "--transfer-summary", str(summary_path)], capsys)
  assert rc == 2 and len(err.strip().splitlines()) == 1 and "layout" in err and "arm is" in err
  # a student arm needs its transfer summary; an existing result is kept without --force
  rc, _, err = _main(args + ["--arm", "6"], capsys)
  assert rc == 2 and "--transfer-summary" in err and len(err.strip().splitlines()) == 1
  rc, _, err = _main(args + ["--arm", "2", "--transfer-summary", str(summary_path)], capsys)
  assert rc == 2 and "--force" in err


@pytest.mark.parametrize("args, words", [
    (["--arms", "5"], ["unknown arm 5", "1, 2, 6, 7"]),
    (["--arms", "2", "--budget", "big"], ["--budget 'big'"]),
    ([], ["nothing to do"]),
    (["--arms", "2", "--set", "stages.distil.stepz=3"], ["stepz"]),
])
def test_bad_input_one_line(setup, capsys, args, words):
  rc, out, err = _main(["--config", str(setup / "study.py")] + args, capsys)
  assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("python -m hydrahead_jax.study: error:")
  assert all(w in err for w in words), err


def test_missing_config_one_line(tmp_path, capsys):
  rc, _, err = _main(["--config", str(tmp_path / "nope.py"), "--report"], capsys)
  assert rc == 2 and len(err.strip().splitlines()) == 1 and "does not exist" in err


# -- verdicts on synthetic results -------------------------------------------------------------------
def _arm(arm, role, acc, n=512, tokens=1000, kind="student", kl=None):
  """acc: {length: accuracy}; per-example scores with exactly round(acc * n) hits."""
  cells = {str(L): {"acc": a, "n": n, "scores": [1.0] * round(a * n) + [0.0] * (n - round(a * n))}
           for L, a in acc.items()}
  return {"arm": arm, "role": role, "kind": kind, "teacher_window": 8192, "eval": {"cells": {"niah": cells}},
          "transfer": None if kind == "teacher" else {"tokens_per_stage": {"s": tokens}},
          "proxy": {"kl": kl} if kl is not None else None}


ROLES = {"teacher": ["1"], "head_exact": ["2"], "head_retrieval": ["3"], "random": ["4", "4b"],
         "layerwise_3to1": ["6"], "no_fusion": ["8"]}
IN = {1024: 0.6, 4096: 0.6}


def _judge(results):
  from hydrahead_jax.study.config import Thresholds
  from hydrahead_jax.study.verdict import Judge

  return Judge({r["arm"]: r for r in results}, ROLES, ["niah"], Thresholds(), None)


def _with(**accs):
  base = {"1": _arm("1", "teacher", {**IN, 16384: 0.0}, kind="teacher"),
          "2": _arm("2", "head_exact", {**IN, 16384: 0.5}, kl=0.1), "3": _arm("3", "head_retrieval", IN),
          "4": _arm("4", "random", IN), "4b": _arm("4b", "random", IN), "6": _arm("6", "layerwise_3to1", IN),
          "8": _arm("8", "no_fusion", IN, kl=0.3)}
  for k, v in accs.items():
    k = k.lstrip("a")
    base[k] = _arm(k, base[k]["role"], v, kind=base[k]["kind"], kl=(base[k]["proxy"] or {}).get("kl"))
  return list(base.values())


def test_verdict_claim1():
  j = _judge(_with())
  assert j.claim1().verdict == "reproduced"  # equal scores: the interval is well above -0.10
  assert "the teacher scores 0.600 here; kept: arm 2 100%, arm 6 100%" in j.claim1().why
  c = _judge(_with(a6={1024: 0.15, 4096: 0.15})).claim1()
  assert "kept: arm 2 100%, arm 6 25%" in c.why and c.verdict == "reproduced"
  assert "teacher scores" not in _judge([r for r in _with() if r["arm"] != "1"]).claim1().why
  assert _judge(_with(a6={1024: 0.95, 4096: 0.95})).claim1().verdict == "not reproduced"
  assert _judge(_with(a6={1024: 0.72, 4096: 0.72})).claim1().verdict == "inconclusive"  # straddles -0.10
  assert _judge(_with(a2={1024: 0.02, 4096: 0.0}, a6={1024: 0.0, 4096: 0.05})).claim1().verdict == "inconclusive"
  c = _judge([r for r in _with() if r["arm"] != "6"]).claim1()
  assert c.verdict == "inconclusive" and "arm 6" in c.why and "missing" in c.why
  other = _with()
  other[-2]["transfer"]["tokens_per_stage"] = {"s": 999}
  assert "budgets differ" in _judge(other).claim1().why
  other = _with()
  other[1]["eval"]["settings"] = {"seed": 1}
  c = _judge(other).claim3()
  assert c.verdict == "inconclusive" and "different inputs" in c.why and "seed" in c.why


def test_verdict_claim2():
  hi = {1024: 0.9, 4096: 0.9}
  assert _judge(_with(a2={**hi, 16384: 0.5}, a3=hi)).claim2().verdict == "reproduced"
  assert _judge(_with()).claim2().verdict == "not reproduced"  # chosen = random
  mixed = _judge(_with(a2={**hi, 16384: 0.5})).claim2()
  assert mixed.verdict == "inconclusive" and "mixed" in mixed.why
  # one random seed is enough (and said); none is not
  one = _judge([r for r in _with(a2={**hi, 16384: 0.5}, a3=hi) if r["arm"] != "4b"]).claim2()
  assert one.verdict == "reproduced" and "random arm 4b missing" in one.why
  assert _judge([r for r in _with() if r["arm"] not in ("4", "4b")]).claim2().verdict == "inconclusive"
  # arm 3 missing: inconclusive, with the exact-patching comparison that exists so far
  part = _judge([r for r in _with(a2={**hi, 16384: 0.5}) if r["arm"] != "3"]).claim2()
  assert part.verdict == "inconclusive" and "arm 3 (head_retrieval) missing" in part.why
  assert "so far, exact patching vs random: reproduced" in part.why and set(part.numbers) == {"exact"}


def test_verdict_claim3_and_4():
  c = _judge(_with(a8={1024: 0.3, 4096: 0.3})).claim3()
  assert c.verdict == "reproduced" and "KL" in c.why and c.numbers["diff"] == pytest.approx(0.3)
  assert _judge(_with()).claim3().verdict == "not reproduced"
  assert _judge(_with(a8={1024: 0.57, 4096: 0.57})).claim3().verdict == "inconclusive"
  c4 = _judge(_with()).claim4()  # 0.5 beyond the window vs the teacher's 0.0
  assert c4.verdict == "reproduced" and c4.numbers["lengths"] == [16384] and "perplexity" not in c4.why
  with_ppl = _with()
  for r, ppls in zip(with_ppl[:2], ((20.0, 30.0, 900.0), (21.0, 25.5, 40.25))):  # teacher, arm 2
    r["eval"]["ppl"] = {"buckets": [{"start": s, "end": e, "ppl": p}
                                    for (s, e), p in zip(((0, 8192), (8192, 16384), (16384, 32768)), ppls)]}
  c4 = _judge(with_ppl).claim4()
  assert "perplexity past the window, arm 2 vs arm 1: 8K-16K 25.5 vs 30.0, 16K-32K 40.2 vs 900.0" in c4.why
  assert _judge(_with(a2={**IN, 16384: 0.0})).claim4().verdict == "not reproduced"
  assert _judge(_with(a2={**IN, 16384: 0.04})).claim4().verdict == "inconclusive"
  c4 = _judge(_with(a2=IN)).claim4()  # never evaluated beyond the window
  assert c4.verdict == "inconclusive" and "beyond" in c4.why


def test_standard_error_never_zero():
  from hydrahead_jax.study.verdict import retrieval_score

  s = retrieval_score(_arm("2", "head_exact", {1024: 1.0}, n=4), ["niah"], [1024])
  assert s.mean == 1.0 and s.se == pytest.approx(np.sqrt(5 / 6 * 1 / 6 / 4))


# -- the shipped configs -------------------------------------------------------------------------------
def test_shipped_configs():
  from hydrahead_jax.study import config as sconfig
  from hydrahead_jax.study.arms import Study
  from hydrahead_jax.transfer import config as tconfig

  tiny = sconfig.load(os.path.join(ROOT, "configs", "study", "tiny.py"))
  smol = sconfig.load(os.path.join(ROOT, "configs", "study", "smollm2.py"))
  smoke = sconfig.load(os.path.join(ROOT, "configs", "study", "smollm2_smoke.py"))  # the CPU smoke of the arms
  assert smoke.arms == smol.arms and smoke.budget == "smoke" and smoke.out_dir.startswith(os.path.join(ROOT, "runs"))
  assert [o for o in smoke.transfer_overrides if o.startswith("corpus.out")] == []  # its own corpus, not the recipe's
  roles = {a.role for a in smol.arms}
  assert {"teacher", "head_exact", "head_retrieval", "random", "layerwise_budget", "layerwise_3to1", "all_la",
          "no_fusion", "kv_sharing"} <= roles and {a.role for a in tiny.arms} == roles
  # the teacher's H200 run (arm 1) used 16 examples and 48 new tokens: every arm must match it
  assert smol.eval.examples == 16 and smol.eval.max_new_tokens == 48
  assert smol.eval.lengths == (1024, 2048, 4096, 8192, 16384, 32768)
  # arm 2 is the recipe run itself (its workdir and config), so the lead's transfer run counts as its transfer
  study = Study(smol, print_fn=lambda *_: None)
  arm2 = smol.arm("2")
  recipe = tconfig.load(smol.transfer)
  mine = study.transfer_cfg(arm2, arm2.layout.file)
  assert mine.replace(workdir=recipe.workdir, corpus=recipe.corpus, eval=recipe.eval) == recipe
  assert recipe.eval.enabled and not mine.eval.enabled  # the suite measures every arm; no per-stage probes
  assert mine.workdir == os.path.join(ROOT, recipe.workdir) and mine.corpus.out == os.path.join(mine.workdir, "corpus")
  half = Study(smol.replace(budget="half"), print_fn=lambda *_: None).base
  assert [s.steps for s in half.stages] == [s.steps // 2 for s in recipe.stages]
  eight = study.transfer_cfg(smol.arm("8"), arm2.layout.file)
  assert eight.convert.fusion == "none" and eight.stage("align").optim.trainable == ("*.mixer.la.*",)
  assert eight.replace(convert=recipe.convert, workdir=recipe.workdir, corpus=recipe.corpus, eval=recipe.eval,
                       stages=recipe.stages) == recipe
  assert [dataclasses.replace(s, optim=None) for s in eight.stages] == [dataclasses.replace(s, optim=None)
                                                                       for s in recipe.stages]
  nine = study.transfer_cfg(smol.arm("9"), arm2.layout.file)
  assert nine.convert.student == {**recipe.convert.student, "la_sharing": "kv"}


def test_check_shipped_configs_preflight(tmp_path, capsys):
  """--check: the transfer's preflight on every arm (arm 8's recipe patterns must fit a model without fusion)."""
  rc, out, err = _main(["--config", os.path.join(ROOT, "configs", "study", "tiny.py"), "--arms", "all", "--check",
                        "--workroot", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "out")], capsys)
  assert rc == 0, err
  assert out.count(": ok;") == 8 and "arm 7 (all LA): ok; 0 FA / 4 LA groups" in out
  from hydrahead_jax.interop.load import resolve

  try:
    resolve("smollm2")
  except Exception:  # noqa: BLE001 - the packaged GGUF is optional
    pytest.skip("the smollm2 GGUF is not installed")
  rc, out, err = _main(["--config", os.path.join(ROOT, "configs", "study", "smollm2.py"), "--arms", "8", "--check",
                        "--out-dir", str(tmp_path / "out2")], capsys)
  assert rc == 0 and "arm 8 (arm 2 with fusion='none'): ok; 11 FA / 79 LA groups" in out, err
