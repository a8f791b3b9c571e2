"""What the study measures for one loaded model: the ``hydrahead_jax.eval`` suite (cached per task x length cell,
so an evaluation cut by the end of a GPU stretch resumes), the short-context proxy against the teacher, the cost
(parameters, cache bytes per token) and the environment."""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import platform
import subprocess
import time

import jax
import numpy as np

from hydrahead_jax.interop.format import read_json, write_json
from hydrahead_jax.study.config import StudyEval


def eval_settings(e: StudyEval) -> dict:
  """What makes two evaluations comparable (stored with every result)."""
  from hydrahead_jax.eval import corpus

  return {"tasks": list(e.tasks), "lengths": list(e.lengths), "examples": e.examples, "seed": e.seed,
          "chat": e.chat, "ppl_docs": e.ppl_docs, "max_new_tokens": e.max_new_tokens,
          "corpus": corpus.fingerprint()}


def compact_cell(cell: dict) -> dict:
  """An eval cell without the per-example texts: accuracies, n and the per-example generation scores."""
  return {"acc": cell["gen_acc"], "lp_acc": cell["lp_acc"], "logprob": cell["logprob"], "n": cell["n"],
          "scores": [float(x["gen_score"]) for x in cell.get("examples", [])], "seconds": cell.get("seconds")}


def run_eval(model, tokenizer, e: StudyEval, cache_dir: str, name: str, print_fn=print) -> dict:
  """{'settings', 'cells': {task: {length: cell}}, 'ppl', 'seconds'}; every (task, length) cell and the perplexity
  are cached as JSON under ``cache_dir`` (keyed by the settings) and reused by a rerun."""
  from hydrahead_jax.eval.evaluate import evaluate_model
  from hydrahead_jax.eval.runner import RunSettings, suite_slots

  settings = eval_settings(e)
  key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
  cdir = os.path.join(cache_dir, key)
  write_json(os.path.join(cdir, "settings.json"), settings)
  # one cache size for every cell (the cells run one at a time): one compiled prefill chunk and decode step
  rs = RunSettings(batch_size=e.batch_size, chunk_size=e.chunk_size, max_new_tokens=e.max_new_tokens,
                   cache_slots=suite_slots(e.lengths, e.max_new_tokens))
  kw = dict(examples=e.examples, seed=e.seed, chat=e.chat, ppl_docs=e.ppl_docs, settings=rs, name=name)
  cells: dict = {}
  t0 = time.perf_counter()
  done = computed = 0
  for length in e.lengths:
    for task in e.tasks:
      if task == "ppl":
        continue
      path = os.path.join(cdir, f"{task}@{length}.json")
      if os.path.isfile(path):
        cell = read_json(path)
        done += 1
      else:
        res = evaluate_model(model, tokenizer, tasks=[task], lengths=[length], **kw)
        cell = compact_cell(res["tasks"][task][str(length)])
        write_json(path, cell)
        computed += 1
      cells.setdefault(task, {})[str(length)] = cell
  ppl = None
  if "ppl" in e.tasks:
    path = os.path.join(cdir, "ppl.json")
    if os.path.isfile(path):
      ppl = read_json(path)
    else:
      ppl = evaluate_model(model, tokenizer, tasks=["ppl"], lengths=[max(e.lengths)], **kw)["ppl"]
      write_json(path, ppl)
  if done:
    print_fn(f"  [{name}] evaluation: {done} cells from the cache ({cdir}), {computed} computed")
  return {"settings": settings, "cells": cells, "ppl": ppl, "seconds": round(time.perf_counter() - t0, 2)}


def import_eval(model_results: dict, config: dict) -> dict:
  """The eval block of an arm from one model of a ``python -m hydrahead_jax.eval`` results.json."""
  cells = {task: {length: compact_cell(c) for length, c in per.items()} for task, per in model_results["tasks"].items()}
  settings = {k: config.get(k) for k in ("tasks", "lengths", "examples", "seed", "chat", "ppl_docs",
                                         "max_new_tokens", "corpus")}
  return {"settings": settings, "cells": cells, "ppl": model_results.get("ppl"),
          "seconds": model_results.get("seconds")}


