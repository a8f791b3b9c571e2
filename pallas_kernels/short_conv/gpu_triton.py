"""Pallas (Triton backend) kernels of the Gated DeltaNet short convolution, forward and backward.

Math (per batch row, time t, channel c; float32 inside, inputs and outputs in their own dtypes). With the tap
mask m(t, i) = [t-i >= 0 and seg_{t-i} == seg_t] (no segment_ids: [t-i >= 0]):
  forward   u_t  = sum_{i<W} w[W-1-i] m(t, i) x_{t-i}
            s_t  = u_t sigma(u_t)                                   (SiLU)
            y_t  = s_t r_t,  r_t = rsqrt(sum_{c in head} s_t^2 + 1e-6)   (head_dim=K; without it y = s)
  backward  ds_t = r_t (dy_t - y_t sum_{c in head} y_t dy_t)        (without the norm ds = dy)
            du_t = ds_t sigma(u_t) (1 + u_t (1 - sigma(u_t)))       (SiLU')
            dx_t = sum_{j<W} w[W-1-j] m(t+j, j) du_{t+j}            (transposed conv; du_{t+j} = 0 for t+j >= T)
            dw[W-1-i] = sum_t m(t, i) du_t x_{t-i}

Tiling. Grid (B, ceil(T / BT), ceil(C / step)); a program owns BT rows and one channel tile of BC lanes (BC a
power of two, as Triton wants). With the norm, step = K and BC = next_pow2(K): one head per program, so the
per-head sums are in-program row reductions; without it step = BC = Config.block_c (128). Lanes past the head /
past C are masked (they load zero, so they add nothing to the head sums). Arrays keep their [B, T, C] layout
and every program sees its whole batch row (BlockSpec (None, T, C); no copies): each tile is a masked
``pltr.load`` of the [BT, BC] rows [t0 + d, t0 + d + BT) at a static offset d, masked to 0 <= t0 + d + row < T
and the segment condition. So the time halo needs no second BlockSpec, T needs no padding (the ragged last block
is masked on load and store; nothing is padded or sliced in the glue), and the overlapping shifted reads of
neighbouring rows come from L1/L2, leaving about one HBM pass per array. Segment ids are loaded as [BT] vectors,
once per offset.

  forward   W shifted loads of x (d = -(W-1)..0) -> u, s, y; one store of y. One pass: read x, write y.
  backward  two kernels, nothing saved from the forward (residuals: x, w, segment_ids).
            du:  u, s, y recomputed on the program's own rows from W shifted loads of x; du stored (x's dtype);
                 the dw partials sum_rows du x_{t-i} written per program ([B, nT, W, C] float32) and summed by
                 the glue (no atomics). Read x, dy; write du.
            dx:  the transposed conv, W shifted loads of du (d = 0..W-1) masked by m(t+j, j). Read du, write dx.

A single backward kernel that recomputed du on the W shifted windows (Triton has no register shifts to move du
rows between neighbours) was measured first on an H100 and dropped: at T = 128K, C = 14 x 128 it took
3.5 ms per call against ~2 ms for the two kernels (the W-fold SiLU / norm recompute made it compute-bound).
Tiles: 32 rows forward and in dx, 16 rows in du (a sweep on the H100: fwd+bwd 2.48 ms at 32 / 16 against 2.68 at
64 / 32 and 3.0 at 128 / 64).

In Pallas interpret mode (CPU tests) the same kernels run with ``interpret=True``; the one difference is the
halo load of the first block, whose negative start Triton masks but interpret mode would wrap around (see
``_Tile._load``). Defaults of ``Config`` are the best of that sweep.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.optional_refs import pallas_call_optional
from pallas_kernels.short_conv.reference import EPS

Array = jax.Array
f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
  """Tiling of the Triton kernels (hashable: a static argument). Block sizes are powers of two."""
  block_t: int = 32  # rows per forward program (and of the transposed-conv kernel of the backward)
  block_t_bwd: int = 16  # rows per du program of the backward (more live tiles: u, sigma, dy, norm)
  block_c: int = 128  # channel lanes per program without the norm (with it: one head per program)
  num_warps: int = 4
  num_warps_bwd: int = 4
  interpret: bool = False


INTERPRET = Config(block_t=16, block_t_bwd=16, block_c=32, interpret=True)


def next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Dims:
  """Static shape of one call: T rows, C channels, W taps, BT x BC tiles advancing by ``step`` channels."""
  T: int
  C: int
  W: int
  bt: int
  bc: int
  step: int
  norm: bool
  segments: bool
  interpret: bool

  @property
  def lane_mask(self) -> bool:
    """Whether some lanes of a tile lie past the head (step < BC) or past C."""
    return self.step != self.bc or self.C % self.step != 0


def dims(T: int, C: int, W: int, head_dim: int | None, segments: bool, bt: int, cfg: Config) -> Dims:
  if head_dim is not None:
    step, bc = head_dim, next_pow2(head_dim)
  else:
    step = bc = min(next_pow2(cfg.block_c), next_pow2(C))
  bt = min(next_pow2(bt), next_pow2(T))
  return Dims(T=T, C=C, W=W, bt=bt, bc=bc, step=step, norm=head_dim is not None, segments=segments,
              interpret=cfg.interpret)


# ----------------------------------------------------------------------------------------------- in-kernel


class _Tile:
  """Loads of one program: rows t0 + d + [0, BT) (static offset d) of channel lanes c0 + [0, BC)."""

  def __init__(self, d: Dims, sid_ref):
    self.d = d
    self.t0 = pl.program_id(1) * d.bt
    self.c0 = pl.program_id(2) * d.step
    self.row = lax.broadcasted_iota(jnp.int32, (d.bt,), 0)
    lane = lax.broadcasted_iota(jnp.int32, (d.bc,), 0)
    self.lanes = None
    if d.lane_mask:
      self.lanes = (lane < d.step) & (self.c0 + lane < d.C)
    self.sid_ref = sid_ref
    self._sid = {}

  def in_range(self, off: int) -> Array:
    """[BT] bool: rows t0 + off + row inside [0, T)."""
    r = self.t0 + off + self.row
    return (r >= 0) & (r < self.d.T)

  def sid(self, off: int) -> Array:
    """[BT] int32 segment ids of rows t0 + off + row (-1 outside [0, T)); loaded once per offset."""
    if off not in self._sid:
      self._sid[off] = self._load(self.sid_ref, off, None, self.in_range(off), -1)
    return self._sid[off]

  def tap_mask(self, at: int, back: int) -> Array:
    """[BT] bool m(t, back) for t = t0 + at + row: the tap reaches row t - back, inside [0, T), same segment.

    (Rows t >= T get no guarantee beyond their loads being in range.)"""
    m = self.in_range(at - back)
    if self.d.segments and back:
      m = m & (self.sid(at - back) == self.sid(at))
    return m

  def full_mask(self, rows: Array) -> Array:
    """[BT, BC] mask from a [BT] row mask and the lane mask."""
    m = jnp.broadcast_to(rows[:, None], (self.d.bt, self.d.bc))
    return m if self.lanes is None else m & self.lanes[None, :]

  def _load(self, ref, off: int, lanes, mask: Array, other) -> Array:
    """Masked load of rows t0 + off + [0, BT) (and lanes, a channel slice, unless None).

    On Triton a negative start (the halo of the first block) is plain pointer arithmetic under the mask. Pallas
    interpret mode instead wraps a negative dynamic start around (lax.dynamic_slice semantics), so there the
    rows are loaded from max(start, 0) and shifted into place (interpret mode only; Triton never sees it)."""
    start = self.t0 + off
    idx = (lambda s: (pl.ds(s, self.d.bt),)) if lanes is None else (lambda s: (pl.ds(s, self.d.bt), lanes))
    if off >= 0 or not self.d.interpret:
      return pltr.load(ref.at[idx(start)], mask=mask, other=other)
    safe = jnp.maximum(start, 0)
    rows = safe + self.row < self.d.T
    rows = rows if mask.ndim == 1 else jnp.broadcast_to(rows[:, None], mask.shape)
    value = jnp.roll(pltr.load(ref.at[idx(safe)], mask=rows, other=other), safe - start, axis=0)
    return jnp.where(mask, value, other)

  def load(self, ref, off: int, rows: Array) -> Array:
    """float32 [BT, BC] of ref rows t0 + off + row where ``rows`` (else 0)."""
    lanes = pl.ds(self.c0, self.d.bc)
    return self._load(ref, off, lanes, self.full_mask(rows), 0).astype(f32)

  def store(self, ref, value: Array) -> None:
    view = ref.at[pl.ds(self.t0, self.d.bt), pl.ds(self.c0, self.d.bc)]
    pltr.store(view, value.astype(ref.dtype), mask=self.full_mask(self.in_range(0)))

  def weights(self, w_ref) -> list[Array]:
    """W float32 [1, BC] rows of w (masked lanes 0)."""
    out = []
    for k in range(self.d.W):
      view = w_ref.at[pl.ds(k, 1), pl.ds(self.c0, self.d.bc)]
      row = view[...] if self.lanes is None else pltr.load(view, mask=self.lanes[None, :], other=0)
      out.append(row.astype(f32))
    return out

  def store_row(self, ref, k: int, value: Array) -> None:
    """Row k, this program's lanes, of a [rows, C] ref: value [1, BC]."""
    view = ref.at[pl.ds(k, 1), pl.ds(self.c0, self.d.bc)]
    if self.lanes is None:
      view[...] = value
    else:
      pltr.store(view, value, mask=self.lanes[None, :])

  def shifted_x(self, x_ref, at: int, back: int) -> Array:
    """m(t, back) x_{t-back} for t = t0 + at + row."""
    return self.load(x_ref, at - back, self.tap_mask(at, back))

  def conv(self, x_ref, w: list[Array], at: int) -> Array:
    """u_t for t = t0 + at + row."""
    W = self.d.W
    u = None
    for i in range(W):
      term = w[W - 1 - i] * self.shifted_x(x_ref, at, i)
      u = term if u is None else u + term
    return u


