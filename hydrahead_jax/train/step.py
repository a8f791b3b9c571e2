"""The jitted train step (gradient accumulation over microbatches) and the eval step.

Loss: next-token cross entropy (float32 logits) summed over ``loss_mask`` and divided by the
number of masked tokens of the whole step, so ``grad_accum`` microbatches give the same gradient
as one big batch. A step whose loss, gradient norm or new parameters are not finite returns the
previous state unchanged with ``ok = 0``; the loop stops on it, so the last checkpoint stays good.

With ``loss_chunk`` > 0 (default ``losses.DEFAULT_CHUNK``) the model returns its final hidden states and
``hydrahead_jax.losses.chunked_cross_entropy`` computes CE and argmax hits ``loss_chunk`` positions at a
time (exact gradients, no [B, T, V] logits); 0 = the plain full-logits path.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from hydrahead_jax.losses import DEFAULT_CHUNK, chunked_cross_entropy
from hydrahead_jax.parallel.context import per_token_shards
from hydrahead_jax.train.state import merge

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask", "answer_mask")


def global_norm(tree) -> jax.Array:
  """L2 norm of a tree of arrays, accumulated in float32 whatever the parameter dtype."""
  return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def loss_weights(batch, answer_weight: float) -> jax.Array:
  """Per-token loss weights: ``loss_mask``, with answer tokens counted ``answer_weight`` times."""
  if answer_weight == 1.0:
    return batch["loss_mask"]
  return batch["loss_mask"] * (1.0 + (answer_weight - 1.0) * batch["answer_mask"])


def token_stats(logits_BxTxV, batch, answer_weight: float = 1.0) -> dict[str, jax.Array]:
  """Sums over a batch: masked CE (plain and answer-weighted), masked tokens, answer tokens and
  correct answer tokens."""
  return stats_from_tokens(*_logit_outputs(logits_BxTxV, batch["targets"]), batch, answer_weight)


def _logit_outputs(logits_BxTxV, targets_BxT) -> tuple[jax.Array, jax.Array]:
  ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
  return ce_BxT, jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT


def stats_from_tokens(ce_BxT, hit_BxT, batch, answer_weight: float = 1.0) -> dict[str, jax.Array]:
  """``token_stats`` from per-token CE [B, T] and argmax hits [B, T] (e.g. of ``chunked_cross_entropy``)."""
  mask, answer = batch["loss_mask"], batch["answer_mask"]
  hit_BxT = hit_BxT.astype(jnp.float32)
  return {
      "weighted_ce_sum": jnp.sum(ce_BxT * loss_weights(batch, answer_weight)),
      "ce_sum": jnp.sum(ce_BxT * mask),
      "tokens": jnp.sum(mask),
      "answers": jnp.sum(answer),
      "answer_hits": jnp.sum(hit_BxT * answer),
  }


def microbatches(batch: Mapping[str, jax.Array], n: int) -> dict[str, jax.Array]:
  """[B, T] -> [n, B/n, T]; microbatch a holds rows a, a+n, ... (keeps data sharding contiguous)."""
  return {k: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1) for k, x in batch.items()}


def token_outputs(model, batch, loss_chunk: int = DEFAULT_CHUNK) -> tuple[jax.Array, jax.Array]:
  """Per-token next-token CE [B, T] float32 and argmax hits [B, T] of ``model`` on a batch.

  ``loss_chunk`` > 0: from the final hidden states, ``loss_chunk`` positions at a time (no [B, T, V]
  logits), on each device's own tokens under context parallelism; 0: through the full float32 logits (optax CE,
  as ``token_stats``).
  """
  args = (batch["inputs"], batch["segment_ids"], batch["positions"])
  if loss_chunk > 0:
    w, layout = model.output_projection()
    return per_token_shards(chunked_cross_entropy)(model.hidden(*args), w, batch["targets"], w_layout=layout,
                                                   chunk=loss_chunk)
  return _logit_outputs(model(*args), batch["targets"])


def make_train_step(graphdef, rest, tx: optax.GradientTransformation, schedule: Callable,
                    grad_accum: int, answer_weight: float = 1.0, loss_chunk: int = DEFAULT_CHUNK) -> Callable:
  """``step(state, batch) -> (state, metrics)``; state = {params, opt_state, step} (flat params).

  The gradient is that of the answer-weighted mean CE (``answer_weight`` > 1 stresses retrieval
  targets); the reported ``loss`` is always the plain mean CE over ``loss_mask``. ``loss_chunk``:
  positions per chunk of the chunked CE (``token_outputs``); 0 = full logits.
  """

  def micro_loss(params, mb, denom):
    ce_BxT, hit_BxT = token_outputs(merge(graphdef, params, rest), mb, loss_chunk)
    stats = stats_from_tokens(ce_BxT, hit_BxT, mb, answer_weight)
    return stats["weighted_ce_sum"] / denom, stats

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(state, batch):
    params = state["params"]
    denom = jnp.maximum(jnp.sum(loss_weights(batch, answer_weight)), 1.0)
    mbs = microbatches({k: batch[k] for k in BATCH_KEYS}, grad_accum)
    zeros = jax.tree.map(jnp.zeros_like, params)
    zero_stats = {k: jnp.zeros((), jnp.float32)
                  for k in ("weighted_ce_sum", "ce_sum", "tokens", "answers", "answer_hits")}

    def body(carry, mb):
      g_acc, s_acc = carry
      (_, stats), g = grad_fn(params, mb, denom)
      return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, stats)), None

    (grads, stats), _ = jax.lax.scan(body, (zeros, zero_stats), mbs)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    loss = stats["ce_sum"] / jnp.maximum(stats["tokens"], 1.0)
    grad_norm = global_norm(grads)
    param_norm = global_norm(new_params)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = {
        "params": keep(new_params, params),
        "opt_state": keep(opt_state, state["opt_state"]),
        "step": state["step"] + ok.astype(state["step"].dtype),
    }
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": param_norm,
        "lr": jnp.asarray(schedule(state["step"]), jnp.float32),
        "tokens": stats["tokens"],
        "answers": stats["answers"],
        "answer_hits": stats["answer_hits"],
        "ok": ok.astype(jnp.int32),
    }
    return new_state, metrics

  return step


def make_eval_step(graphdef, rest, loss_chunk: int = DEFAULT_CHUNK) -> Callable:
  """``eval(params, batch) -> sums`` (ce_sum, tokens, answers, answer_hits, rows_all_correct)."""

  def evaluate(params, batch):
    ce_BxT, hit_BxT = token_outputs(merge(graphdef, params, rest), batch, loss_chunk)
    stats = stats_from_tokens(ce_BxT, hit_BxT, batch)
    wrong = (~hit_BxT) & (batch["answer_mask"] > 0)
    has_answer = jnp.any(batch["answer_mask"] > 0, axis=1)
    stats["rows_correct"] = jnp.sum((~jnp.any(wrong, axis=1)) & has_answer).astype(jnp.float32)
    stats["rows"] = jnp.sum(has_answer).astype(jnp.float32)
    return stats

  return evaluate


def host_metrics(m: Mapping[str, Any]) -> dict[str, float]:
  out = {k: float(v) for k, v in jax.device_get(dict(m)).items()}
  if out.get("answers", 0) > 0:
    out["answer_acc"] = out["answer_hits"] / out["answers"]
  return out
