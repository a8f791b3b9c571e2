"""Context parallelism: one sequence split along the 'context' mesh axis (docs/parallelism.md).

The rule table maps the logical 'length' axis to the mesh axis 'context', so with a context axis of size n every
activation [B, T, ...] holds T / n contiguous tokens per device (shard c: tokens [c T/n, (c+1) T/n)). Per-token work
(projections, MLP, norms, RoPE with global positions) needs nothing more. The three sequence mixers do, and each runs
here inside one ``jax.shard_map`` over batch rows x length x heads:

* ``context_attention`` (FA heads), two algorithms. 'heads' (the default where the query heads divide): all-gather
  K, V and the segment ids over 'context', and an all-to-all that gives every device the whole sequence of 1/n of
  the query heads; each device runs the single-device causal attention (cuDNN on GPU) on its heads, and a second
  all-to-all returns the outputs to their token shards: every device does 1/n of the work. 'gather': each shard
  attends its local queries to the gathered keys with its causal offset (key position <= the query's global
  position). XLA: one explicit [T/n, T] mask. cuDNN (no offset causal mask in jax's cuDNN API: ``local_window_size``
  with a right window is refused unless causal): a ``lax.switch`` over the shard index whose branch c pads the
  queries in front with c T/n zero rows and runs the top-left causal cuDNN kernel over keys [0, (c+1) T/n): exact,
  flash memory, but the last shard computes the whole causal square (see the docs).
* ``context_gated_delta_rule`` (LA heads): the state after a shard is an affine map of the state before it,
  S_out = A S_in + B. One kernel run per shard with v' = [v | 0] and initial state [0 | I] returns the outputs of a
  zero incoming state and the read-out of A in one go (o' = [o0 | oA], final state [B | A]); A and B are
  all-gathered, every shard folds the prefix of the earlier shards into its true incoming state S_in, and its outputs
  are o0 + oA S_in. Exact, differentiable end to end (the op's custom VJPs, all_gather's transpose).
* ``context_conv`` (LA short convs): each shard prepends the last W-1 pre-conv inputs (and segment ids) of the
  previous shard (``ppermute``; shard 0 gets zeros) and drops the W-1 halo outputs.
* ``per_token_shards`` (the loss): a per-token loss of the final hidden states (``losses.chunked_cross_entropy``)
  on each device's own tokens. Its chunk loop slices T dynamically, which XLA cannot partition along 'context': it
  would all-gather the hidden states and compute the whole sequence's loss on every device.

Shape letters: B batch, T length (global), Tl = T / n local length, H heads, G KV groups, K / V head dims, W conv.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from hydrahead_jax.config import FA_CONTEXT_ALGORITHMS
from hydrahead_jax.ops import gated_delta_rule
from hydrahead_jax.ops.packed_attention import attend_segments, pallas_packed_attention, segment_mask
from hydrahead_jax.sharding import fit_pspec, logical_to_pspec, shard_map_skipping_none

CONTEXT_AXIS = "context"
f32 = jnp.float32
_einsum = functools.partial(jnp.einsum, precision=lax.Precision.HIGHEST)

# Logical names of the operands inside the context-parallel shard_maps: batch rows x length x heads.
BTHK = ("batch", "length", "heads", None)
BTGK = ("batch", "length", "kv_heads", None)
BTH = ("batch", "length", "heads")
BT = ("batch", "length")
WHK = (None, "heads", None)


def _mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def context_is_manual(mesh=None) -> bool:
  """Whether the 'context' axis of ``mesh`` (default: the active mesh) is already manual: inside a ``shard_map`` over
  it, where arrays hold each device's own tokens."""
  mesh = mesh if mesh is not None else _mesh()
  if mesh is None:
    return False
  return dict(zip(mesh.axis_names, mesh.axis_types)).get(CONTEXT_AXIS) == jax.sharding.AxisType.Manual


