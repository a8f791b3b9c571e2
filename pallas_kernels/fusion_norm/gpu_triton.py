"""Pallas (Triton backend) kernels of the fused head fusion, forward and backward.

Grid: one program per block of R rows of the flattened [N = B*T, H, K] head outputs. Each program walks the H
heads with a static loop (the head kind, FA or LA, and so the math, is known at trace time), so every tile it
touches is [R, K] and every per-head parameter row is [K]. Per-head flags (static):
  norm   y = x / rms(x) first              (LA heads unless 'none'; FA heads for 'rmsnorm_all')
  scaled y *= w_h (a [K] row of the per-head scale matrix; FA 'scale_norm' rows repeat the scalar)
  gated  y *= gate                         (LA heads when a gate is given)
Backward (n = x r, r = rsqrt(mean x^2 + eps), dy' = dy * gate):
  dgate = dy * n * w,  dw = sum_rows dy' * n,  dn = dy' * w,  dx = r (dn - n mean_k(dn * n))
dw is written per program ([programs, H, K] float32) and summed by the glue (no atomics).

In Pallas interpret mode (CPU tests) the same kernels run with ``interpret=True``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

Array = jax.Array
f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
  """Tiling of the Triton kernels (hashable: a static argument)."""
  block_rows: int = 32  # rows (tokens) per program; a power of two
  num_warps: int = 4
  interpret: bool = False


INTERPRET = Config(block_rows=16, interpret=True)


@dataclasses.dataclass(frozen=True)
class Heads:
  """Static per-layer description: FA heads [0, fa_heads), LA heads after."""
  fa_heads: int
  norm_fa: bool
  norm_la: bool
  scaled: bool
  gated: bool
  eps: float

  def norm(self, h: int) -> bool:
    return self.norm_fa if h < self.fa_heads else self.norm_la

  def gate_of(self, h: int) -> int | None:
    """Index of head h in the gate array, or None."""
    return h - self.fa_heads if self.gated and h >= self.fa_heads else None


def _normalize(x_RxK: Array, eps: float) -> tuple[Array, Array]:
  r_Rx1 = jax.lax.rsqrt(jnp.mean(x_RxK * x_RxK, axis=1, keepdims=True) + eps)
  return x_RxK * r_Rx1, r_Rx1


def _fwd_kernel(o_ref, w_ref, g_ref, y_ref, *, hs: Heads):
  for h in range(o_ref.shape[1]):
    y_RxK = o_ref[:, h, :].astype(f32)
    if hs.norm(h):
      y_RxK, _ = _normalize(y_RxK, hs.eps)
    if hs.scaled:
      y_RxK = y_RxK * w_ref[h, :].astype(f32)[None, :]
    gi = hs.gate_of(h)
    if gi is not None:
      y_RxK = y_RxK * g_ref[:, gi, :].astype(f32)
    y_ref[:, h, :] = y_RxK.astype(y_ref.dtype)


def _bwd_kernel(o_ref, w_ref, g_ref, dy_ref, dx_ref, dw_ref, dg_ref, *, hs: Heads):
  for h in range(o_ref.shape[1]):
    n_RxK, dy_RxK = o_ref[:, h, :].astype(f32), dy_ref[:, h, :].astype(f32)
    r_Rx1 = None
    if hs.norm(h):
      n_RxK, r_Rx1 = _normalize(n_RxK, hs.eps)
    w_1xK = w_ref[h, :].astype(f32)[None, :] if hs.scaled else None
    gi = hs.gate_of(h)
    if gi is not None:
      ny_RxK = n_RxK if w_1xK is None else n_RxK * w_1xK
      dg_ref[:, gi, :] = (dy_RxK * ny_RxK).astype(dg_ref.dtype)
      dy_RxK = dy_RxK * g_ref[:, gi, :].astype(f32)
    if w_1xK is not None:
      dw_ref[h, :] = jnp.sum(dy_RxK * n_RxK, axis=0)
      dy_RxK = dy_RxK * w_1xK
    if r_Rx1 is not None:
      dy_RxK = r_Rx1 * (dy_RxK - n_RxK * jnp.mean(dy_RxK * n_RxK, axis=1, keepdims=True))
    dx_ref[:, h, :] = dy_RxK.astype(dx_ref.dtype)


def _present(kernel, present):
  """Kernel taking None for the absent (optional) refs."""

  def wrapped(*refs):
    it = iter(refs)
    return kernel(*[next(it) if p else None for p in present])

  return wrapped


def _run(kernel, cfg: Config, grid, args_specs, outs, name: str):
  """args_specs: [(array or None, spec)]; outs: [(ShapeDtypeStruct, spec) or None]."""
  present = [a is not None for a, _ in args_specs] + [o is not None for o in outs]
  outs = [o for o in outs if o is not None]
  params = None if cfg.interpret else pltr.CompilerParams(num_warps=cfg.num_warps, num_stages=1)
  call = pl.pallas_call(_present(kernel, present), grid=grid,
                        in_specs=[s for a, s in args_specs if a is not None], out_specs=[s for _, s in outs],
                        out_shape=[o for o, _ in outs], compiler_params=params, interpret=cfg.interpret, name=name)
  return call(*[a for a, _ in args_specs if a is not None])


def _rows(R: int, H: int, K: int) -> pl.BlockSpec:
  return pl.BlockSpec((R, H, K), lambda i: (i, 0, 0))


def forward(o_NxHxK: Array, w_HxK: Array, g_NxHlxK: Array | None, *, hs: Heads, cfg: Config) -> Array:
  """Fused heads [N, H, K] (o's dtype); N a multiple of cfg.block_rows."""
  N, H, K = o_NxHxK.shape
  R = cfg.block_rows
  Hl = H - hs.fa_heads
  w_spec = pl.BlockSpec((H, K), lambda i: (0, 0))
  (y,) = _run(functools.partial(_fwd_kernel, hs=hs), cfg, (N // R,),
              [(o_NxHxK, _rows(R, H, K)), (w_HxK if hs.scaled else None, w_spec), (g_NxHlxK, _rows(R, Hl, K))],
              [(jax.ShapeDtypeStruct((N, H, K), o_NxHxK.dtype), _rows(R, H, K))], "fusion_norm_fwd")
  return y


def backward(o_NxHxK: Array, w_HxK: Array, g_NxHlxK: Array | None, dy_NxHxK: Array, *, hs: Heads,
             cfg: Config) -> tuple[Array, Array | None, Array | None]:
  """(do [N, H, K], dw [N/R, H, K] float32 per program (None unless scaled), dgate [N, Hl, K] or None)."""
  N, H, K = o_NxHxK.shape
  R = cfg.block_rows
  P = N // R
  Hl = H - hs.fa_heads
  w_spec = pl.BlockSpec((H, K), lambda i: (0, 0))
  outs = [(jax.ShapeDtypeStruct((N, H, K), o_NxHxK.dtype), _rows(R, H, K)),
          (jax.ShapeDtypeStruct((P, H, K), f32), pl.BlockSpec((None, H, K), lambda i: (i, 0, 0)))
          if hs.scaled else None,
          (jax.ShapeDtypeStruct((N, Hl, K), g_NxHlxK.dtype), _rows(R, Hl, K)) if hs.gated else None]
  res = _run(functools.partial(_bwd_kernel, hs=hs), cfg, (P,),
             [(o_NxHxK, _rows(R, H, K)), (w_HxK if hs.scaled else None, w_spec), (g_NxHlxK, _rows(R, Hl, K)),
              (dy_NxHxK, _rows(R, H, K))], outs, "fusion_norm_bwd")
  it = iter(res)
  dx = next(it)
  dw = next(it) if hs.scaled else None
  dg = next(it) if hs.gated else None
  return dx, dw, dg
