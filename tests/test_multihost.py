"""Multi-host training on one machine: two JAX CPU processes on 127.0.0.1 (gloo collectives).

The reference is one process with 2 CPU devices; the multi-host run is 2 processes x 1 CPU device
(same mesh data=2, same global batch of 4 rows). Grain shards documents per process, so the
reference reads the same two shards in one process (rows 0-1 from shard 0/2, rows 2-3 from shard 1/2,
exactly what processes 0 and 1 feed) through a stand-in for ``make_train_iterator``. The multi-host run
stops after its step-2 checkpoint (SIGTERM to itself, both processes) and resumes to step 4; its
final parameters must equal the reference's bit for bit (see docs/parallelism.md, "Multi-host").
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.path.join(ROOT, "configs", "micro.py")
BASE = ["train.progress=false", "train.eval_tasks=", "train.steps=4", "checkpoint.every=2",
        "train.data_parallel=-1"]

DRIVER = textwrap.dedent("""
    import dataclasses, json, os, signal, sys
    import jax
    jax.config.update("jax_num_cpu_devices", int(os.environ["NDEV"]))
    import numpy as np
    from hydrahead_jax.train import config_lib, loop

    emulate = int(os.environ.get("EMULATE_SHARDS", "0"))
    if emulate:  # one process reading the per-process shards of an `emulate`-process run, in order
      class Concat:
        def __init__(self, its):
          self.its = its
        def __iter__(self):
          return self
        def __next__(self):
          bs = [next(i) for i in self.its]
          return {k: np.concatenate([b[k] for b in bs]) for k in bs[0]}
        def get_state(self):
          return json.dumps([i.get_state() for i in self.its]).encode()
        def set_state(self, s):
          for i, st in zip(self.its, json.loads(s)):
            i.set_state(st)
        def start_prefetch(self):
          pass
      orig = loop.make_train_iterator
      def make(dcfg, pi, pc):
        assert (pi, pc) == (0, 1)
        sub = dataclasses.replace(dcfg, batch_size=dcfg.batch_size // emulate)
        return Concat([orig(sub, k, emulate) for k in range(emulate)])
      loop.make_train_iterator = make

    stop_at = int(os.environ.get("STOP_AT", "0"))
    steps = []
    def hook(event, step, trainer):
      if event == "step":
        steps.append(step)
      if event == "step" and step == stop_at:
        os.kill(os.getpid(), signal.SIGTERM)  # the loop saves (already saved here) and exits cleanly
    cfg = config_lib.load(sys.argv[1], sys.argv[3:], workdir=sys.argv[2])
    s = loop.train(cfg, callbacks=[hook], print_fn=lambda m: print(m, flush=True))
    print("RESULT", json.dumps({"step": s["step"], "status": s["status"], "pc": jax.process_count(),
                                "ndev": len(jax.devices()),
                                "first": steps[0] if steps else None, "acc": s["retrieval_acc"]}), flush=True)
""")


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRAHEAD_", "JAX_", "XLA_"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
             JAX_COMPILATION_CACHE_DIR=extra.pop("cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _start(script, workdir, env, *overrides):
  return subprocess.Popen([sys.executable, str(script), MICRO, str(workdir), *BASE, *overrides],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def _finish(procs, timeout=150):
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return [json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:]) for out in outs]


def _multihost(script, workdir, cache, n, *overrides, stop_at=0):
  port = _free_port()
  procs = [_start(script, workdir, _env(cache=cache, NDEV=1, STOP_AT=stop_at,
                                        HYDRAHEAD_COORDINATOR=f"127.0.0.1:{port}",
                                        HYDRAHEAD_NUM_PROCESSES=n, HYDRAHEAD_PROCESS_ID=i), *overrides)
           for i in range(n)]
  return _finish(procs)


def _params(workdir, step):
  """Flat params of a checkpoint as numpy, restored onto this (1-device) process whatever topology
  wrote them."""
  import jax
  import orbax.checkpoint as ocp

  path = os.path.join(workdir, "checkpoints", str(step), "state")
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as c:
    meta = c.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta)
    out = c.restore(path, target)
  return {k: np.asarray(v) for k, v in out["params"].items()}


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_env_parsing():
  from hydrahead_jax.cli import UserError
  from hydrahead_jax.train import distributed as d

  assert d.from_env({}) is None
  assert d.from_env({"HYDRAHEAD_COORDINATOR": "127.0.0.1:1234", "HYDRAHEAD_NUM_PROCESSES": "2",
                     "HYDRAHEAD_PROCESS_ID": "1"}) == {
                         "coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
  bad = {
      (("HYDRAHEAD_COORDINATOR", "127.0.0.1:1"),): "HYDRAHEAD_NUM_PROCESSES, HYDRAHEAD_PROCESS_ID not",
      (("HYDRAHEAD_COORDINATOR", "x"), ("HYDRAHEAD_NUM_PROCESSES", "2"), ("HYDRAHEAD_PROCESS_ID", "0")):
          "not host:port",
      (("HYDRAHEAD_COORDINATOR", "h:1"), ("HYDRAHEAD_NUM_PROCESSES", "2"), ("HYDRAHEAD_PROCESS_ID", "2")):
          "not in 0..",
      (("HYDRAHEAD_COORDINATOR", "h:1"), ("HYDRAHEAD_NUM_PROCESSES", "two"), ("HYDRAHEAD_PROCESS_ID", "0")):
          "must be integers",
  }
  for env, needle in bad.items():
    with pytest.raises(UserError, match=needle) as e:
      d.from_env(dict(env))
    assert "\n" not in str(e.value)
  assert d.initialize(False, {}) is False  # nothing set, not requested: single process, no JAX call


def test_partial_env_is_one_line_cli_error(tmp_path):
  env = _env(cache=str(tmp_path / "cache"), HYDRAHEAD_PROCESS_ID=0)
  r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", MICRO, "--workdir",
                      str(tmp_path / "run"), "--set", "train.progress=false"],
                     capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  err = [l for l in r.stderr.splitlines() if l.strip()]
  assert err[-1].startswith("error: multi-host: HYDRAHEAD_PROCESS_ID set but"), r.stderr[-2000:]


def test_two_processes_match_one_process_bitwise(tmp_path):
  script = tmp_path / "driver.py"
  script.write_text(DRIVER)
  cache = str(tmp_path / "cache")
  t0 = time.time()
  ref, multi = tmp_path / "ref", tmp_path / "multi"

  # reference: 1 process x 2 CPU devices, reading both process shards
  [r] = _finish([_start(script, ref, _env(cache=cache, NDEV=2, EMULATE_SHARDS=2))])
  print(f"reference run {time.time() - t0:.1f}s")
  assert r == {"step": 4, "status": "complete", "pc": 1, "ndev": 2, "first": 1, "acc": None}

  # multi-host: 2 processes x 1 CPU device; stop after the step-2 checkpoint, then resume to 4
  t1 = time.time()
  rs = _multihost(script, multi, cache, 2, stop_at=2)
  print(f"multi-host run to step 2 {time.time() - t1:.1f}s")
  assert [x["pc"] for x in rs] == [2, 2] and [x["ndev"] for x in rs] == [2, 2]
  assert [(x["step"], x["status"], x["first"]) for x in rs] == [(2, "interrupted", 1)] * 2
  ckpt = multi / "checkpoints" / "2"
  assert sorted(f for f in os.listdir(ckpt / "data") if f.endswith(".json")) == ["process_0-of-2.json", "process_1-of-2.json"]
  t1 = time.time()
  rs = _multihost(script, multi, cache, 2, "train.eval_tasks=mqar")  # + a final evaluation (resume-safe)
  print(f"multi-host resume to step 4 {time.time() - t1:.1f}s")
  assert [(x["step"], x["status"], x["first"]) for x in rs] == [(4, "complete", 3)] * 2  # resumed
  assert rs[0]["acc"] is not None and rs[0]["acc"] == rs[1]["acc"]

  # the run cannot be resumed by another number of processes (its data stream is sharded per process)
  r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", MICRO, "--workdir",
                      str(multi), *[a for o in BASE for a in ("--set", o)], "--set", "train.steps=6"],
                     capture_output=True, text=True, env=_env(cache=cache), cwd=ROOT, timeout=120)
  assert r.returncode == 2 and "written by 2 JAX process(es), this run has 1" in r.stderr, r.stderr[-2000:]
  assert sorted(os.listdir(multi / "checkpoints")) == ["2", "4"]  # nothing set aside

  # only process 0 writes the run files; both runs log the same losses and end with the same params
  for name in ("config.json", "metrics.jsonl", "summary.json"):
    assert (multi / name).exists(), name
  assert _losses(multi) == _losses(ref)
  a, b = _params(ref, 4), _params(multi, 4)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
