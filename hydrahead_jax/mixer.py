"""The HydraHead mixer: FA and Gated DeltaNet heads inside one layer, one shared output projection.

Head order inside a layer: the ``n_fa`` FA groups come first (their ``n_fa * r`` query heads
contiguous), then the LA heads. Each path runs once on its slice; no Python loop over heads.

Shape letters: B batch, T length, D model, H query heads (Hf FA, Hl LA), G KV groups (Gf FA), K head dim, W conv width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hydrahead_jax.config import ModelConfig
from hydrahead_jax.layers import (
    RMSNorm,
    apply_rope,
    causal_depthwise_conv,
    fan_in_normal,
    l2_normalize,
    make_param,
    rms_normalize,
)
from hydrahead_jax.ops import gated_delta_rule
from hydrahead_jax.sharding import constrain, per_shard

HEADS_NAMES = ("batch", "length", "heads", "head_dim")
# Per-shard kernels (Pallas custom calls) split batch rows and heads only; the time axis stays whole (recurrence, conv).
SHARD_BTHK = ("batch", None, "heads", None)
SHARD_BTH = ("batch", None, "heads")
SHARD_BT = ("batch", None)
SHARD_B = ("batch", None, None, None)  # batch rows only (heads whole)
# Fusion in one Pallas kernel (pallas_kernels.fusion_norm): None = on GPU only; True / False force it on / off.
# Off by default: on an H100 it was not faster than XLA's own fusion of the same math (docs/kernels.md).
USE_FUSED_FUSION: bool | None = False
# Short conv + SiLU (+ q/k L2 norm) in one Pallas kernel (pallas_kernels.short_conv): None = on GPU only.
USE_CONV_KERNEL: bool | None = None


def _use(flag: bool | None) -> bool:
  return jax.default_backend() == "gpu" if flag is None else flag


def segment_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """[B, 1, T, T] boolean: query and key belong to the same document."""
  return (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]


def attention_implementation(requested: str | None, dtype) -> str:
  """cuDNN flash attention on GPU for half-precision inputs (jax's own default is the O(T^2) XLA path)."""
  if requested is not None:
    return requested
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if half and jax.default_backend() == "gpu" else "xla"


def project(x_BxTxD: jax.Array, weights: list[jax.Array], dtype) -> list[jax.Array]:
  """[x @ W for W in weights], each W [D, ...] -> [B, T, ...], one einsum per weight.

  Concatenating the weights into one GEMM was measured slower on an H100 (128K-token 7:1 layer fwd+bwd:
  matmul time 21 -> 32 ms, XLA picked transposed layouts for the sliced outputs), so each keeps its own.
  """
  return [jnp.einsum("btd,dn->btn", x_BxTxD, w.reshape(w.shape[0], -1).astype(dtype)).reshape(
      *x_BxTxD.shape[:2], *w.shape[1:]) for w in weights]


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


class FullAttention(nnx.Module):
  """Causal softmax GQA with QK RMSNorm (Qwen3) and RoPE, for the first ``num_groups`` groups."""

  def __init__(self, cfg: ModelConfig, num_groups: int, *, rngs: nnx.Rngs):
    D, K, r, pd = cfg.d_model, cfg.head_dim, cfg.heads_per_group, cfg.param_dtype
    self.cfg = cfg
    self.wq = make_param(rngs, fan_in_normal(D), (D, num_groups * r, K), ("embed", "heads", "head_dim"), pd)
    self.wk = make_param(rngs, fan_in_normal(D), (D, num_groups, K), ("embed", "kv_heads", "head_dim"), pd)
    self.wv = make_param(rngs, fan_in_normal(D), (D, num_groups, K), ("embed", "kv_heads", "head_dim"), pd)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(K, eps=cfg.rms_eps, names=("head_dim",), param_dtype=pd, rngs=rngs)
      self.k_norm = RMSNorm(K, eps=cfg.rms_eps, names=("head_dim",), param_dtype=pd, rngs=rngs)

  def projections(self) -> list[jax.Array]:
    """Input projection weights, in the order attend() takes their outputs."""
    return [self.wq[...], self.wk[...], self.wv[...]]

  def __call__(self, x_BxTxD, cos_sin, segment_ids_BxT):
    return self.attend(*project(x_BxTxD, self.projections(), self.cfg.dtype), cos_sin, segment_ids_BxT)

  def attend(self, q_BxTxHfxK, k_BxTxGfxK, v_BxTxGfxK, cos_sin, segment_ids_BxT):
    """Attention output [B, T, Hf, K] from the projected q, k, v."""
    K = self.cfg.head_dim
    if self.cfg.qk_norm:
      q_BxTxHfxK, k_BxTxGfxK = self.q_norm(q_BxTxHfxK), self.k_norm(k_BxTxGfxK)
    q_BxTxHfxK = apply_rope(q_BxTxHfxK, *cos_sin)
    k_BxTxGfxK = apply_rope(k_BxTxGfxK, *cos_sin)
    mask = None if segment_ids_BxT is None else segment_mask(segment_ids_BxT)
    impl = attention_implementation(self.cfg.fa_implementation, q_BxTxHfxK.dtype)
    attend = lambda q, k, v, m: (jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, mask=m, is_causal=True, scale=K**-0.5, implementation=impl),)
    if impl == "cudnn":
      # Per batch-row shard. jax's cuDNN attention partitioner failed on 2 H100s (jax 0.11.2: "'GSPMDSharding'
      # object has no attribute 'spec'", as in jax-ml/jax#21584); inside shard_map it is not consulted.
      attend = per_shard(attend, (SHARD_B,) * 4, (SHARD_B,))
    (o_BxTxHfxK,) = attend(q_BxTxHfxK, k_BxTxGfxK, v_BxTxGfxK, mask)
    return constrain(o_BxTxHfxK, HEADS_NAMES)


