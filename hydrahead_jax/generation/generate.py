"""Chunked prefill, a jitted decode step and ``generate`` over the hybrid cache (``generation.cache``).

Prompts of a batch are LEFT-padded to one bucketed length P, so every row's last prompt token is in the same
column; RoPE positions count real tokens only (``HybridCache.pos``), so a row's numbers do not depend on its
padding. Shapes are bucketed: P is a power of two up to the prefill chunk, then a multiple of it; the cache has
``round_up(P + max_new_tokens, bucket)`` slots. One compiled prefill chunk and one compiled decode step serve a
whole call, and every later call with the same buckets.
"""

from __future__ import annotations

import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hydrahead_jax.generation.cache import HybridCache, init_cache
from hydrahead_jax.generation.sampling import sample_logits

MAX_STOP = 8  # stop-token slots of the compiled decode step (unused slots are -1)


# -- jitted pure functions of (graphdef, state, ...) ---------------------------------------------------------
def _extend(graphdef, state, tokens_BxT, valid_BxT, cache, last_only):
  return nnx.merge(graphdef, state).extend(tokens_BxT, cache, valid_BxT, last_only=last_only)


def _extend_score(graphdef, state, tokens_BxT, valid_BxT, cache, targets_BxT):
  logits_BxTxV, cache = nnx.merge(graphdef, state).extend(tokens_BxT, cache, valid_BxT)
  logp_BxT = jnp.take_along_axis(jax.nn.log_softmax(logits_BxTxV, axis=-1), targets_BxT[..., None], axis=-1)[..., 0]
  hit_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
  return logp_BxT, hit_BxT, cache


def _choose(logits_BxV, key, done_B, stop_S, pad_id, temperature, top_k, top_p, greedy):
  tok_B = sample_logits(logits_BxV, key, temperature, top_k, top_p, greedy=greedy)
  tok_B = jnp.where(done_B, pad_id, tok_B)
  return tok_B, done_B | (tok_B[:, None] == stop_S[None, :]).any(-1)


def _first(logits_BxV, key, done_B, stop_S, pad_id, temperature, top_k, top_p, greedy):  # the prefill's token
  return _choose(logits_BxV, key, done_B, stop_S, pad_id, temperature, top_k, top_p, greedy)


def _decode(graphdef, state, tok_B, done_B, cache, key, t0, stop_S, pad_id, temperature, top_k, top_p, greedy,
            steps, unroll):
  """``steps`` decoding steps in one call (a scan): feeds tok_B, samples the next token, ...; step i samples
  with key fold_in(key, t0 + i). Returns (tokens [B, steps], last token, done, cache)."""
  def step(carry, i):
    # The parameters ride in the carry (unchanged): NNX wants the model built at the scan's own trace level.
    state, tok_B, done_B, cache = carry
    logits_Bx1xV, cache = nnx.merge(graphdef, state).extend(tok_B[:, None], cache, None, last_only=True,
                                                             unroll=unroll)
    tok_B, done_B = _choose(logits_Bx1xV[:, 0], jax.random.fold_in(key, t0 + i), done_B, stop_S, pad_id,
                            temperature, top_k, top_p, greedy)
    return (state, tok_B, done_B, cache), tok_B

  (_, tok_B, done_B, cache), toks_SxB = jax.lax.scan(step, (state, tok_B, done_B, cache), jnp.arange(steps))
  return toks_SxB.T, tok_B, done_B, cache


def _decode_logits(graphdef, state, tok_B, cache, unroll):
  logits_Bx1xV, cache = nnx.merge(graphdef, state).extend(tok_B[:, None], cache, None, last_only=True, unroll=unroll)
  return logits_Bx1xV[:, 0], cache


_JITS: dict = {}