def _head_rsqrt(s: Array) -> Array:
  return lax.rsqrt(jnp.sum(s * s, axis=1, keepdims=True) + EPS)


def _fwd_kernel(x_ref, w_ref, sid_ref, y_ref, *, d: Dims):
  tile = _Tile(d, sid_ref)
  u = tile.conv(x_ref, tile.weights(w_ref), 0)
  s = u * jax.nn.sigmoid(u)
  if d.norm:
    s = s * _head_rsqrt(s)
  tile.store(y_ref, s)


def _du_kernel(x_ref, w_ref, sid_ref, dy_ref, du_ref, dw_ref, *, d: Dims):
  """du = dL/du on this program's rows (u, s, y recomputed from x) and the dw partials sum_rows du x_{t-i}."""
  tile = _Tile(d, sid_ref)
  w = tile.weights(w_ref)
  u = tile.conv(x_ref, w, 0)
  dy = tile.load(dy_ref, 0, tile.in_range(0))
  sig = jax.nn.sigmoid(u)
  ds = dy
  if d.norm:
    s = u * sig
    r = _head_rsqrt(s)
    y = s * r
    ds = r * (dy - y * jnp.sum(y * dy, axis=1, keepdims=True))
  du = ds * (sig * (1.0 + u * (1.0 - sig)))
  for i in range(d.W):
    tile.store_row(dw_ref, d.W - 1 - i, jnp.sum(du * tile.shifted_x(x_ref, 0, i), axis=0, keepdims=True))
  tile.store(du_ref, du)