def context_size(mesh=None) -> int:
  """Size of the 'context' axis of ``mesh`` (default: the active mesh); 1 without one."""
  mesh = mesh if mesh is not None else _mesh()
  if mesh is None:
    return 1
  return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(CONTEXT_AXIS, 1)


def _spec(names, shape, mesh) -> P:
  return fit_pspec(logical_to_pspec(names, mesh), shape, mesh)


def _check_length(T: int, n: int, what: str, min_local: int = 1) -> int:
  if T % n or T // n < min_local:
    raise ValueError(f"{what}: sequence length {T} must be a multiple of the context-parallel size {n} with at least "
                     f"{min_local} token(s) per shard")
  return T // n


def _shard_map(fn, args, in_names, out_names_shapes):
  """``fn`` per shard of the active mesh, specs by logical names; None arguments pass through unsplit."""
  mesh = _mesh()
  if context_is_manual(mesh):  # a second split of local tokens: shard_map would lower a mis-shaped program
    raise ValueError(f"context parallelism: already inside a shard_map over '{CONTEXT_AXIS}' (arrays are per shard)")
  in_specs = [None if a is None else _spec(n, a.shape, mesh) for n, a in zip(in_names, args)]
  out_specs = tuple(_spec(n, s, mesh) for n, s in out_names_shapes)
  for spec in [sp for sp in in_specs if sp is not None][:1]:
    if len(spec) < 2 or spec[1] != CONTEXT_AXIS:
      raise ValueError(f"context parallelism: the length axis did not map to '{CONTEXT_AXIS}' ({spec})")
  return shard_map_skipping_none(fn, mesh, args, in_specs, out_specs)


def _gather_t(x):
  """All-gather along the length axis (axis 1) over 'context': [B, Tl, ...] -> [B, T, ...]."""
  return lax.all_gather(x, CONTEXT_AXIS, axis=1, tiled=True)


# -- FA heads ---------------------------------------------------------------------------------------------------------
def heads_split_fits(num_heads: int, num_groups: int, n: int) -> bool:
  """Whether 'heads' can give each of n devices num_heads / n contiguous query heads whose KV groups it can take
  whole: the per-device heads are whole groups, or lie inside one group."""
  if num_heads % n:
    return False
  h, r = num_heads // n, num_heads // num_groups
  return h % r == 0 or r % h == 0


def context_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, *, scale: float, implementation: str,
                      packed_implementation: str | None = None, algorithm: str | None = None):
  """Causal softmax attention (GQA) over a sequence split on the 'context' axis: [B, T, H, K] like
  ``jax.nn.dot_product_attention(q, k, v, mask=same-segment, is_causal=True)`` over the whole sequence.

  ``algorithm``: 'heads' (all-to-all to whole-sequence head groups; each device attends 1/n of the heads over all
  T), 'gather' (each shard attends its own queries to the gathered keys), None = 'heads' where the query heads of
  a device (after a 'tensor' split) divide by n in whole groups or within one group (``heads_split_fits``), else
  'gather'. ``implementation``: 'xla' (explicit masks) or 'cudnn' ('heads': the single-device cuDNN call on the
  whole sequence; 'gather': a switch over the shard index, zero-padded queries, the cuDNN causal kernel). With
  'cudnn' and segment ids, rows that each hold one document run without a mask (a run-time branch); packed rows take
  ``packed_implementation`` (``ops.packed_attention``: 'pallas', jax's Pallas flash attention with segment ids, no
  T x T tensor; 'mask', a dense mask, moderate T only; None: by length).
  """
  n = context_size()
  B, T, H, K = q_BxTxHxK.shape
  G = k_BxTxGxK.shape[2]
  Tl = _check_length(T, n, "context_attention")
  mesh = _mesh()
  tp = dict(zip(mesh.axis_names, mesh.axis_sizes)).get("tensor", 1)
  # Heads split over 'tensor' only where the KV groups split too (contiguous query heads stay with their group).
  split = G % tp == 0
  qn, kn = (BTHK, BTGK) if split else (("batch", "length", None, None),) * 2
  h_dev, g_dev = (H // tp, G // tp) if split else (H, G)
  fits = heads_split_fits(h_dev, g_dev, n)
  if algorithm is None:
    algorithm = "heads" if fits else "gather"
  elif algorithm not in FA_CONTEXT_ALGORITHMS:
    raise ValueError(f"context attention: algorithm {algorithm!r}; choose None (auto), 'heads' or 'gather'")
  elif algorithm == "heads" and not fits:
    raise ValueError(f"context attention 'heads': {h_dev} query heads in {g_dev} KV groups per device do not split "
                     f"over {n} context devices in whole groups or within one group; use 'gather' (or None)")
  body = _attention_heads if algorithm == "heads" else _attention_local
  local = functools.partial(body, n=n, Tl=Tl, scale=scale, implementation=implementation,
                            packed=packed_implementation)
  (o,) = _shard_map(local, (q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT), (qn, kn, kn, BT),
                    ((qn, q_BxTxHxK.shape),))
  return o


def _whole_sequence_attention(q, k, v, seg, *, scale: float, implementation: str, packed: str | None):
  """Causal attention from position 0 on whole rows (the single-device path): cuDNN without a mask for rows of one
  document, else the packed path; XLA with the segment mask."""
  if implementation != "cudnn":
    mask = None if seg is None else segment_mask(seg)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=scale, implementation=implementation)

  def cudnn(mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=scale, implementation="cudnn")

  if seg is None:
    return cudnn(None)
  return attend_segments(seg, packed, no_mask=lambda: cudnn(None),
                         pallas=lambda: pallas_packed_attention(q, k, v, seg, scale=scale),
                         masked=lambda: cudnn(segment_mask(seg)))