class GatedDeltaNet(nnx.Module):
  """``num_heads`` Gated DeltaNet heads; each owns its q/k/v projections (copyable from a teacher's slices)."""

  def __init__(self, cfg: ModelConfig, num_heads: int, *, rngs: nnx.Rngs):
    D, K, W, pd = cfg.d_model, cfg.head_dim, cfg.la_conv_size, cfg.param_dtype
    hk = ("embed", "heads", "head_dim")
    self.cfg = cfg
    self.wq = make_param(rngs, fan_in_normal(D), (D, num_heads, K), hk, pd)
    self.wk = make_param(rngs, fan_in_normal(D), (D, num_heads, K), hk, pd)
    self.wv = make_param(rngs, fan_in_normal(D), (D, num_heads, K), hk, pd)
    conv_names = ("conv", "heads", "head_dim")
    self.conv_q = make_param(rngs, _conv_identity_init, (W, num_heads, K), conv_names, pd)
    self.conv_k = make_param(rngs, _conv_identity_init, (W, num_heads, K), conv_names, pd)
    self.conv_v = make_param(rngs, _conv_identity_init, (W, num_heads, K), conv_names, pd)
    self.a_log = make_param(rngs, _a_log_init, (num_heads,), ("heads",), pd)
    self.dt_bias = make_param(rngs, _dt_bias_init, (num_heads,), ("heads",), pd)
    self.w_a = make_param(rngs, fan_in_normal(D), (D, num_heads), ("embed", "heads"), pd)
    self.w_b = make_param(rngs, fan_in_normal(D), (D, num_heads), ("embed", "heads"), pd)
    if cfg.la_output_gate:
      # gate = SiLU(W_z x + z_bias). The bias lets a converted head start with a constant gate
      # (W_z = 0, large z_bias: SiLU ~ identity-scaled constant, absorbed by the fusion scale).
      self.w_z = make_param(rngs, fan_in_normal(D), (D, num_heads, K), hk, pd)
      self.z_bias = make_param(rngs, nnx.initializers.zeros, (num_heads, K), ("heads", "head_dim"), pd)

  def _conv(self, x_BxTxHxK, w, segment_ids_BxT, normalize: bool):
    """SiLU(short causal conv) per channel, then (q, k) L2 norm per head; in x's dtype."""
    use_kernel = _use(USE_CONV_KERNEL)

    def conv(x_BxTxHxK, w_WxHxK, seg_BxT):
      B, T, H, K = x_BxTxHxK.shape
      x_BxTxC, w_WxC = x_BxTxHxK.reshape(B, T, H * K), w_WxHxK.reshape(-1, H * K)
      if use_kernel:
        from pallas_kernels.short_conv import short_conv
        return (short_conv(x_BxTxC, w_WxC, seg_BxT, head_dim=K if normalize else None).reshape(B, T, H, K),)
      y = jax.nn.silu(causal_depthwise_conv(x_BxTxC, w_WxC.astype(x_BxTxC.dtype), seg_BxT)).reshape(B, T, H, K)
      return (l2_normalize(y).astype(y.dtype) if normalize else y,)

    if use_kernel:  # a Pallas call: per (batch rows x heads) shard
      conv = per_shard(conv, (SHARD_BTHK, (None, "heads", None), SHARD_BT), (SHARD_BTHK,))
    return conv(x_BxTxHxK, w[...], segment_ids_BxT)[0]

  def projections(self) -> list[jax.Array]:
    """Input projection weights, in the order mix() takes their outputs (w_z last, when gated)."""
    ws = [self.wq[...], self.wk[...], self.wv[...], self.w_a[...], self.w_b[...]]
    return ws + [self.w_z[...]] if self.cfg.la_output_gate else ws

  def __call__(self, x_BxTxD, segment_ids_BxT):
    """Raw head outputs [B, T, Hl, K] (before fusion) and the output gate (or None)."""
    o_BxTxHxK, z_BxTxHxK = self.mix(*project(x_BxTxD, self.projections(), self.cfg.dtype),
                                    segment_ids_BxT=segment_ids_BxT)
    return o_BxTxHxK, None if z_BxTxHxK is None else self.gate(z_BxTxHxK)

  def gate(self, z_BxTxHxK):
    """The output gate SiLU(W_z x + z_bias) from the projection W_z x."""
    return jax.nn.silu(z_BxTxHxK + self.z_bias[...].astype(z_BxTxHxK.dtype))

  def mix(self, q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, a_BxTxH, b_BxTxH, z_BxTxHxK=None, *, segment_ids_BxT):
    """(raw head outputs [B, T, Hl, K], the gate's projection W_z x or None) from the projected inputs."""
    cfg, dt = self.cfg, self.cfg.dtype
    q_BxTxHxK = self._conv(q_BxTxHxK, self.conv_q, segment_ids_BxT, normalize=True)
    k_BxTxHxK = self._conv(k_BxTxHxK, self.conv_k, segment_ids_BxT, normalize=True)
    v_BxTxHxK = self._conv(v_BxTxHxK, self.conv_v, segment_ids_BxT, normalize=False)
    a_BxTxH, b_BxTxH = a_BxTxH.astype(jnp.float32), b_BxTxH.astype(jnp.float32)
    g_BxTxH = -jnp.exp(self.a_log[...].astype(jnp.float32)) * jax.nn.softplus(a_BxTxH + self.dt_bias[...])
    beta_BxTxH = jax.nn.sigmoid(b_BxTxH)
    gdn = per_shard(lambda q, k, v, g, beta, seg: gated_delta_rule(
        q, k, v, g, beta, segment_ids=seg, chunk_size=cfg.la_chunk_size, implementation=cfg.la_implementation)[:1],
                    (SHARD_BTHK,) * 3 + (SHARD_BTH,) * 2 + (SHARD_BT,), (SHARD_BTHK,))
    (o_BxTxHxK,) = gdn(q_BxTxHxK.astype(dt), k_BxTxHxK.astype(dt), v_BxTxHxK, g_BxTxH, beta_BxTxH, segment_ids_BxT)
    return constrain(o_BxTxHxK, HEADS_NAMES), z_BxTxHxK


