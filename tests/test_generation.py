"""Generation with the hybrid cache: cached logits == full forward for every layout, chunked prefill, greedy ==
cache-less greedy, left-padded batches == rows one by one, seeded sampling, stop tokens, cache sizes."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hydrahead_jax.config import HeadLayout, ModelConfig
from hydrahead_jax.generation import (cache_bytes, cache_nbytes, decode_step, filter_logits, generate, init_cache,
                                      left_pad, prefill, prompt_bucket)
from hydrahead_jax.nn.attention import FullAttention
from hydrahead_jax.nn.layers import apply_rope, rope_angles
from hydrahead_jax.nn.model import HydraHeadLM

L, G, V = 3, 2, 64
BASE = dict(vocab_size=V, d_model=16, num_layers=L, num_heads=4, num_kv_heads=G, head_dim=8, mlp_dim=32,
            dtype="float32", la_chunk_size=4, rope_theta=10_000.0)
LAYOUTS = {
    "all_fa": (HeadLayout.all_fa(L, G), {}),
    "all_la": (HeadLayout.all_la(L), {}),
    "layerwise_2to1": (HeadLayout.layerwise(L, G, every=3), {}),
    "head_level": (HeadLayout.per_layer(L, [1]), {}),
    "head_mixed_unscanned": (HeadLayout(((0,), (0, 1), ())), {"scan_layers": False}),
    "head_level_shared_kv_gates": (HeadLayout.per_layer(L, [1]), {"la_sharing": "kv_gates"}),
}
S = 24  # cache slots used by the tests (one decode shape per batch size)


def make(name, seed=0):
  layout, kw = LAYOUTS[name]
  return HydraHeadLM(ModelConfig(**{**BASE, **kw, "layout": layout}), rngs=nnx.Rngs(seed))


def full_logits(model, tokens):
  return np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens, jnp.int32)))


def uncached_greedy(model, prompt, n, length=S):
  """The old cache-less decoder: a full forward per new token over a fixed-length buffer."""
  fwd = nnx.jit(lambda m, t: m(t))
  buf = np.zeros((1, length), np.int32)
  buf[0, :len(prompt)] = prompt
  out = []
  for i in range(len(prompt), len(prompt) + n):
    tok = int(np.argmax(np.asarray(fwd(model, jnp.asarray(buf)))[0, i - 1]))
    out.append(tok)
    buf[0, i] = tok
  return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_cached_logits_match_full_forward(name, rng):
  """Chunked prefill (any chunking) and one-token decode steps give the full forward's logits at every position,
  and (for two layouts: the loop around prefill and decode is layout-blind) greedy generation equals the cache-less
  greedy decoder."""
  t0 = time.time()
  model = make(name)
  tokens = rng.integers(0, V, (2, 16)).astype(np.int32)
  ref = full_logits(model, tokens)

  logits_4, cache_4 = prefill(model, tokens[:, :12], init_cache(model, 2, S), chunk_size=4, all_logits=True)
  np.testing.assert_allclose(np.asarray(logits_4), ref[:, :12], atol=2e-5, rtol=1e-4)
  logits_12, cache_12 = prefill(model, tokens[:, :12], init_cache(model, 2, S), chunk_size=12, all_logits=True)
  np.testing.assert_allclose(np.asarray(logits_12), np.asarray(logits_4), atol=2e-5, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(cache_4), jax.tree.leaves(cache_12)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)

  cache = cache_4
  for i in range(12, 16):
    step_logits, cache = decode_step(model, cache, tokens[:, i])
    np.testing.assert_allclose(np.asarray(step_logits), ref[:, i], atol=2e-5, rtol=1e-4, err_msg=f"position {i}")
  assert int(cache.length) == 16 and cache.pos.tolist() == [16, 16]

  if name in ("all_la", "head_mixed_unscanned"):  # B = 1 programs cost 3 more compiles per layout
    prompt = tokens[0, :5].tolist()
    assert generate(model, prompt, 8, bucket=S) == uncached_greedy(model, prompt, 8)
  print(f"{name}: {time.time() - t0:.1f}s")


def test_batched_left_padded_equals_one_by_one(rng):
  """Prompts of different lengths in one left-padded batch (chunk boundaries inside the padding) give each row's
  own logits at every prefill and decode step, and the same greedy tokens."""
  model = make("head_mixed_unscanned")
  prompts = [rng.integers(0, V, n).tolist() for n in (3, 7, 12)]
  forced = rng.integers(0, V, (3, 3)).astype(np.int32)

  def run(rows):
    P = prompt_bucket(max(map(len, rows)), 4)
    tokens, valid = left_pad(rows, pad_id=5, length=P)
    last, cache = prefill(model, tokens, init_cache(model, len(rows), S), valid, chunk_size=4)
    out = [np.asarray(last)]
    for j in range(forced.shape[1]):
      logits, cache = decode_step(model, cache, forced[[i for i in range(3) if prompts[i] in rows], j])
      out.append(np.asarray(logits))
    return np.stack(out, 1)

  batched = run(prompts)
  right_padded = np.asarray([p + [5] * (12 - len(p)) for p in prompts], np.int32)
  ref = full_logits(model, right_padded)  # causal: right padding never reaches a row's last prompt token
  for i, p in enumerate(prompts):
    np.testing.assert_allclose(batched[i], run([p])[0], atol=2e-5, rtol=1e-4, err_msg=f"row {i}")
    np.testing.assert_allclose(batched[i, 0], ref[i, len(p) - 1], atol=2e-5, rtol=1e-4)
  together = generate(model, prompts, 6, chunk_size=4, bucket=S)
  assert together == [generate(model, p, 6, chunk_size=4, bucket=S) for p in prompts]


def test_sampling_seeded_and_stop_tokens():
  model = make("head_level")
  prompts = [[1, 2, 3, 4], [9, 8, 7]]
  kw = dict(temperature=1.0, top_k=20, top_p=0.95, bucket=8)
  a = generate(model, prompts, 8, seed=3, **kw)
  assert a == generate(model, prompts, 8, seed=3, **kw)
  assert a != generate(model, prompts, 8, seed=4, **kw)
  assert all(0 <= t < V for row in a for t in row)
  greedy = generate(model, prompts, 8, bucket=8)
  assert generate(model, prompts, 8, bucket=8, steps_per_call=3) == greedy  # 3 decode steps per jitted call
  assert generate(model, prompts, 8, seed=5, temperature=1.0, top_k=1, bucket=8) == greedy
  stop = greedy[0][2]
  out = generate(model, prompts, 8, stop_tokens=[stop], bucket=8)
  first = greedy[0].index(stop)
  assert out[0] == greedy[0][:first + 1]
  row1_end = greedy[1].index(stop) + 1 if stop in greedy[1] else 8
  assert out[1] == greedy[1][:row1_end]


def test_attend_cached_against_dense_reference(rng):
  """FA over a cache, block by block (8-slot blocks; the third, [16, 24), clamped to the cache end [15, 23)), with
  left padding in the cache, equals a dense softmax over [the row's real cache slots, causal new tokens]."""
  cfg = ModelConfig(**{**BASE, "num_layers": 1, "layout": HeadLayout(((0, 1),))})
  fa = FullAttention(cfg, 2, rngs=nnx.Rngs(1))
  B, T, S, length, K = 2, 3, 23, 20, cfg.head_dim
  start = np.asarray([0, 5])  # row 1: slots 0..4 are padding
  valid = np.ones((B, T), bool)
  q, k, v = (rng.normal(size=(B, T, n, K)).astype(np.float32) for n in (4, 2, 2))
  cache_k, cache_v = (rng.normal(size=(B, S, 2, K)).astype(np.float32) for _ in range(2))
  pos = length - start[:, None] + np.arange(T)
  cos_sin = rope_angles(jnp.asarray(pos), K, cfg.rope_theta)
  o, k_rows, v_rows = fa.attend_cached(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), cos_sin=cos_sin,
                                       cache_k=jnp.asarray(cache_k), cache_v=jnp.asarray(cache_v),
                                       length=jnp.int32(length), start_B=jnp.asarray(start, jnp.int32),
                                       valid_BxT=jnp.asarray(valid))
  qr = np.asarray(apply_rope(fa.q_norm(jnp.asarray(q)), *cos_sin))
  for b in range(B):
    keys = np.concatenate([cache_k[b, start[b]:length], np.asarray(k_rows)[b]])
    vals = np.concatenate([cache_v[b, start[b]:length], np.asarray(v_rows)[b]])
    n_old = length - start[b]
    for t in range(T):
      for h in range(4):
        s_ = keys[:n_old + t + 1, h // 2] @ qr[b, t, h] / np.sqrt(K)
        w = np.exp(s_ - s_.max())
        np.testing.assert_allclose(np.asarray(o)[b, t, h], (w / w.sum()) @ vals[:n_old + t + 1, h // 2],
                                   atol=1e-5, rtol=1e-4)


def test_filter_logits():
  logits = jnp.log(jnp.asarray([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]))
  kept = lambda k, p: np.isfinite(np.asarray(filter_logits(logits, jnp.int32(k), jnp.float32(p))))  # noqa: E731
  assert kept(2, 1.0).tolist() == [[False, False, True, True], [True, True, False, False]]
  assert kept(0, 0.5).tolist() == [[False, False, True, True], [True, True, False, False]]  # 0.4 < 0.5 -> + 0.3
  assert kept(0, 0.4).tolist() == [[False, False, False, True], [True, False, False, False]]
  assert kept(0, 1.0).all() and kept(1, 1.0).sum() == 2


def test_cache_sizes_and_errors():
  model = make("head_mixed_unscanned")
  cfg = model.cfg
  for slots in (8, 40):
    cache = init_cache(model, 3, slots)
    b = cache_bytes(cfg, slots, batch_size=3)
    assert cache_nbytes(cache) == b["total"] + 4 * (1 + 3)  # + length and pos
  # per token: 3 FA groups in all x K and V x head_dim 8 x 4 bytes; LA: 6 LA heads x (8x8 f32 state + 3 tails x 3 x 8)
  assert cache_bytes(cfg, 1) == {"per_token": 3 * 2 * 8 * 4, "fixed": 6 * (64 * 4 + 3 * 3 * 8 * 4),
                                 "total": 3 * 2 * 8 * 4 + 6 * (64 * 4 + 3 * 3 * 8 * 4)}
  shared = make("head_level_shared_kv_gates")  # k/v conv tails and the state per KV group (2 LA heads share them)
  assert cache_nbytes(init_cache(shared, 1, 8)) == cache_bytes(shared.cfg, 8)["total"] + 4 * 2
  assert init_cache(shared, 1, 8).layers[0].state.shape == (L, 1, 1, 8, 8)  # [layers, B, one state, K, K]
  assert cache_bytes(shared.cfg, 1)["fixed"] == L * (1 * 64 * 4 + (2 + 2 * 1) * 3 * 8 * 4)  # 2 LA heads, 1 k/v head
  with pytest.raises(ValueError, match="at least one token"):
    generate(model, [[1, 2], []], 4)
  with pytest.raises(ValueError, match="do not fit"):
    prefill(model, np.zeros((1, 16), np.int32), init_cache(model, 1, 8))
  assert generate(model, [1, 2, 3], 0) == []