# -- the short-context proxy ----------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("graphdef", "t_graphdef"))
def _agree_kl(graphdef, state, t_graphdef, t_state, tokens_BxT):
  """Per row: the fraction of positions whose arg-max token equals the teacher's, and the mean KL(teacher || model)."""
  import jax.numpy as jnp
  from flax import nnx

  logp_BxTxV = jax.nn.log_softmax(nnx.merge(graphdef, state)(tokens_BxT).astype(jnp.float32), -1)
  t_logp_BxTxV = jax.nn.log_softmax(nnx.merge(t_graphdef, t_state)(tokens_BxT).astype(jnp.float32), -1)
  agree_BxT = jnp.argmax(logp_BxTxV, -1) == jnp.argmax(t_logp_BxTxV, -1)
  kl_BxT = jnp.sum(jnp.exp(t_logp_BxTxV) * (t_logp_BxTxV - logp_BxTxV), -1)
  return agree_BxT.mean(-1), kl_BxT.mean(-1)


def proxy_docs(tokenizer, length: int, num: int, seed: int) -> np.ndarray:
  """[num, length] held-out running text of the eval corpus (seeded starts; its own random stream)."""
  from hydrahead_jax.eval.corpus import tokenized

  corpus = tokenized(tokenizer)
  rng = np.random.default_rng([int(seed), 2 << 20, int(length)])
  bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None else []
  return np.asarray([bos + corpus.document(int(rng.integers(len(corpus.ids))), length - len(bos))
                     for _ in range(num)], np.int32)


def short_context_proxy(model, teacher, tokenizer, e: StudyEval) -> dict:
  """Top-1 agreement with the teacher and KL(teacher || model) in nats per token, mean and standard error over
  ``e.proxy_docs`` documents of ``e.proxy_length`` tokens."""
  import jax.numpy as jnp
  from flax import nnx

  t0 = time.perf_counter()
  docs_NxT = proxy_docs(tokenizer, e.proxy_length, e.proxy_docs, e.seed)
  graphdef, state = nnx.split(model)
  t_graphdef, t_state = nnx.split(teacher)
  agree, kl = [], []
  for a in range(0, len(docs_NxT), e.proxy_batch):
    rows = docs_NxT[a:a + e.proxy_batch]
    ag, k = _agree_kl(graphdef, state, t_graphdef, t_state, jnp.asarray(rows))
    agree += np.asarray(ag).tolist()
    kl += np.asarray(k).tolist()
  se = lambda x: float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else None  # noqa: E731
  return {"length": e.proxy_length, "docs": len(agree), "top1_agreement": float(np.mean(agree)),
          "top1_agreement_se": se(agree), "kl": float(np.mean(kl)), "kl_se": se(kl),
          "seconds": round(time.perf_counter() - t0, 2)}


TEACHER_PROXY = {"top1_agreement": 1.0, "top1_agreement_se": 0.0, "kl": 0.0, "kl_se": 0.0,
                 "note": "the teacher itself (agreement 1, KL 0 by definition)"}


# -- cost and environment -------------------------------------------------------------------------
def cost(cfg, params: int | None, length: int) -> dict:
  """FA budget, parameters and cache bytes (``generation.cache_bytes``) of a model config."""
  from hydrahead_jax.config import HeadLayout
  from hydrahead_jax.generation import cache_bytes

  layout = cfg.layout or HeadLayout.all_fa(cfg.num_layers, cfg.num_kv_heads)
  total = cfg.num_layers * cfg.num_kv_heads
  cb = cache_bytes(cfg, length)
  return {"fa_groups": layout.total_fa_groups(), "total_groups": total,
          "fa_fraction": layout.total_fa_groups() / total, "layout": layout.describe(cfg.num_kv_heads),
          "fa_layers": sum(1 for g in layout.fa_groups if g), "params": params,
          "cache_bytes_per_token": cb["per_token"], "cache_bytes_fixed": cb["fixed"],
          "cache_bytes_at_max_length": cb["total"], "max_length": int(length), "cache_dtype": str(cfg.dtype),
          "fusion": cfg.fusion, "la_sharing": cfg.la_sharing}


def _git_commit() -> str | None:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         timeout=10)
    return out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def environment() -> dict:
  import flax

  dev = jax.devices()[0]
  return {"device": f"{len(jax.devices())} x {getattr(dev, 'device_kind', dev.platform)}", "platform": dev.platform,
          "jax": jax.__version__, "flax": flax.__version__, "python": platform.python_version(),
          "host": platform.node(), "git_commit": _git_commit(),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
