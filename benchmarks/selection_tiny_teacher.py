"""Head selection on a small teacher trained on CPU with the embedded synthetic corpus.

1. trains a small all-FA byte-level model (default 4 layers x 8 heads, 4 KV groups, d 128) on the retrieval-heavy
   synthetic mixture (answer tokens weighted up), a few minutes on 2 CPU cores;
2. runs the selection CLI's analysis on it (exact + attribution patching, Wu retrieval score, mean ablation,
   CKA, causal ablation test) and times it;
3. converts it to a 3:1 student (global policy; 7:1 on 4 groups per layer is < 1 group a layer) with calibrated
   fusion scales and checks the LA head output RMS on held-out text.

    python benchmarks/selection_tiny_teacher.py --out runs/tiny_sel [--steps 1500]

Writes OUT/teacher (model dir), OUT/sel (head_scores.json, heatmap.png, cka.png, report.txt, layouts),
OUT/student (converted model dir) and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def train_teacher(args):
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from hydrahead_jax.config import ModelConfig
  from hydrahead_jax.data import ByteTokenizer, generate_example
  from hydrahead_jax.nn.model import HydraHeadLM

  tok = ByteTokenizer()
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=args.d_model, num_layers=args.layers, num_heads=args.heads,
                    num_kv_heads=args.groups, head_dim=args.d_model // args.heads, mlp_dim=2 * args.d_model,
                    rope_theta=10_000.0, dtype="float32", max_position=4096)
  model = HydraHeadLM(cfg, rngs=nnx.Rngs(args.seed))
  sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, 100, args.steps, args.lr * 0.1)
  opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01)),
                      wrt=nnx.Param)
  tasks = args.train_tasks.split(",")
  probs = np.array([float(x) for x in args.train_weights.split(",")])
  probs = probs / probs.sum()
  rng = np.random.default_rng(args.seed)

  def batch(step):
    rows, masks = [], []
    for i in range(args.batch):
      t = tasks[rng.choice(len(tasks), p=probs)]
      try:
        ex = generate_example(t, args.seed, step * args.batch + i, args.length, tok)
      except ValueError:  # multi-key needles need more tokens than --length: a single needle instead
        ex = generate_example("niah_single", args.seed, step * args.batch + i, args.length, tok)
      rows.append(ex["tokens"])
      masks.append(ex["answer_mask"])
    return np.stack(rows), np.stack(masks).astype(np.float32)

  @nnx.jit
  def train_step(model, opt, tokens, answer):
    def loss_fn(m):
      logits = m(tokens[:, :-1])
      logp = jax.nn.log_softmax(logits, axis=-1)
      nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
      w = 1.0 + args.answer_weight * answer[:, 1:]
      return jnp.sum(nll * w) / jnp.sum(w), jnp.sum(nll * answer[:, 1:]) / jnp.maximum(jnp.sum(answer[:, 1:]), 1)

    (loss, ans_loss), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    opt.update(model, grads)
    return loss, ans_loss

  t0 = time.perf_counter()
  log, recent = [], []
  for step in range(args.steps):
    tokens, answer = batch(step)
    loss, ans = train_step(model, opt, jnp.asarray(tokens), jnp.asarray(answer))
    recent.append(float(ans))
    if step % 50 == 0 or step == args.steps - 1:
      log.append({"step": step, "loss": float(loss), "answer_nll": float(np.mean(recent[-50:])),
                  "s": time.perf_counter() - t0})
      print(json.dumps(log[-1]), flush=True)
      if step >= 100 and log[-1]["answer_nll"] < args.target_answer_nll:
        break  # retrieval learned
  return cfg, model, tok, {"train_seconds": time.perf_counter() - t0, "log": log}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--steps", type=int, default=1500)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--length", type=int, default=320)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--groups", type=int, default=4)
  ap.add_argument("--d-model", type=int, default=128)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--answer-weight", type=float, default=4.0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--train-tasks", default="mqar,grammar")
  ap.add_argument("--train-weights", default="0.8,0.2")
  ap.add_argument("--target-answer-nll", type=float, default=0.3, help="stop training early below this")
  ap.add_argument("--probe-lengths", default="128,192")
  ap.add_argument("--probe-tasks", default="mqar")
  ap.add_argument("--budget", default="3:1")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)

  from hydrahead_jax import select
  from hydrahead_jax.selection.ckpt import read_manifest, save_model

  tdir = os.path.join(args.out, "teacher")
  if os.path.isdir(tdir):
    print(f"reusing the teacher in {tdir}")
    summary = json.load(open(os.path.join(args.out, "train.json")))
  else:
    _, model, _, summary = train_teacher(args)
    save_model(model, tdir)
    json.dump(summary, open(os.path.join(args.out, "train.json"), "w"), indent=1)

  sel = os.path.join(args.out, "sel")
  t0 = time.perf_counter()
  select.main(["analyze", "--teacher", tdir, "--lengths", args.probe_lengths, "--tasks", args.probe_tasks,
               "--per-task", "16", "--budget",
               args.budget, "--batch-size", "4", "--chunk", "8", "--causal-per-task", "16", "--random-draws", "5",
               "--out", sel, "--quiet"])
  analysis_s = time.perf_counter() - t0
  sdir = os.path.join(args.out, "student")
  t0 = time.perf_counter()
  select.main(["convert", "--teacher", tdir, "--layout", os.path.join(sel, "layout_global.json"), "--calib-num", "64",
               "--calib-length", str(args.length), "--calib-batch", "16", "--heldout-num", "64", "--out", sdir,
               "--quiet"])
  convert_s = time.perf_counter() - t0
  scores = json.load(open(os.path.join(sel, "head_scores.json")))
  conv = read_manifest(sdir)["metadata"]["conversion"]
  summary.update(analysis_wall_s=analysis_s, convert_wall_s=convert_s, timing=scores["timing"],
                 probes=scores["probes"], agreement=scores["agreement"], causal_test=scores.get("causal_test"),
                 heldout_rms=conv.get("heldout"), layout=conv["describe"])
  json.dump(summary, open(os.path.join(args.out, "summary.json"), "w"), indent=1)
  print(json.dumps({k: summary[k] for k in ("analysis_wall_s", "convert_wall_s", "layout")}, indent=1))


if __name__ == "__main__":
  main()