class ScaleNormFusion(nnx.Module):
  """Scale-normalized fusion of FA and LA head outputs (before the shared output projection).

  scale_norm : LA heads gamma_h * RMSNorm(o_h) (gamma per head and channel), FA heads s_h * o_h.
  rmsnorm_all: every head gamma_h * RMSNorm(o_h).
  none       : raw outputs.
  The LA output gate SiLU(W_z x) multiplies after the normalisation.
  """

  def __init__(self, cfg: ModelConfig, num_fa_heads: int, num_la_heads: int, *, rngs: nnx.Rngs):
    K, pd = cfg.head_dim, cfg.param_dtype
    self.variant, self.eps = cfg.fusion, cfg.rms_eps
    ones = nnx.initializers.ones
    if self.variant == "scale_norm" and num_fa_heads:
      self.fa_scale = make_param(rngs, ones, (num_fa_heads,), ("heads",), pd)
    if self.variant == "rmsnorm_all" and num_fa_heads:
      self.fa_norm_scale = make_param(rngs, ones, (num_fa_heads, K), ("heads", "head_dim"), pd)
    if self.variant != "none" and num_la_heads:
      self.la_norm_scale = make_param(rngs, ones, (num_la_heads, K), ("heads", "head_dim"), pd)

  def fa(self, o_BxTxHxK):
    if self.variant == "scale_norm":
      return o_BxTxHxK * self.fa_scale[...].astype(o_BxTxHxK.dtype)[:, None]
    if self.variant == "rmsnorm_all":
      return (rms_normalize(o_BxTxHxK, self.eps) * self.fa_norm_scale[...]).astype(o_BxTxHxK.dtype)
    return o_BxTxHxK

  def fused(self, o_fa_BxTxHfxK, o_la_BxTxHlxK, z_BxTxHlxK, z_bias_HlxK):
    """fa() and la() of all heads in one Pallas kernel (same math, float32 inside; gate SiLU(z + z_bias))."""
    from pallas_kernels.fusion_norm import fused_head_fusion
    get = lambda name: getattr(self, name)[...] if hasattr(self, name) else None  # noqa: E731
    # Per shard of batch rows only: the output concatenates FA and LA heads, so a head split of each input would
    # not be a contiguous block of the output's heads.
    fn = per_shard(lambda o_fa, o_la, fs, fns, lns, z, zb: (fused_head_fusion(
        o_fa, o_la, self.variant, fs, fns, lns, z, zb, self.eps),), (SHARD_B, SHARD_B, None, None, None, SHARD_B, None),
                   (SHARD_B,))
    return fn(o_fa_BxTxHfxK, o_la_BxTxHlxK, get("fa_scale"), get("fa_norm_scale"), get("la_norm_scale"), z_BxTxHlxK,
              z_bias_HlxK)[0]

  def la(self, o_BxTxHxK, gate_BxTxHxK):
    out = o_BxTxHxK.astype(jnp.float32)
    if self.variant != "none":
      out = rms_normalize(out, self.eps) * self.la_norm_scale[...]
    if gate_BxTxHxK is not None:
      out = out * gate_BxTxHxK.astype(jnp.float32)
    return out.astype(o_BxTxHxK.dtype)


