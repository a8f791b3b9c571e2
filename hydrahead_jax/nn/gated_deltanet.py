"""Gated DeltaNet heads: per-head q/k/v projections, short causal convs, decay and write gates, output gate.

Shape letters: B batch, T length, D model, H (here: the layer's LA) heads, K head dim, W conv width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from hydrahead_jax.config import ModelConfig
from hydrahead_jax.nn.layers import (HEADS_NAMES, causal_depthwise_conv, fan_in_normal, l2_normalize, make_param,
                                     project)
from hydrahead_jax.ops import gated_delta_rule
from hydrahead_jax.parallel.context import context_conv, context_gated_delta_rule, context_size
from hydrahead_jax.sharding import constrain, per_shard

# Per-shard kernels (Pallas custom calls) split batch rows and heads only; the time axis stays whole (recurrence, conv).
SHARD_BTHK = ("batch", None, "heads", None)
SHARD_BTH = ("batch", None, "heads")
SHARD_BT = ("batch", None)
SHARD_BHKV = ("batch", "heads", None, None)  # delta-rule state


def use_conv_kernel(cfg: ModelConfig) -> bool:
  """``cfg.conv_implementation``: 'pallas' or 'xla'; None = the Pallas kernel on GPU (measured faster there)."""
  impl = cfg.conv_implementation
  return jax.default_backend() == "gpu" if impl is None else impl == "pallas"


def _inv_softplus(x: jax.Array) -> jax.Array:
  return x + jnp.log(-jnp.expm1(-x))


def _a_log_init(key, shape, dtype):
  """Per-head decay rates A in [1, 16] (log-uniform), stored as log(A)."""
  return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


def _dt_bias_init(key, shape, dtype):
  """softplus(dt_bias) log-uniform in [1e-3, 1e-1]: long memory at init."""
  dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, math.log(1e-3), math.log(1e-1)))
  return _inv_softplus(dt).astype(dtype)


def _conv_identity_init(key, shape, dtype):
  """Near-identity causal conv: last tap (current token) 1, earlier taps small."""
  w = 0.02 * jax.random.normal(key, shape, jnp.float32)
  return w.at[-1].add(1.0).astype(dtype)


class GatedDeltaNet(nnx.Module):
  """``num_heads`` Gated DeltaNet heads. q projections are per head; k/v projections (and their convs) per head or,
  with ``cfg.la_sharing``, per KV group (Hkv = num_heads / heads_per_group), as are the decay/write gates with
  'kv_gates'. Shared tensors are repeated to the heads right before the delta rule."""

  def __init__(self, cfg: ModelConfig, num_heads: int, *, rngs: nnx.Rngs):
    D, K, W, pd = cfg.d_model, cfg.head_dim, cfg.la_conv_size, cfg.param_dtype
    hk = ("embed", "heads", "head_dim")
    self.cfg = cfg
    self.kv_repeat = 1 if cfg.la_sharing == "none" else cfg.heads_per_group
    self.gate_repeat = self.kv_repeat if cfg.la_sharing == "kv_gates" else 1
    kv_heads, gate_heads = num_heads // self.kv_repeat, num_heads // self.gate_repeat
    self.wq = make_param(rngs, fan_in_normal(D), (D, num_heads, K), hk, pd)
    self.wk = make_param(rngs, fan_in_normal(D), (D, kv_heads, K), hk, pd)
    self.wv = make_param(rngs, fan_in_normal(D), (D, kv_heads, K), hk, pd)
    conv_names = ("conv", "heads", "head_dim")
    self.conv_q = make_param(rngs, _conv_identity_init, (W, num_heads, K), conv_names, pd)
    self.conv_k = make_param(rngs, _conv_identity_init, (W, kv_heads, K), conv_names, pd)
    self.conv_v = make_param(rngs, _conv_identity_init, (W, kv_heads, K), conv_names, pd)
    self.a_log = make_param(rngs, _a_log_init, (gate_heads,), ("heads",), pd)
    self.dt_bias = make_param(rngs, _dt_bias_init, (gate_heads,), ("heads",), pd)
    self.w_a = make_param(rngs, fan_in_normal(D), (D, gate_heads), ("embed", "heads"), pd)
    self.w_b = make_param(rngs, fan_in_normal(D), (D, gate_heads), ("embed", "heads"), pd)
    if cfg.la_output_gate:
      # gate = SiLU(W_z x + z_bias). The bias lets a converted head start with a constant gate
      # (W_z = 0, large z_bias: SiLU ~ identity-scaled constant, absorbed by the fusion scale).
      self.w_z = make_param(rngs, fan_in_normal(D), (D, num_heads, K), hk, pd)
      self.z_bias = make_param(rngs, nnx.initializers.zeros, (num_heads, K), ("heads", "head_dim"), pd)
    else:
      self.w_z = self.z_bias = None

  @staticmethod
  def _to_heads(x_BxTxH, repeat: int):
    """Shared per-group tensors [B, T, Hkv, ...] -> per head [B, T, Hkv * repeat, ...] (group-major heads)."""
    return x_BxTxH if repeat == 1 else jnp.repeat(x_BxTxH, repeat, axis=2)

  def _gates(self, a, b):
    """(log decay g, write strength beta) [B, T, H] float32 from the projections W_a x, W_b x."""
    a_BxTxH, b_BxTxH = a.astype(jnp.float32), b.astype(jnp.float32)
    g_BxTxH = -jnp.exp(self.a_log[...].astype(jnp.float32)) * jax.nn.softplus(a_BxTxH + self.dt_bias[...])
    return self._to_heads(g_BxTxH, self.gate_repeat), self._to_heads(jax.nn.sigmoid(b_BxTxH), self.gate_repeat)

  def _conv(self, x_BxTxHxK, w, segment_ids_BxT, normalize: bool):
    """SiLU(short causal conv) per channel, then (q, k) L2 norm per head; in x's dtype."""
    use_kernel = use_conv_kernel(self.cfg)

    def conv(x_BxTxHxK, w_WxHxK, seg_BxT):
      B, T, H, K = x_BxTxHxK.shape
      x_BxTxC, w_WxC = x_BxTxHxK.reshape(B, T, H * K), w_WxHxK.reshape(-1, H * K)
      if use_kernel:
        from pallas_kernels.short_conv import short_conv
        return (short_conv(x_BxTxC, w_WxC, seg_BxT, head_dim=K if normalize else None).reshape(B, T, H, K),)
      y = jax.nn.silu(causal_depthwise_conv(x_BxTxC, w_WxC.astype(x_BxTxC.dtype), seg_BxT)).reshape(B, T, H, K)
      return (l2_normalize(y).astype(y.dtype) if normalize else y,)

    if context_size() > 1:  # time split over the 'context' mesh axis: a halo from the previous shard
      return context_conv(conv, x_BxTxHxK, w[...], segment_ids_BxT)
    if use_kernel:  # a Pallas call: per (batch rows x heads) shard
      conv = per_shard(conv, (SHARD_BTHK, (None, "heads", None), SHARD_BT), (SHARD_BTHK,))
    return conv(x_BxTxHxK, w[...], segment_ids_BxT)[0]

  def projections(self) -> dict[str, jax.Array]:
    """Input projection weights by the name of mix()'s argument (z only with the output gate)."""
    ws = {"q": self.wq[...], "k": self.wk[...], "v": self.wv[...], "a": self.w_a[...], "b": self.w_b[...]}
    return ws if self.w_z is None else {**ws, "z": self.w_z[...]}

  def __call__(self, x_BxTxD, segment_ids_BxT):
    """Raw head outputs [B, T, Hl, K] (before fusion) and the output gate (or None)."""
    o_BxTxHxK, z_BxTxHxK = self.mix(**project(x_BxTxD, self.projections(), self.cfg.dtype),
                                    segment_ids_BxT=segment_ids_BxT)
    return o_BxTxHxK, None if z_BxTxHxK is None else self.gate(z_BxTxHxK)

  def gate(self, z_BxTxHxK):
    """The output gate SiLU(W_z x + z_bias) from the projection W_z x."""
    return jax.nn.silu(z_BxTxHxK + self.z_bias[...].astype(z_BxTxHxK.dtype))

  def mix(self, q, k, v, a, b, z=None, *, segment_ids_BxT):
    """(raw head outputs [B, T, H, K], the gate's projection W_z x or None) from the projected inputs
    q, k, v, z [B, T, H, K] and a, b [B, T, H]."""
    cfg, dt = self.cfg, self.cfg.dtype
    q, k, v, a, b = (checkpoint_name(x, "mixer_proj") for x in (q, k, v, a, b))  # remat 'save_proj' (nn/model.py)
    z = None if z is None else checkpoint_name(z, "mixer_proj")
    q_BxTxHxK = self._conv(q, self.conv_q, segment_ids_BxT, normalize=True)
    k_BxTxHxK = self._to_heads(self._conv(k, self.conv_k, segment_ids_BxT, normalize=True), self.kv_repeat)
    v_BxTxHxK = self._to_heads(self._conv(v, self.conv_v, segment_ids_BxT, normalize=False), self.kv_repeat)
    g_BxTxH, beta_BxTxH = self._gates(a, b)
    gdn = per_shard(lambda q, k, v, g, beta, seg: gated_delta_rule(
        q, k, v, g, beta, segment_ids=seg, chunk_size=cfg.la_chunk_size, implementation=cfg.la_implementation)[:1],
                    (SHARD_BTHK,) * 3 + (SHARD_BTH,) * 2 + (SHARD_BT,), (SHARD_BTHK,))
    if context_size() > 1:  # the recurrence across shards of the 'context' mesh axis (parallel/context.py)
      gdn = lambda *args: (context_gated_delta_rule(  # noqa: E731
          *args, chunk_size=cfg.la_chunk_size, implementation=cfg.la_implementation),)
    (o_BxTxHxK,) = gdn(q_BxTxHxK.astype(dt), k_BxTxHxK.astype(dt), v_BxTxHxK, g_BxTxH, beta_BxTxH, segment_ids_BxT)
    return constrain(o_BxTxHxK, HEADS_NAMES), z

  def _conv_cached(self, x_BxTxHxK, tail_BxWxHxK, w, normalize: bool):
    """_conv continuing after ``tail`` (the previous W-1 pre-conv inputs): (output [B, T, H, K], new tail)."""
    B, T, H, K = x_BxTxHxK.shape
    W1 = tail_BxWxHxK.shape[1]
    full_BxSxHxK = jnp.concatenate([tail_BxWxHxK.astype(x_BxTxHxK.dtype), x_BxTxHxK], axis=1)
    w_WxC = w[...].reshape(-1, H * K).astype(x_BxTxHxK.dtype)
    y_BxSxC = jax.nn.silu(causal_depthwise_conv(full_BxSxHxK.reshape(B, W1 + T, H * K), w_WxC, None))
    y_BxTxHxK = y_BxSxC[:, W1:].reshape(B, T, H, K)
    y_BxTxHxK = l2_normalize(y_BxTxHxK).astype(y_BxTxHxK.dtype) if normalize else y_BxTxHxK
    return y_BxTxHxK, full_BxSxHxK[:, T:].astype(tail_BxWxHxK.dtype)

  def mix_cached(self, q, k, v, a, b, z=None, *, state, conv_tails, valid_BxT):
    """mix() continuing from a cache (chunked prefill; T = 1 is a one-token recurrent update).

    state [B, Hs, K, K] float32 is the delta-rule state before the first new token (Hs = H, or one state per KV
    group with 'kv_gates': its heads' states are equal, so the cache keeps one); conv_tails = (q, k, v) tails
    [B, W-1, H (q) or Hkv (k, v), K], the last W-1 pre-conv inputs. Tokens where ``valid_BxT`` is False (left padding) are no-ops:
    zero conv inputs, g = 0, beta = 0. Returns (raw head outputs [B, T, H, K], W_z x or None, new state,
    new conv_tails).
    """
    cfg, dt = self.cfg, self.cfg.dtype
    keep_BxTx1x1 = valid_BxT[:, :, None, None].astype(q.dtype)
    convs = [self._conv_cached(x * keep_BxTx1x1, tail, w, normalize=n) for x, tail, w, n in zip(
        (q, k, v), conv_tails, (self.conv_q, self.conv_k, self.conv_v), (True, True, False))]
    (q_BxTxHxK, tq), (k_BxTxHxK, tk), (v_BxTxHxK, tv) = convs
    k_BxTxHxK, v_BxTxHxK = self._to_heads(k_BxTxHxK, self.kv_repeat), self._to_heads(v_BxTxHxK, self.kv_repeat)
    g_BxTxH, beta_BxTxH = self._gates(a, b)
    g_BxTxH = jnp.where(valid_BxT[:, :, None], g_BxTxH, 0.0)
    beta_BxTxH = jnp.where(valid_BxT[:, :, None], beta_BxTxH, 0.0)
    impl = "recurrent" if q.shape[1] == 1 else cfg.la_implementation
    gdn = per_shard(lambda q, k, v, g, beta, s: gated_delta_rule(
        q, k, v, g, beta, initial_state=s, output_final_state=True, chunk_size=cfg.la_chunk_size,
        implementation=impl), (SHARD_BTHK,) * 3 + (SHARD_BTH,) * 2 + (SHARD_BHKV,), (SHARD_BTHK, SHARD_BHKV))
    r = self.gate_repeat  # > 1 only with 'kv_gates': the states of a group's heads are one state
    state_BxHxKxK = state if r == 1 else jnp.repeat(state, r, axis=1)
    o_BxTxHxK, state_BxHxKxK = gdn(q_BxTxHxK.astype(dt), k_BxTxHxK.astype(dt), v_BxTxHxK, g_BxTxH, beta_BxTxH,
                                   state_BxHxKxK)
    return constrain(o_BxTxHxK, HEADS_NAMES), z, state_BxHxKxK[:, ::r], (tq, tk, tv)