def _dx_kernel(du_ref, w_ref, sid_ref, dx_ref, *, d: Dims):
  """dx_t = sum_j w[W-1-j] m(t+j, j) du_{t+j}: the transposed conv, W shifted loads of du."""
  tile = _Tile(d, sid_ref)
  w = tile.weights(w_ref)
  dx = None
  for j in range(d.W):
    term = w[d.W - 1 - j] * tile.load(du_ref, j, tile.tap_mask(j, j) & tile.in_range(j))
    dx = term if dx is None else dx + term
  tile.store(dx_ref, dx)


# ------------------------------------------------------------------------------------------ pallas_calls


class _Specs:
  """BlockSpecs of the grid (B, T blocks, channel blocks): every program sees all T rows of its batch row."""

  def __init__(self, d: Dims):
    self.d = d

  def rows(self) -> pl.BlockSpec:  # [B, T, C]
    return pl.BlockSpec((None, self.d.T, self.d.C), lambda b, i, c: (b, 0, 0))

  def w(self) -> pl.BlockSpec:  # [W, C]
    return pl.BlockSpec((self.d.W, self.d.C), lambda b, i, c: (0, 0))

  def sid(self) -> pl.BlockSpec:  # [B, T]
    return pl.BlockSpec((None, self.d.T), lambda b, i, c: (b, 0))

  def partial_w(self) -> pl.BlockSpec:  # [B, nT, W, C]: one [W, C] slab per (batch row, T block)
    return pl.BlockSpec((None, None, self.d.W, self.d.C), lambda b, i, c: (b, i, 0, 0))


