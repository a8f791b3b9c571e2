"""Pallas (Triton backend) kernels of the fused head fusion, forward and backward.

Grid: one program per block of R rows of the flattened [N = B*T, *, K] head outputs, read from the FA and the LA
outputs as they come (no concatenation before the kernel); the output [N, Hf + Hl, K] is the input of W_o. Each
program walks the heads with a static loop (the head kind, FA or LA, and so the math, is known at trace time), so
every tile it touches is [R, K] and every per-head parameter row is [K], K a power of two (Triton's tensor sizes:
the glue zero-pads the head dim; the norm's mean divides by the true ``Heads.dim``). Per-head flags (static):
  norm   y = x / rms(x) first              (LA heads unless 'none'; FA heads for 'rmsnorm_all')
  scaled y *= w_h (a [K] row of the per-head scale matrix; FA 'scale_norm' rows repeat the scalar)
  gated  y *= SiLU(u), u = z + z_bias      (LA heads with an output gate: the gate's pre-activation goes in)
Backward (n = x r, r = rsqrt(mean x^2 + eps), dy' = dy * SiLU(u)):
  du = dy n w SiLU'(u),  dw = sum_rows dy' n,  dn = dy' w,  dx = r (dn - n mean_k(dn n))
dw and d z_bias (= sum_rows du) are written per program ([programs, *, K] float32) and summed by the glue.

In Pallas interpret mode (CPU tests) the same kernels run with ``interpret=True``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.optional_refs import pallas_call_optional

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
  """Static per-layer description: fa_heads FA heads, then la_heads LA heads (the output's head order)."""
  fa_heads: int
  la_heads: int
  norm_fa: bool
  norm_la: bool
  scaled: bool
  gated: bool
  eps: float
  dim: int  # true head dim: the RMS mean is over these channels (lanes past it are zero padding)

  def kinds(self):
    """(head index in the output, index in its own input, is_fa) for every head."""
    return [(h, h, True) for h in range(self.fa_heads)] + [
        (self.fa_heads + j, j, False) for j in range(self.la_heads)]


def _normalize(x_RxK: Array, hs: Heads) -> tuple[Array, Array]:
  """x / rms(x) and 1 / rms(x) over the true head dim (zero padding lanes add nothing to the sum)."""
  r_Rx1 = jax.lax.rsqrt(jnp.sum(x_RxK * x_RxK, axis=1, keepdims=True) / hs.dim + hs.eps)
  return x_RxK * r_Rx1, r_Rx1


def _gate_pre(z_ref, zb_ref, j: int) -> Array:
  z_RxK = z_ref[:, j, :].astype(f32)
  return z_RxK if zb_ref is None else z_RxK + zb_ref[j, :].astype(f32)[None, :]


def _fwd_kernel(ofa_ref, ola_ref, w_ref, z_ref, zb_ref, y_ref, *, hs: Heads):
  for h, i, fa in hs.kinds():
    y_RxK = (ofa_ref if fa else ola_ref)[:, i, :].astype(f32)
    if hs.norm_fa if fa else hs.norm_la:
      y_RxK, _ = _normalize(y_RxK, hs)
    if hs.scaled:
      y_RxK = y_RxK * w_ref[h, :].astype(f32)[None, :]
    if hs.gated and not fa:
      u_RxK = _gate_pre(z_ref, zb_ref, i)
      y_RxK = y_RxK * (u_RxK * jax.nn.sigmoid(u_RxK))
    y_ref[:, h, :] = y_RxK.astype(y_ref.dtype)


def _bwd_kernel(ofa_ref, ola_ref, w_ref, z_ref, zb_ref, dy_ref, dofa_ref, dola_ref, dw_ref, dz_ref, dzb_ref, *,
                hs: Heads):
  for h, i, fa in hs.kinds():
    n_RxK, dy_RxK = (ofa_ref if fa else ola_ref)[:, i, :].astype(f32), dy_ref[:, h, :].astype(f32)
    r_Rx1 = None
    if hs.norm_fa if fa else hs.norm_la:
      n_RxK, r_Rx1 = _normalize(n_RxK, hs)
    w_1xK = w_ref[h, :].astype(f32)[None, :] if hs.scaled else None
    if hs.gated and not fa:
      u_RxK = _gate_pre(z_ref, zb_ref, i)
      sig_RxK = jax.nn.sigmoid(u_RxK)
      ny_RxK = n_RxK if w_1xK is None else n_RxK * w_1xK
      dz_RxK = dy_RxK * ny_RxK * (sig_RxK * (1.0 + u_RxK * (1.0 - sig_RxK)))  # d SiLU(u) / du
      dz_ref[:, i, :] = dz_RxK.astype(dz_ref.dtype)
      if dzb_ref is not None:
        dzb_ref[i, :] = jnp.sum(dz_RxK, axis=0)
      dy_RxK = dy_RxK * (u_RxK * sig_RxK)
    if w_1xK is not None:
      dw_ref[h, :] = jnp.sum(dy_RxK * n_RxK, axis=0)
      dy_RxK = dy_RxK * w_1xK
    if r_Rx1 is not None:
      dy_RxK = r_Rx1 * (dy_RxK - n_RxK * (jnp.sum(dy_RxK * n_RxK, axis=1, keepdims=True) / hs.dim))
    (dofa_ref if fa else dola_ref)[:, i, :] = dy_RxK.astype((dofa_ref if fa else dola_ref).dtype)


def _run(kernel, cfg: Config, grid, args_specs, outs, name: str):
  """args_specs: [(array or None, spec)]; outs: [(ShapeDtypeStruct, spec) or None]."""
  params = None if cfg.interpret else pltr.CompilerParams(num_warps=cfg.num_warps, num_stages=1)
  return pallas_call_optional(kernel, args_specs, outs, grid=grid, compiler_params=params, interpret=cfg.interpret,
                              name=name)


def _rows(R: int, H: int, K: int) -> pl.BlockSpec:
  return pl.BlockSpec((R, H, K), lambda i: (i, 0, 0))


def _inputs(o_fa, o_la, w, z, zb, hs: Heads, R: int) -> list:
  H, K = hs.fa_heads + hs.la_heads, (o_fa if o_la is None else o_la).shape[-1]
  whole = lambda *shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
  return [(o_fa, _rows(R, hs.fa_heads, K)), (o_la, _rows(R, hs.la_heads, K)),
          (w if hs.scaled else None, whole(H, K)), (z, _rows(R, hs.la_heads, K)), (zb, whole(hs.la_heads, K))]


def forward(o_fa: Array | None, o_la: Array | None, w_HxK: Array | None, z: Array | None, zb: Array | None, *,
            hs: Heads, cfg: Config) -> Array:
  """Fused heads [N, H, K] in the outputs' dtype from o_fa [N, Hf, K], o_la [N, Hl, K] (N a multiple of
  cfg.block_rows), the [H, K] scale matrix, the gate pre-activation z [N, Hl, K] and its bias [Hl, K]."""
  o = o_fa if o_la is None else o_la
  N, K = o.shape[0], o.shape[-1]
  R = cfg.block_rows
  H = hs.fa_heads + hs.la_heads
  (y,) = _run(functools.partial(_fwd_kernel, hs=hs), cfg, (N // R,), _inputs(o_fa, o_la, w_HxK, z, zb, hs, R),
              [(jax.ShapeDtypeStruct((N, H, K), o.dtype), _rows(R, H, K))], "fusion_norm_fwd")
  return y


def backward(o_fa, o_la, w_HxK, z, zb, dy_NxHxK: Array, *, hs: Heads, cfg: Config) -> tuple:
  """(do_fa, do_la, dw [P, H, K], dz, dzb [P, Hl, K]); per-program (P = N / R) float32 partial sums for the
  scale matrix and the gate bias; None where the input is None."""
  o = o_fa if o_la is None else o_la
  N, K = o.shape[0], o.shape[-1]
  R = cfg.block_rows
  P, H, Hf, Hl = N // R, hs.fa_heads + hs.la_heads, hs.fa_heads, hs.la_heads
  partial = lambda n: (jax.ShapeDtypeStruct((P, n, K), f32), pl.BlockSpec((None, n, K), lambda i: (i, 0, 0)))  # noqa: E731
  like = lambda x, n: None if x is None else (jax.ShapeDtypeStruct((N, n, K), x.dtype), _rows(R, n, K))  # noqa: E731
  outs = [like(o_fa, Hf), like(o_la, Hl), partial(H) if hs.scaled else None, like(z, Hl),
          partial(Hl) if zb is not None else None]
  res = iter(_run(functools.partial(_bwd_kernel, hs=hs), cfg, (P,),
                  _inputs(o_fa, o_la, w_HxK, z, zb, hs, R) + [(dy_NxHxK, _rows(R, H, K))], outs, "fusion_norm_bwd"))
  return tuple(None if spec is None else next(res) for spec in outs)