def _attention_heads(q, k, v, seg, *, n: int, Tl: int, scale: float, implementation: str, packed: str | None):
  """'heads': device c takes query heads [c h, (c+1) h) (h = H / n) over the whole sequence and their KV groups."""
  H, G = q.shape[2], k.shape[2]
  h, r = H // n, H // G
  # [B, Tl, H, K] -> [B, T, h, K]: the head axis cut in n, each piece sent to its device, pieces joined along T
  to_heads = functools.partial(lax.all_to_all, axis_name=CONTEXT_AXIS, split_axis=2, concat_axis=1, tiled=True)
  q_heads = to_heads(q)
  if h % r == 0:  # whole groups per device (G / n of them): K and V travel like the queries
    k_all, v_all = to_heads(k), to_heads(v)
  else:  # the device's heads lie inside group c h // r: all of K and V gathered, that group kept
    g0 = (lax.axis_index(CONTEXT_AXIS) * h) // r
    k_all, v_all = (lax.dynamic_slice_in_dim(_gather_t(x), g0, 1, axis=2) for x in (k, v))
  seg_all = None if seg is None else _gather_t(seg)
  o = _whole_sequence_attention(q_heads, k_all, v_all, seg_all, scale=scale, implementation=implementation,
                                packed=packed)
  return (lax.all_to_all(o, CONTEXT_AXIS, split_axis=1, concat_axis=2, tiled=True),)  # back to [B, Tl, H, K]


def _attention_local(q, k, v, seg, *, n: int, Tl: int, scale: float, implementation: str, packed: str | None):
  c = lax.axis_index(CONTEXT_AXIS)
  k_all, v_all = _gather_t(k), _gather_t(v)
  seg_all = None if seg is None else _gather_t(seg)
  if implementation != "cudnn":
    qpos_T = c * Tl + jnp.arange(Tl, dtype=jnp.int32)
    mask = (jnp.arange(n * Tl, dtype=jnp.int32)[None, :] <= qpos_T[:, None])[None, None]  # [1, 1, Tl, T]
    if seg is not None:
      mask = mask & (seg[:, None, :, None] == seg_all[:, None, None, :])
    o = jax.nn.dot_product_attention(q, k_all, v_all, mask=mask, scale=scale, implementation=implementation)
    return (o,)

  def branch(ci: int):  # shard ci: queries at global [ci Tl, (ci+1) Tl), keys [0, (ci+1) Tl)
    S = (ci + 1) * Tl

    def run(q, k_all, v_all, seg_all):
      q_pad = jnp.pad(q, ((0, 0), (ci * Tl, 0), (0, 0), (0, 0)))  # top-left causal on [S, S] = offset causal
      o = _whole_sequence_attention(q_pad, k_all[:, :S], v_all[:, :S], None if seg_all is None else seg_all[:, :S],
                                    scale=scale, implementation="cudnn", packed=packed)
      return o[:, ci * Tl:]

    return run

  return (lax.switch(c, [branch(ci) for ci in range(n)], q, k_all, v_all, seg_all),)


