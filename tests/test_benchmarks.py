"""The benchmark scripts run on GPUs; here: their trace parsing, and a CPU smoke run so they do not rot."""

import json
import os
import subprocess
import sys

from benchmarks.profile_mixer import device_lanes, group_of, summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trace(rng):
  """A perfetto-style trace: a GPU process with a stream lane and an XLA-ops lane, plus a host process."""
  meta = [
      {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "pid": 1, "tid": 10, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
      {"ph": "M", "pid": 1, "tid": 11, "name": "thread_name", "args": {"name": "XLA Ops"}},
      {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
  ]
  kernels = {"cudnn_generated_fort_native_sdpa_sm90_flash_bprop": "cudnn attention",
             "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_TNT": "matmul", "gdn_dqk": "pallas gdn",
             "fusion_norm_bwd": "pallas fusion", "short_conv_bwd_du": "pallas short conv",
             "loop_add_fusion": "xla fusion / copy"}
  durs = {name: float(rng.uniform(10, 1000)) for name in kernels}
  events = [{"ph": "X", "pid": 1, "tid": 10, "name": n, "dur": d, "ts": 0} for n, d in durs.items()]
  events += [{"ph": "X", "pid": 1, "tid": 11, "name": "fusion.1", "dur": 5.0, "ts": 0},
             {"ph": "X", "pid": 2, "tid": 3, "name": "gdn_dqk", "dur": 1e6, "ts": 0}]  # host: ignored
  return {"traceEvents": meta + events}, kernels, durs


def test_trace_summary_groups_device_kernels(rng):
  trace, kernels, durs = _trace(rng)
  lanes = device_lanes(trace)
  assert len(lanes["kernels"]) == len(kernels) and len(lanes["ops"]) == 1
  res = summarize(lanes, steps=2)
  for name, group in kernels.items():
    assert group_of(name) == group
    assert abs(res["groups_ms"][group] - round(durs[name] / 1e3 / 2, 3)) < 1e-3
  assert abs(res["kernel_total_ms"] - sum(durs.values()) / 1e3 / 2) < 1e-9


def test_bench_mixer_smoke(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_mixer.py"), "--smoke", "--out",
                  str(tmp_path)], check=True, env=env, cwd=ROOT, capture_output=True, timeout=300)
  (out,) = tmp_path.glob("bench_mixer_*.json")
  rows = json.loads(out.read_text())["rows"]
  assert [r["T"] for r in rows] == [128, 256]
  assert rows[0]["7:1 (1 FA group) fwd+bwd"] > 0 and rows[0]["all-FA fwd+bwd"] > 0


def _smoke(script: str, *args: str, timeout: int = 300) -> None:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--smoke", *args], check=True, env=env,
                 cwd=ROOT, capture_output=True, timeout=timeout)


def test_train_step_smoke_reports_compiled_memory_and_profile(tmp_path):
  _smoke("train_step.py", "--out", str(tmp_path), "--layouts", "7:1", "--profile", "7:1@64")
  res = json.loads((tmp_path / "train_step.json").read_text())
  cell = res["rows"][0]["7:1"]
  assert cell["tokens_per_s"] > 0 and cell["compiled_gib"] > 0 and cell["params"] > 0
  (prof,) = res["profiles"]
  assert prof["layout"] == "7:1" and prof["T"] == 64 and "error" not in prof  # CPU: no device lanes, no failure


def test_train_cp_smoke_context_parallel_step(tmp_path):
  """The 7:1 training step at CP 1 and 2 on 2 fake CPU devices (the mesh spans every device: this hung while the
  chunked GDN solved with LAPACK trsm): same loss (the script checks too)."""
  _smoke("train_cp.py", "--out", str(tmp_path), "--layouts", "7:1", "--cp", "1", "2", "--cell-timeout", "240")
  rows = json.loads((tmp_path / "train_cp.json").read_text())["rows"]
  assert [r["cp"] for r in rows] == [1, 2] and all(r["steps"] == 2 and r["compile_s"] > 0 for r in rows)
  assert abs(rows[0]["loss"] - rows[1]["loss"]) < 2e-2


def test_cached_decoding_smoke_agrees_with_uncached(tmp_path):
  _smoke("bench_cached_decoding.py", "--out", str(tmp_path))
  res = json.loads((tmp_path / "cached_decoding.json").read_text())
  assert res["greedy_agreement"] == "8/8" and res["cached_s"] > 0 and res["uncached_s"] > 0


def test_packed_attention_check_smoke(tmp_path):
  _smoke("check_packed_attention.py", "--out", str(tmp_path))
  res = json.loads((tmp_path / "packed_attention.json").read_text())
  assert res["pallas_packed_ok"] and max(res["rows"][0]["pallas_packed"]["rel_err"].values()) < 1e-4
