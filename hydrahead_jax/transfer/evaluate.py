"""The before/after table: teacher vs converted vs transferred student on held-out retrieval probes and text.

Probes are ``selection.probes.make_probes`` sets (another seed than selection and calibration), scored
teacher-forced like the selection's causal test: a probe is solved when every scored answer token is the
arg-max (exactly when greedy decoding answers); ``logp`` is the mean over probes of the summed log-probability
of the answer tokens. Text: mean next-token CE on held-out text and the mean KL(teacher || model) on it.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hydrahead_jax.selection.probes import ProbeSet, make_probes
from hydrahead_jax.transfer.config import EvalConfig


def probe_sets(tokenizer, ecfg: EvalConfig) -> list[ProbeSet]:
  return [make_probes(tokenizer, L, tasks=ecfg.tasks, per_task=ecfg.per_task, seed=ecfg.seed) for L in ecfg.lengths]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _probe_scores(graphdef, state, tokens_BxS, targets_BxS, weights_BxS):
  logits = nnx.merge(graphdef, state)(tokens_BxS)
  logp = jax.nn.log_softmax(logits, -1)
  lp = jnp.take_along_axis(logp, targets_BxS[..., None], -1)[..., 0]
  wrong = (jnp.argmax(logits, -1) != targets_BxS) & (weights_BxS > 0)
  return jnp.sum(lp * weights_BxS, -1), ~jnp.any(wrong, -1)


@functools.partial(jax.jit, static_argnames=("graphdef", "t_graphdef", "window"))
def _text_scores(graphdef, state, t_graphdef, t_state, tokens_BxT, window):
  """Sums of CE inside / beyond the teacher window, KL(teacher || model) inside it, and the token counts."""
  logits = nnx.merge(graphdef, state)(tokens_BxT[:, :-1])
  logp = jax.nn.log_softmax(logits, -1)
  ce = -jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], -1)[..., 0]
  t_logp = jax.nn.log_softmax(nnx.merge(t_graphdef, t_state)(tokens_BxT[:, :-1]), -1)
  kl = jnp.sum(jnp.exp(t_logp) * (t_logp - logp), -1)
  inside = (jnp.arange(ce.shape[1]) < window)[None, :].astype(jnp.float32)
  return (jnp.sum(ce * inside), jnp.sum(ce * (1 - inside)), jnp.sum(kl * inside),
          jnp.sum(jnp.broadcast_to(inside, ce.shape)), jnp.sum(jnp.broadcast_to(1 - inside, ce.shape)))


def _batches(n: int, bs: int):
  return [(s, min(s + bs, n)) for s in range(0, n, bs)]


def evaluate(model, sets: Sequence[ProbeSet], text: Sequence[np.ndarray], teacher, batch_size: int,
             window: int) -> dict:
  """{'probes': {f'{task}@{len}': {'acc', 'logp', 'n'}}, 'text_ce', 'text_ce_beyond', 'text_kl'} for one model.

  Text rows are scored from position 0: CE at positions < ``window`` (the teacher's trained context) and >= it,
  KL(teacher || model) at positions < ``window``."""
  graphdef, state = nnx.split(model)
  out: dict = {"probes": {}}
  for ps in sets:
    lp_all, ok_all = [], []
    for a, b in _batches(ps.num, batch_size):
      lp, ok = _probe_scores(graphdef, state, jnp.asarray(ps.clean[a:b]), jnp.asarray(ps.targets[a:b]),
                             jnp.asarray(ps.weights[a:b]))
      lp_all.append(np.asarray(lp))
      ok_all.append(np.asarray(ok))
    lp_all, ok_all = np.concatenate(lp_all), np.concatenate(ok_all)
    for task in dict.fromkeys(ps.tasks.tolist()):
      sel = ps.tasks == task
      out["probes"][f"{task}@{ps.prompt_len}"] = {"acc": float(ok_all[sel].mean()), "logp": float(lp_all[sel].mean()),
                                                 "n": int(sel.sum())}
  if text:
    t_graphdef, t_state = nnx.split(teacher)
    sums = np.zeros(5)
    vocab = model.cfg.vocab_size
    for rows in text:  # full logits here: at most ~2^28 logits (1 GiB in float32) per call
      per = max(1, min(len(rows), (1 << 28) // max(rows.shape[1] * vocab, 1)))
      for a in range(0, len(rows), per):
        sums += np.asarray([float(x) for x in _text_scores(graphdef, state, t_graphdef, t_state,
                                                           jnp.asarray(rows[a:a + per]), int(window))])
    ce_in, ce_out, kl_in, n_in, n_out = sums
    out["text_ce"] = ce_in / max(n_in, 1)
    out["text_kl"] = kl_in / max(n_in, 1)
    if n_out:
      out["text_ce_beyond"] = ce_out / n_out
    out["text_positions"] = int(text[0].shape[1] - 1)
    out["window"] = int(window)
  return out


def format_table(rows: Sequence[tuple[str, Mapping]]) -> str:
  """One line per model: probe accuracy per task@length, mean answer log-prob, text CE inside / beyond the
  teacher's window and KL to the teacher inside it."""
  cols = list(dict.fromkeys(k for _, r in rows for k in r.get("probes", {})))
  has_text = any("text_ce" in r for _, r in rows)
  beyond = any("text_ce_beyond" in r for _, r in rows)
  head = f"{'model':<16}" + "".join(f"{c:>20}" for c in cols) + f"{'answer logp':>13}"
  if has_text:
    head += f"{'CE <win':>9}" + (f"{'CE >=win':>10}" if beyond else "") + f"{'KL(teacher)':>13}"
  lines = [head, "-" * len(head)]
  for name, r in rows:
    p = r.get("probes", {})
    line = f"{name:<16}" + "".join(f"{p[c]['acc']:>12.3f} (n={p[c]['n']:>2})" if c in p else f"{'-':>20}"
                                   for c in cols)
    line += f"{np.mean([v['logp'] for v in p.values()]) if p else float('nan'):>13.3f}"
    if has_text:
      line += f"{r.get('text_ce', float('nan')):>9.3f}"
      if beyond:
        line += f"{r.get('text_ce_beyond', float('nan')):>10.3f}"
      line += f"{r.get('text_kl', float('nan')):>13.4f}"
    lines.append(line)
  lines.append("probes: fraction whose every answer token is the arg-max (teacher forced); answer logp: mean summed "
               "log-prob of the answer; CE / KL: nats per token of held-out text at positions inside (<win) / beyond "
               "(>=win) the teacher's window")
  return "\n".join(lines)