def _jit(fn, static: tuple[int, ...], donate: tuple[int, ...], compiler_options: dict | None):
  """One ``jax.jit`` per (function, donation, compiler options); jax caches its compilations per shape."""
  opts = tuple(sorted((compiler_options or {}).items()))
  key = (fn.__name__, donate, opts)
  if key not in _JITS:
    _JITS[key] = jax.jit(fn, static_argnums=static, donate_argnums=donate,
                         compiler_options=dict(opts) if opts else None)
  return _JITS[key]


def split_model(model) -> tuple:
  """(graphdef, state) of a model; every function here also takes this pair in place of the model, which saves
  the split (a walk over all modules) on each call of a tight loop."""
  return tuple(model) if isinstance(model, tuple) else nnx.split(model)


# -- padding and buckets ---------------------------------------------------------------------------------------
def round_up(n: int, multiple: int) -> int:
  return -(-int(n) // multiple) * multiple


def prompt_bucket(n: int, chunk_size: int) -> int:
  """Padded prompt length: the next power of two (>= 8) while within one chunk, else a multiple of the chunk."""
  p = max(8, 1 << (max(int(n), 1) - 1).bit_length())
  return p if p <= chunk_size else round_up(n, chunk_size)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, P] int32, valid [B, P] bool): prompts right-aligned (padding on the left), P = ``length``
  (default the longest prompt)."""
  lens = [len(p) for p in prompts]
  if not prompts or min(lens) < 1:
    raise ValueError("generate: every prompt needs at least one token")
  P = max(lens) if length is None else int(length)
  if P < max(lens):
    raise ValueError(f"left_pad: length {P} is shorter than the longest prompt ({max(lens)} tokens)")
  tokens = np.full((len(prompts), P), pad_id, np.int32)
  valid = np.zeros((len(prompts), P), bool)
  for b, p in enumerate(prompts):
    tokens[b, P - len(p):] = np.asarray(p, np.int32)
    valid[b, P - len(p):] = True
  return tokens, valid


# -- prefill / score / decode ----------------------------------------------------------------------------------
def _chunks(T: int, chunk_size: int, progress: bool, desc: str):
  starts = range(0, T, chunk_size)
  if progress:
    from tqdm import tqdm

    starts = tqdm(starts, desc=desc, unit="chunk", file=sys.stderr, leave=False)
  return starts


def prefill(model, tokens_BxT, cache: HybridCache, valid_BxT=None, *, chunk_size: int = 512,
            all_logits: bool = False, donate: bool = True, progress: bool = False,
            compiler_options: dict | None = None) -> tuple[jax.Array, HybridCache]:
  """Runs ``tokens`` [B, T] into ``cache`` in chunks of ``chunk_size`` (left padding marked False in
  ``valid_BxT``). Returns (logits, cache): the last column's logits [B, V] (every row's last token), or with
  ``all_logits`` [B, T, V]. ``donate``: the input cache's buffers are reused (do not touch it afterwards)."""
  graphdef, state = split_model(model)
  tokens_BxT = jnp.asarray(tokens_BxT, jnp.int32)
  B, T = tokens_BxT.shape
  valid_BxT = jnp.ones((B, T), bool) if valid_BxT is None else jnp.asarray(valid_BxT, bool)
  if int(cache.length) + T > _slots(cache):
    raise ValueError(f"prefill: {T} tokens do not fit the cache ({int(cache.length)} of {_slots(cache)} slots used)")
  fn = _jit(_extend, (0, 5), (4,) if donate else (), compiler_options)
  outs = []
  for i in _chunks(T, chunk_size, progress, "prefill"):
    logits, cache = fn(graphdef, state, tokens_BxT[:, i:i + chunk_size], valid_BxT[:, i:i + chunk_size], cache,
                       not all_logits)
    outs.append(logits)
  return (jnp.concatenate(outs, axis=1) if all_logits else outs[-1][:, -1]), cache


