"""The HydraHead language model: a Qwen3/Llama-style decoder whose attention is the HydraHead mixer.

Consecutive layers with the same number of FA groups form a *segment*. With ``scan_layers`` a segment's
layers are stacked (leading ``layers`` axis) and run with ``nnx.scan``, so compile time depends on the
number of distinct segments, not on depth; otherwise every layer is its own segment.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from hydrahead_jax.config import ModelConfig
from hydrahead_jax.nn.layers import Embedding, RMSNorm, SwiGLU, fan_in_normal, make_param, rope_angles
from hydrahead_jax.nn.mixer import HydraHeadMixer
from hydrahead_jax.sharding import axis_rules, constrain, param_shardings

ACT_NAMES = ("batch", "length", "embed")
INTERMEDIATES = ("mixer_in", "mixer_out", "heads")


@dataclasses.dataclass(frozen=True)
class Segment:
  start: int  # first layer index
  length: int  # number of layers
  num_fa_groups: int
  stacked: bool


def plan_segments(cfg: ModelConfig) -> tuple[Segment, ...]:
  """Groups consecutive layers of equal FA-group count (when scanning)."""
  segs: list[Segment] = []
  for i in range(cfg.num_layers):
    n = cfg.num_fa_groups(i)
    if cfg.scan_layers and segs and segs[-1].num_fa_groups == n:
      last = segs[-1]
      segs[-1] = Segment(last.start, last.length + 1, n, True)
    else:
      segs.append(Segment(i, 1, n, cfg.scan_layers))
  return tuple(segs)


def positions_from_segments(segment_ids_BxT: jax.Array) -> jax.Array:
  """Positions restarting at 0 at every change of segment id."""
  T = segment_ids_BxT.shape[1]
  idx = jnp.arange(T, dtype=jnp.int32)[None, :]
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids_BxT[:, :1], bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1
  )
  last_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - last_start


class Block(nnx.Module):
  """Pre-norm decoder block: x + mixer(norm(x)); x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, num_fa_groups: int, *, rngs: nnx.Rngs):
    pd = cfg.param_dtype
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.rms_eps, names=("norm",), param_dtype=pd, rngs=rngs)
    self.mixer = HydraHeadMixer(cfg, num_fa_groups, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.rms_eps, names=("norm",), param_dtype=pd, rngs=rngs)
    self.mlp = SwiGLU(cfg.d_model, cfg.mlp_dim, dtype=cfg.dtype, param_dtype=pd, rngs=rngs)

  def __call__(self, x_BxTxD, cos_sin, segment_ids_BxT, patch=None):
    x_BxTxD = checkpoint_name(x_BxTxD, "block_in")  # the residual stream entering the layer (remat 'offload')
    h_BxTxD = self.attn_norm(x_BxTxD)
    y_BxTxD, heads_BxTxHxK = self.mixer(h_BxTxD, cos_sin, segment_ids_BxT, patch)
    x_BxTxD = constrain(x_BxTxD + y_BxTxD, ACT_NAMES)
    x_BxTxD = constrain(x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD)), ACT_NAMES)
    return x_BxTxD, {"mixer_in": h_BxTxD, "mixer_out": y_BxTxD, "heads": heads_BxTxHxK}

  def cached(self, x_BxTxD, cos_sin, cache, length, start_B, valid_BxT):
    """__call__ for new tokens continuing from this layer's cache (``HydraHeadMixer.cached``): (x, new cache)."""
    y_BxTxD, cache = self.mixer.cached(self.attn_norm(x_BxTxD), cos_sin, cache, length, start_B, valid_BxT)
    x_BxTxD = constrain(x_BxTxD + y_BxTxD, ACT_NAMES)
    x_BxTxD = constrain(x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD)), ACT_NAMES)
    return x_BxTxD, cache


def _make_stack(cfg: ModelConfig, seg: Segment, rngs: nnx.Rngs) -> Block:
  if not seg.stacked:
    return Block(cfg, seg.num_fa_groups, rngs=rngs)

  @nnx.split_rngs(splits=seg.length)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(r):
    return Block(cfg, seg.num_fa_groups, rngs=r)

  return create(rngs)


# Remat (ModelConfig.remat) is applied per layer. Names are ``checkpoint_name`` tags: 'block_in' (the layer's
# input, model.py), 'mixer_proj' (the mixer's input projections q/k/v and the GDN a/b/z, attention.py and
# gated_deltanet.py). Kernel residuals (cuDNN attention statistics, the GDN chunk states) carry no name, so a
# policy that keeps a kernel's output but not its residuals still re-runs the kernel's forward: none does.
_REMAT_POLICIES = {
    "full": None,  # save nothing but the layer input: one extra forward, least memory on the device
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # every matmul output (MLP too): most memory
    # the mixer's input projections only: the backward skips those matmuls, recomputes the MLP, norms and kernels
    "save_proj": jax.checkpoint_policies.save_only_these_names("mixer_proj"),
    # as 'full', with each layer's input (the [B, T, D] residual stream saved for the backward, L of them)
    # moved to pinned host memory after the forward and brought back for the layer's backward
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["block_in"], offload_src="device",
        offload_dst="pinned_host"),
}