class HydraHeadMixer(nnx.Module):
  """One layer's attention: FA groups [0, n_fa) and LA heads for the rest, fused, then W_o."""

  def __init__(self, cfg: ModelConfig, num_fa_groups: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.num_fa_heads = num_fa_groups * cfg.heads_per_group
    self.num_la_heads = cfg.num_heads - self.num_fa_heads
    if self.num_fa_heads:
      self.fa = FullAttention(cfg, num_fa_groups, rngs=rngs)
    if self.num_la_heads:
      self.la = GatedDeltaNet(cfg, self.num_la_heads, rngs=rngs)
    self.fusion = ScaleNormFusion(cfg, self.num_fa_heads, self.num_la_heads, rngs=rngs)
    H, K, D = cfg.num_heads, cfg.head_dim, cfg.d_model
    self.wo = make_param(rngs, fan_in_normal(H * K), (H, K, D), ("heads", "head_dim", "embed"), cfg.param_dtype)

  def __call__(self, x_BxTxD, cos_sin, segment_ids_BxT, patch=None):
    """Returns (y [B, T, D], raw head outputs [B, T, H, K] before fusion).

    ``patch`` = (mask [H], values [B, T, H, K]) replaces raw head outputs where mask is 1
    (activation patching for head selection).
    """
    dt, Hf, Hl = self.cfg.dtype, self.num_fa_heads, self.num_la_heads
    weights = (self.fa.projections() if Hf else []) + (self.la.projections() if Hl else [])
    parts = project(x_BxTxD, weights, dt)
    o_fa = o_la = z = None
    if Hf:
      o_fa, parts = self.fa.attend(*parts[:3], cos_sin, segment_ids_BxT), parts[3:]
    if Hl:
      o_la, z = self.la.mix(*parts, segment_ids_BxT=segment_ids_BxT)
      o_la = o_la.astype(dt)
    raw_BxTxHxK = jnp.concatenate([o for o in (o_fa, o_la) if o is not None], axis=2)
    if patch is not None:
      mask_H, values_BxTxHxK = patch
      m = mask_H.astype(raw_BxTxHxK.dtype)[:, None]
      raw_BxTxHxK = raw_BxTxHxK * (1 - m) + values_BxTxHxK.astype(raw_BxTxHxK.dtype) * m
      o_fa = raw_BxTxHxK[:, :, :Hf] if Hf else None
      o_la = raw_BxTxHxK[:, :, Hf:] if Hl else None
    if _use(USE_FUSED_FUSION):
      fused = self.fusion.fused(o_fa, o_la, z, None if z is None else self.la.z_bias[...])
    else:
      fused_parts = [] if o_fa is None else [self.fusion.fa(o_fa)]
      if o_la is not None:
        fused_parts.append(self.fusion.la(o_la, None if z is None else self.la.gate(z)))
      fused = fused_parts[0] if len(fused_parts) == 1 else jnp.concatenate(fused_parts, axis=2)
    y_BxTxD = jnp.einsum("bthk,hkd->btd", fused.astype(self.cfg.dtype), self.wo[...].astype(self.cfg.dtype))
    return y_BxTxD, raw_BxTxHxK