def score(model, tokens_BxT, targets_BxT, cache: HybridCache, valid_BxT=None, *, chunk_size: int = 512,
          donate: bool = True, progress: bool = False, compiler_options: dict | None = None
          ) -> tuple[np.ndarray, np.ndarray, HybridCache]:
  """Teacher-forced scoring through the cache: (log p(targets) [B, T] float32, argmax == target [B, T], cache).
  Only [B, chunk] logits exist at a time, so long documents fit."""
  graphdef, state = split_model(model)
  tokens_BxT = jnp.asarray(tokens_BxT, jnp.int32)
  targets_BxT = jnp.asarray(targets_BxT, jnp.int32)
  B, T = tokens_BxT.shape
  valid_BxT = jnp.ones((B, T), bool) if valid_BxT is None else jnp.asarray(valid_BxT, bool)
  fn = _jit(_extend_score, (0,), (4,) if donate else (), compiler_options)
  lps, hits = [], []
  for i in _chunks(T, chunk_size, progress, "score"):
    sl = slice(i, i + chunk_size)
    lp, hit, cache = fn(graphdef, state, tokens_BxT[:, sl], valid_BxT[:, sl], cache, targets_BxT[:, sl])
    lps.append(lp)
    hits.append(hit)
  return np.concatenate([np.asarray(x) for x in lps], 1), np.concatenate([np.asarray(x) for x in hits], 1), cache


def decode_step(model, cache: HybridCache, tokens_B, *, check: bool = True, unroll: bool = False,
                compiler_options: dict | None = None) -> tuple[jax.Array, HybridCache]:
  """One decoding step: feeds ``tokens_B`` [B] (one per row) -> (logits [B, V], cache). Donates the cache.
  ``check``: raise when the cache is full (reads its length: a device sync; loops that track it pass False)."""
  graphdef, state = split_model(model)
  if check and int(cache.length) >= _slots(cache):
    raise ValueError(f"decode_step: the cache is full ({_slots(cache)} slots)")
  return _jit(_decode_logits, (0, 4), (3,), compiler_options)(graphdef, state, jnp.asarray(tokens_B, jnp.int32),
                                                               cache, unroll)


def _slots(cache: HybridCache) -> int:
  """Slot count S of a cache (from any FA K array; LA-only caches have no slot limit)."""
  for layer in cache.layers:
    if layer.k is not None:
      return int(layer.k.shape[-3])
  return 1 << 62