class HydraHeadLM(nnx.Module):
  """Decoder LM. ``model(tokens [B, T]) -> logits [B, T, V]`` (float32)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.segments_plan = plan_segments(cfg)
    pd = cfg.param_dtype
    self.embed = Embedding(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=pd, rngs=rngs)
    self.segments = nnx.List([_make_stack(cfg, s, rngs) for s in self.segments_plan])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.rms_eps, names=("norm",), param_dtype=pd, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = make_param(rngs, fan_in_normal(cfg.d_model), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pd)

  # -- per-segment execution ---------------------------------------------------
  def _block_fn(self):
    def run(block, x, cos_sin, seg_ids, patch):
      return block(x, cos_sin, seg_ids, patch)

    if self.cfg.remat != "none":
      run = nnx.remat(run, policy=_REMAT_POLICIES[self.cfg.remat])
    return run

  def _run_segment(self, seg: Segment, stack, x, cos_sin, seg_ids, patch, keep):
    run = self._block_fn()
    if not seg.stacked:
      p = None if patch is None else (patch[0][seg.start], patch[1][seg.start])
      x, inter = run(stack, x, cos_sin, seg_ids, p)
      return x, {k: inter[k][None] for k in keep}
    sl = slice(seg.start, seg.start + seg.length)
    p = None if patch is None else (patch[0][sl], patch[1][sl])

    @nnx.scan(in_axes=(0, nnx.Carry, None, None, 0 if patch is not None else None), out_axes=(nnx.Carry, 0))
    def scan_fn(block, carry, cs, ids, layer_patch):
      y, inter = run(block, carry, cs, ids, layer_patch)
      return y, {k: inter[k] for k in keep}

    return scan_fn(stack, x, cos_sin, seg_ids, p)

  def __call__(self, tokens_BxT: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, *, head_patch: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Logits [B, T, V] float32.

    segment_ids [B, T]: packed documents (attention and LA state never cross a change of id);
    positions [B, T]: RoPE positions (default: restart per segment, else 0..T-1).
    head_patch: (mask [L, H], values [L, B, T, H, K]) replaces raw head outputs (activation patching).
    """
    return self._forward(tokens_BxT, segment_ids, positions, head_patch, ())[0]

  def hidden(self, tokens_BxT: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
             *, head_patch: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Final hidden states [B, T, D] (after ``final_norm``, in ``cfg.dtype``), without the vocabulary projection.

    ``logits = hidden @ W`` with ``W, layout = output_projection()``; ``hydrahead_jax.losses`` computes the loss
    from these chunk by chunk, never holding [B, T, V] logits. Arguments as ``__call__``.
    """
    return self._trunk(tokens_BxT, segment_ids, positions, head_patch, ())[0]

  def output_projection(self) -> tuple[jax.Array, str]:
    """The vocabulary projection as (weight, layout): the tied embedding [V, D] with layout 'vd'
    (logits = x W^T), else ``lm_head`` [D, V] with 'dv' (logits = x W). The raw parameter value (param dtype),
    so gradients reach it."""
    if self.cfg.tie_embeddings:
      return self.embed.embedding[...], "vd"
    return self.lm_head[...], "dv"

  def intermediates(self, tokens_BxT: jax.Array, names: tuple[str, ...] = INTERMEDIATES,
                    segment_ids: jax.Array | None = None, positions: jax.Array | None = None, *,
                    head_patch: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(logits, {name: [L, ...]}) for names among ``INTERMEDIATES``: each layer's mixer input
    ('mixer_in' [L, B, T, D], the normed residual), mixer output ('mixer_out' [L, B, T, D]) and raw head
    outputs before fusion ('heads' [L, B, T, H, K]). Arguments as ``__call__``."""
    unknown = sorted(set(names) - set(INTERMEDIATES))
    if unknown or not names:
      raise ValueError(f"HydraHeadLM.intermediates: names {list(names)}; choose one or more of {INTERMEDIATES}")
    return self._forward(tokens_BxT, segment_ids, positions, head_patch, tuple(names))

  def _forward(self, tokens_BxT, segment_ids, positions, head_patch, keep):
    cfg = self.cfg
    x, inter = self._trunk(tokens_BxT, segment_ids, positions, head_patch, keep)
    if cfg.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = jnp.einsum("btd,dv->btv", x, self.lm_head[...].astype(cfg.dtype)).astype(jnp.float32)
    logits = constrain(logits, ("batch", "length", "vocab"))
    return logits, inter

  def _trunk(self, tokens_BxT, segment_ids, positions, head_patch, keep):
    """(final-normed hidden states [B, T, D], {name: [L, ...]} intermediates)."""
    cfg = self.cfg
    if tokens_BxT.ndim != 2:
      raise ValueError(f"HydraHeadLM: tokens must be [B, T] int, got shape {tokens_BxT.shape}")
    if positions is None:
      if segment_ids is None:
        positions = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1], dtype=jnp.int32), tokens_BxT.shape)
      else:
        positions = positions_from_segments(segment_ids)
    cos_sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
    x = constrain(self.embed(tokens_BxT), ACT_NAMES)
    collected = []
    for seg, stack in zip(self.segments_plan, self.segments):
      x, inter = self._run_segment(seg, stack, x, cos_sin, segment_ids, head_patch, keep)
      collected.append(inter)
    x = constrain(self.final_norm(x), ACT_NAMES)
    return x, {k: jnp.concatenate([c[k] for c in collected], axis=0) for k in keep}

  def extend(self, tokens_BxT: jax.Array, cache, valid_BxT: jax.Array | None = None, *,
             last_only: bool = False, unroll: bool = False) -> tuple[jax.Array, object]:
    """Runs T new tokens on top of a ``generation.HybridCache``: (logits [B, T, V] float32, new cache).

    Chunked prefill and decoding (T = 1) are this call. ``valid_BxT`` (default all True) is False on left
    padding, which must come before any real token of its row; RoPE positions continue per row from
    ``cache.pos``. ``last_only``: logits of the last column only ([B, 1, V]; with left padding, every row's
    last token). ``unroll``: unroll the scan over a segment's layers (one straight-line decode step).
    The FA rows of the new tokens are written into the cache once, after each segment, in place when the
    caller donates the cache.
    """
    cfg = self.cfg
    if valid_BxT is None:
      valid_BxT = jnp.ones(tokens_BxT.shape, bool)
    valid_i = valid_BxT.astype(jnp.int32)
    positions_BxT = cache.pos[:, None] + jnp.cumsum(valid_i, axis=1) - valid_i
    pos_B = cache.pos + valid_i.sum(axis=1)
    length = cache.length
    start_B = length + tokens_BxT.shape[1] - pos_B  # first real slot of each row (left padding before it)
    cos_sin = rope_angles(positions_BxT, cfg.head_dim, cfg.rope_theta)
    x = constrain(self.embed(tokens_BxT), ACT_NAMES)
    layers = []
    for seg, stack, layer_cache in zip(self.segments_plan, self.segments, cache.layers):
      if not seg.stacked:
        x, update = stack.cached(x, cos_sin, layer_cache, length, start_B, valid_BxT)
      else:
        @nnx.scan(in_axes=(0, nnx.Carry, 0, None, None, None, None), out_axes=(nnx.Carry, 0),
                  unroll=seg.length if unroll else 1)
        def scan_fn(block, carry, lc, cs, n, start, valid):
          return block.cached(carry, cs, lc, n, start, valid)

        x, update = scan_fn(stack, x, layer_cache, cos_sin, length, start_B, valid_BxT)
      time_axis = 2 if seg.stacked else 1
      write = lambda full, rows: (None if full is None else  # noqa: E731
                                  jax.lax.dynamic_update_slice_in_dim(full, rows, length, axis=time_axis))
      layers.append(update._replace(k=write(layer_cache.k, update.k), v=write(layer_cache.v, update.v)))
    x = self.final_norm(x[:, -1:] if last_only else x)
    if cfg.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = jnp.einsum("btd,dv->btv", x, self.lm_head[...].astype(cfg.dtype)).astype(jnp.float32)
    return logits, cache._replace(layers=tuple(layers), length=length + tokens_BxT.shape[1], pos=pos_B)

  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))


def abstract_model(cfg: ModelConfig, mesh=None) -> HydraHeadLM:
  """Shapes and dtypes only (no allocation); logical names are resolved by the rule table."""
  with axis_rules(mesh):
    return nnx.eval_shape(lambda: HydraHeadLM(cfg, rngs=nnx.Rngs(0)))


def create_model(cfg: ModelConfig, *, seed: int = 0, mesh=None) -> HydraHeadLM:
  """Builds a randomly initialised model; with a mesh, every parameter is created already sharded."""
  if mesh is None:
    return HydraHeadLM(cfg, rngs=nnx.Rngs(seed))
  abstract = abstract_model(cfg, mesh)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = param_shardings(abstract_state, mesh)

  def init():
    return nnx.state(HydraHeadLM(cfg, rngs=nnx.Rngs(seed)))

  return nnx.merge(graphdef, jax.jit(init, out_shardings=shardings)())