def _call(kernel, d: Dims, B: int, args_specs, outs, warps: int, cfg: Config, name: str):
  """args_specs: [(array or None, spec)] in kernel order; outs: [(ShapeDtypeStruct, spec)]."""
  params = None if cfg.interpret else pltr.CompilerParams(num_warps=warps, num_stages=1)
  return pallas_call_optional(kernel, args_specs, outs, grid=(B, pl.cdiv(d.T, d.bt), pl.cdiv(d.C, d.step)),
                              compiler_params=params, interpret=cfg.interpret, name=name)


def forward(x_BxTxC: Array, w_WxC: Array, sid_BxT: Array | None, *, head_dim: int | None, cfg: Config) -> Array:
  """y [B, T, C] in x's dtype."""
  B, T, C = x_BxTxC.shape
  d = dims(T, C, w_WxC.shape[0], head_dim, sid_BxT is not None, cfg.block_t, cfg)
  sp = _Specs(d)
  (y,) = _call(functools.partial(_fwd_kernel, d=d), d, B,
               [(x_BxTxC, sp.rows()), (w_WxC, sp.w()), (sid_BxT, sp.sid())],
               [(jax.ShapeDtypeStruct((B, T, C), x_BxTxC.dtype), sp.rows())], cfg.num_warps, cfg, "short_conv_fwd")
  return y


def backward(x_BxTxC: Array, w_WxC: Array, sid_BxT: Array | None, dy_BxTxC: Array, *, head_dim: int | None,
             cfg: Config) -> tuple[Array, Array]:
  """(dx [B, T, C] in x's dtype, dw partials [B, ceil(T / BT), W, C] float32: sum over the first two axes).

  Two kernels: du (written in x's dtype) with the dw partials, then the transposed conv of du."""
  B, T, C = x_BxTxC.shape
  W = w_WxC.shape[0]
  d = dims(T, C, W, head_dim, sid_BxT is not None, cfg.block_t_bwd, cfg)
  sp = _Specs(d)
  rows = jax.ShapeDtypeStruct((B, T, C), x_BxTxC.dtype)
  du, dw = _call(functools.partial(_du_kernel, d=d), d, B,
                 [(x_BxTxC, sp.rows()), (w_WxC, sp.w()), (sid_BxT, sp.sid()), (dy_BxTxC, sp.rows())],
                 [(rows, sp.rows()), (jax.ShapeDtypeStruct((B, pl.cdiv(T, d.bt), W, C), f32), sp.partial_w())],
                 cfg.num_warps_bwd, cfg, "short_conv_bwd_du")
  dconv = dims(T, C, W, None, sid_BxT is not None, cfg.block_t, cfg)  # no per-head work: channel tiles
  spc = _Specs(dconv)
  (dx,) = _call(functools.partial(_dx_kernel, d=dconv), dconv, B,
                [(du, spc.rows()), (w_WxC, spc.w()), (sid_BxT, spc.sid())], [(rows, spc.rows())],
                cfg.num_warps, cfg, "short_conv_bwd_dx")
  return dx, dw