def decode(model, cache: HybridCache, last_logits_BxV, max_new_tokens: int, *, temperature: float = 0.0,
           top_p: float = 1.0, top_k: int = 0, stop_tokens: Sequence[int] = (), seed: int = 0, pad_id: int = 0,
           steps_per_call: int = 16, unroll: bool = False, progress: bool = False,
           compiler_options: dict | None = None) -> list[list[int]]:
  """Continues every row from ``last_logits`` (its next-token logits) and the cache after the prompt: up to
  ``max_new_tokens`` tokens per row, each row ending at (and including) its first stop token.

  Decoding runs ``steps_per_call`` steps per jitted call (a scan: no host round trip per token); stop tokens
  are checked between calls. The cache needs ``max_new_tokens - 1`` free slots, rounded up to a multiple of
  ``steps_per_call`` (steps past the budget are computed and dropped; ``generate`` sizes its cache so).
  ``unroll`` unrolls the layer scan inside a step."""
  B = int(last_logits_BxV.shape[0])
  if max_new_tokens < 1:
    return [[] for _ in range(B)]
  stops = [int(t) for t in dict.fromkeys(stop_tokens)]
  if len(stops) > MAX_STOP:
    raise ValueError(f"generate: at most {MAX_STOP} stop tokens, got {len(stops)}")
  K = max(1, min(int(steps_per_call), max_new_tokens - 1))
  calls = -(-(max_new_tokens - 1) // K)
  if int(cache.length) + calls * K > _slots(cache):
    raise ValueError(f"generate: {max_new_tokens} new tokens ({calls} calls of {K} steps) do not fit the cache "
                     f"({int(cache.length)} of {_slots(cache)} slots used)")
  greedy = temperature <= 0
  stop_S = jnp.asarray(stops + [-1] * (MAX_STOP - len(stops)), jnp.int32)
  args = (stop_S, jnp.int32(pad_id), jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
  key = jax.random.key(seed)
  first = _jit(_first, (8,), (), compiler_options)
  tok, done = first(last_logits_BxV, jax.random.fold_in(key, 0), jnp.zeros((B,), bool), *args, greedy)
  graphdef, state = split_model(model)
  step = _jit(_decode, (0, 12, 13, 14), (4,), compiler_options)
  toks = [tok[:, None]]
  calls_it = range(calls)
  if progress:
    from tqdm import tqdm

    calls_it = tqdm(calls_it, desc="decode", unit=f"x{K} tok", file=sys.stderr, leave=False)
  for c in calls_it:
    if stops and bool(done.all()):
      break
    block, tok, done, cache = step(graphdef, state, tok, done, cache, key, jnp.int32(1 + c * K), *args, greedy,
                                   K, unroll)
    toks.append(block)
  out = np.concatenate([np.asarray(t) for t in toks], axis=1)[:, :max_new_tokens]
  rows = []
  for row in out.tolist():
    end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
    rows.append(row[:end])
  return rows


def _is_single(prompts) -> bool:
  if isinstance(prompts, np.ndarray):
    return prompts.ndim == 1
  return len(prompts) > 0 and isinstance(prompts[0], (int, np.integer))


def generate(model, prompts, max_new_tokens: int = 32, *, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, stop_tokens: Sequence[int] = (), seed: int = 0, eos_id: int | None = None,
             pad_id: int = 0, chunk_size: int = 512, bucket: int = 64, steps_per_call: int = 16,
             progress: bool = False, compiler_options: dict | None = None):
  """Generates continuations of ``prompts`` with the hybrid cache.

  Args:
    model: a ``HydraHeadLM`` (any layout; from our checkpoints, HF or GGUF).
    prompts: a list of token-id lists (rows of any lengths, run as one batch), or one token-id list.
    max_new_tokens: tokens generated per row at most.
    temperature: 0 = greedy (argmax); else sampling from softmax(logits / temperature) after the top-k
      (``top_k`` > 0) and nucleus (``top_p`` < 1) filters.
    stop_tokens, eos_id: a row ends after the first of these (``eos_id`` is added to ``stop_tokens``).
    seed: sampling seed (same seed, prompts and settings -> same tokens).
    pad_id: id used for padding (never attended; any valid id works).
    chunk_size: prefill chunk length. bucket: the cache's slot count is a multiple of this.
    steps_per_call: decoding steps per jitted call (stop tokens are checked between calls).
    progress: tqdm bars for prefill chunks and decoding. compiler_options: passed to XLA.

  Returns:
    per row the new token ids (ending with the stop token when one was produced); for one token-id list, its
    list.
  """
  single = _is_single(prompts)
  rows = [list(map(int, prompts))] if single else [list(map(int, p)) for p in prompts]
  stops = list(stop_tokens) + ([eos_id] if eos_id is not None else [])
  if max_new_tokens < 1:
    return [] if single else [[] for _ in rows]
  if not rows or min(len(r) for r in rows) < 1:
    raise ValueError("generate: every prompt needs at least one token")
  P = prompt_bucket(max(len(r) for r in rows), chunk_size)
  tokens, valid = left_pad(rows, pad_id, P)
  K = max(1, min(steps_per_call, max_new_tokens - 1))
  cache = init_cache(model, len(rows), round_up(P + round_up(max_new_tokens - 1, K), bucket))
  model = split_model(model)
  last, cache = prefill(model, tokens, cache, valid, chunk_size=chunk_size, progress=progress,
                        compiler_options=compiler_options)
  out = decode(model, cache, last, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
               stop_tokens=stops, seed=seed, pad_id=pad_id, steps_per_call=steps_per_call, progress=progress,
               compiler_options=compiler_options)
  return out[0] if single else out