# -- LA heads: short conv ---------------------------------------------------------------------------------------------
def context_conv(conv_fn, x_BxTxHxK, w_WxHxK, segment_ids_BxT):
  """A causal short conv over a sequence split on 'context'. ``conv_fn(x [B, t, H, K], w [W, H, K], seg [B, t] | None)
  -> (y [B, t, H, K],)`` is the single-device conv (kernel or XLA, never reaching across a segment change); each
  shard runs it on [halo of W-1 tokens from the previous shard | its own tokens] and keeps its own outputs."""
  n = context_size()
  B, T, H, K = x_BxTxHxK.shape
  W1 = w_WxHxK.shape[0] - 1
  _check_length(T, n, "context_conv", min_local=max(W1, 1))

  def local(x, w, seg):
    if W1 == 0:
      return conv_fn(x, w, seg)
    to_next = [(i, i + 1) for i in range(n - 1)]  # shard 0 receives zeros: no tokens before the sequence
    x_ext = jnp.concatenate([lax.ppermute(x[:, -W1:], CONTEXT_AXIS, to_next), x], axis=1)
    seg_ext = None if seg is None else jnp.concatenate([lax.ppermute(seg[:, -W1:], CONTEXT_AXIS, to_next), seg], 1)
    (y,) = conv_fn(x_ext, w, seg_ext)
    return (y[:, W1:],)

  (y,) = _shard_map(local, (x_BxTxHxK, w_WxHxK, segment_ids_BxT), (BTHK, WHK, BT), ((BTHK, x_BxTxHxK.shape),))
  return y


# -- LA heads: gated delta rule ---------------------------------------------------------------------------------------
def context_gated_delta_rule(q, k, v, g, beta, segment_ids=None, *, chunk_size: int = 64,
                             implementation: str | None = None, scale: float | None = None):
  """``gated_delta_rule(q, k, v, g, beta, segment_ids=...)[0]`` (zero initial state) over a sequence split on the
  'context' mesh axis: o [B, T, H, V] in v's dtype; differentiable in q, k, v, g, beta."""
  n = context_size()
  _check_length(q.shape[1], n, "context_gated_delta_rule")
  local = functools.partial(_gdn_local, n=n, chunk_size=chunk_size, implementation=implementation, scale=scale)
  (o,) = _shard_map(local, (q, k, v, g, beta, segment_ids), (BTHK, BTHK, BTHK, BTH, BTH, BT),
                    ((BTHK, v.shape),))
  return o


def shard_summary(q, k, v, g, beta, segment_ids, *, chunk_size: int, implementation: str | None,
                  scale: float | None):
  """One op run over a shard: (o0 [B, t, H, V] outputs for a zero incoming state, oA [B, t, H, K] read-outs of the
  transition (o_t = o0_t + oA_t S_in), A [B, H, K, K], B [B, H, K, V]: final state = A S_in + B)."""
  Bsz, t, H, K = q.shape
  V = v.shape[-1]
  v_aug = jnp.concatenate([v, jnp.zeros((Bsz, t, H, K), v.dtype)], axis=-1)
  eye = jnp.broadcast_to(jnp.eye(K, dtype=f32), (Bsz, H, K, K))
  h0 = jnp.concatenate([jnp.zeros((Bsz, H, K, V), f32), eye], axis=-1)  # columns evolve independently
  o_aug, final = gated_delta_rule(q, k, v_aug, g, beta, scale=scale, initial_state=h0, segment_ids=segment_ids,
                                  chunk_size=chunk_size, output_final_state=True, implementation=implementation)
  return o_aug[..., :V], o_aug[..., V:], final[..., V:], final[..., :V]


def incoming_states(a_NxBxHxKxK, b_NxBxHxKxV, keep_NxB=None):
  """States entering each of N consecutive shards [N, B, H, K, V] (shard 0: zero) from their affine summaries;
  ``keep_NxB[j]`` False drops the state entering shard j (a segment starts at its first token)."""
  N = a_NxBxHxKxK.shape[0]
  s = jnp.zeros(b_NxBxHxKxV.shape[1:], f32)
  states = [s]
  for j in range(N - 1):
    s = _einsum("bhkj,bhjv->bhkv", a_NxBxHxKxK[j], s) + b_NxBxHxKxV[j]
    if keep_NxB is not None:
      s = jnp.where(keep_NxB[j + 1][:, None, None, None], s, 0.0)
    states.append(s)
  return jnp.stack(states)


def _gdn_local(q, k, v, g, beta, seg, *, n: int, chunk_size: int, implementation, scale):
  o0, oa, a, b = shard_summary(q, k, v, g, beta, seg, chunk_size=chunk_size, implementation=implementation,
                               scale=scale)
  a_all = lax.all_gather(a, CONTEXT_AXIS)  # [n, B, H, K, K]
  b_all = lax.all_gather(b, CONTEXT_AXIS)  # [n, B, H, K, V]
  keep = None
  if seg is not None:  # the state crosses into shard j only if its first token continues shard j-1's segment
    first, last = lax.all_gather(seg[:, 0], CONTEXT_AXIS), lax.all_gather(seg[:, -1], CONTEXT_AXIS)  # [n, B]
    keep = jnp.concatenate([jnp.ones_like(first[:1], bool), first[1:] == last[:-1]], axis=0)
  s_in = incoming_states(a_all, b_all, keep)[lax.axis_index(CONTEXT_AXIS)]
  o = o0.astype(f32) + _einsum("bthk,bhkv->bthv", oa.astype(f32), s_in)
  return (o.astype(v.dtype),)


# -- per-token losses -------------------------------------------------------------------------------------------------
def per_token_shards(fn):
  """``fn(hidden [B, T, D], w, targets [B, T], **kw) -> tuple of [B, T] arrays`` (e.g.
  ``losses.chunked_cross_entropy``), run on each device's batch rows x tokens when the active mesh has a 'context'
  axis > 1 (w whole on every device; its gradient summed over the shards by shard_map's transpose); else fn.

  Inside a shard_map over 'context' (e.g. ``per_token_shards(per_token_shards(fn))``) the arrays already hold the
  device's own tokens and fn runs on them as they are: splitting them again would make shard_map lower a program
  whose loop carries the local [B, T/n, D] hidden states where its body expects [B, T/n^2, D] (an MLIR verifier
  error at lowering; silently wrong shapes where no loop checks them)."""

  @functools.wraps(fn)
  def wrapped(hidden_BxTxD, w, targets_BxT, **kw):
    n = context_size()
    if n == 1 or context_is_manual():
      return fn(hidden_BxTxD, w, targets_BxT, **kw)
    _check_length(hidden_BxTxD.shape[1], n, getattr(fn, "__name__", "per_token_shards"))
    outs = jax.eval_shape(lambda h, w, t: tuple(fn(h, w, t, **kw)), hidden_BxTxD, w, targets_BxT)
    return _shard_map(lambda h, w, t: tuple(fn(h, w, t, **kw)), (hidden_BxTxD, w, targets_BxT),
                      (("batch", "length", None), (None,) * w.ndim, BT), tuple((BT, o.shape) for o in outs))

  return wrapped
