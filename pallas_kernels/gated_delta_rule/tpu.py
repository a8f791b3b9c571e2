"""Pallas Mosaic TPU kernels of the chunked gated delta rule, forward and backward.

No TPU is available to this project: the module is checked in TPU interpret mode on CPU
(``pltpu.InterpretParams``, uninitialised memory = NaN, so an unwritten output fails the tests).

TPU layout rules drive the differences from the Triton module:
- head-major [B, H, T, D] arrays (the wrapper transposes), so every block's last two dims are (C, D) or full;
- the grid is (B, H, chunks): the sequential passes make the chunk axis 'arbitrary' and keep the float32 state
  in a VMEM scratch; the reverse pass walks chunks through its index maps;
- per-token scalars come as columns [.., C, 1] and, for the lane-major side of C x C masks, as rows [.., 1, C];
  column sums are matmuls with a ones column, so no vector transposes are needed;
- the backward's chunk-parallel part is one kernel (VMEM holds its tiles; no register pressure to split for).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gated_delta_rule.chunk_math import mm, strict_lower, unit_lower_inverse
from pallas_kernels.optional_refs import pallas_call_optional

Array = jax.Array
f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
  save_inverse: bool = True  # keep T = (I + A)^-1 from forward to backward
  interpret: bool = False


INTERPRET = Config(interpret=True)


def padded_dim(d: int) -> int:
  """Head dim (K or V) the kernels run at: unchanged, every block spans the whole K and V (legal for any size)."""
  return d


class _Gates:
  """Chunk decay as columns [C, 1] (d, e), a [1, 1] gam and the masked C x C Gam."""

  def __init__(self, gcc_Cx1, gcr_1xC, sidc_Cx1, sidr_1xC):
    C = gcc_Cx1.shape[0]
    row_CxC = lax.broadcasted_iota(jnp.int32, (C, C), 0)
    col_CxC = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    keep_CxC = row_CxC >= col_CxC
    gl_1x1 = gcr_1xC[:, C - 1:C]
    if sidc_Cx1 is not None:
      keep_CxC = keep_CxC & (sidc_Cx1 == sidr_1xC)
    self.gam_CxC = jnp.exp(jnp.where(keep_CxC, gcc_Cx1 - gcr_1xC, -jnp.inf))
    self.d_Cx1 = jnp.exp(gcc_Cx1)
    self.e_Cx1 = jnp.exp(gl_1x1 - gcc_Cx1)
    self.gam_1x1 = jnp.exp(gl_1x1)
    if sidc_Cx1 is not None:
      sl_1x1 = sidr_1xC[:, C - 1:C]
      self.d_Cx1 = jnp.where(sidc_Cx1 == 0, self.d_Cx1, 0.0)
      self.e_Cx1 = jnp.where(sidc_Cx1 == sl_1x1, self.e_Cx1, 0.0)
      self.gam_1x1 = jnp.where(sl_1x1 == 0, self.gam_1x1, 0.0)


def _gates(gcc_ref, gcr_ref, sidc_ref, sidr_ref) -> _Gates:
  sidc = None if sidc_ref is None else sidc_ref[...]
  sidr = None if sidr_ref is None else sidr_ref[...]
  return _Gates(gcc_ref[...], gcr_ref[...], sidc, sidr)


def _rowsum(x):
  return jnp.sum(x, axis=1, keepdims=True)


def _colsum(x_CxC):
  """Column sums of a C x C matrix, returned as a [C, 1] column (a matmul: no transpose)."""
  return mm(x_CxC, jnp.ones((x_CxC.shape[0], 1), f32), ta=True, precision=lax.Precision.HIGHEST)


def _last_Cx1(C: int, x_1x1):
  return jnp.where(lax.broadcasted_iota(jnp.int32, (C, 1), 0) == C - 1, x_1x1, 0.0)


def _prec(cd):
  return lax.Precision.HIGHEST if jnp.dtype(cd) == jnp.float32 else None


def _wy_fwd_kernel(q_ref, k_ref, v_ref, gcc_ref, gcr_ref, beta_ref, sidc_ref, sidr_ref, tin_ref, w_ref, u_ref,
                   p_ref, tout_ref, *, scale):
  cd = w_ref.dtype
  prec = _prec(cd)
  gt = _gates(gcc_ref, gcr_ref, sidc_ref, sidr_ref)
  k_CxK, beta_Cx1 = k_ref[...], beta_ref[...]
  if tin_ref is None:
    a_CxC = strict_lower(beta_Cx1 * mm(k_CxK, k_CxK, tb=True, precision=prec) * gt.gam_CxC)
    t_CxC = unit_lower_inverse(a_CxC, lax.Precision.HIGHEST)
    if tout_ref is not None:
      tout_ref[...] = t_CxC
  else:
    t_CxC = tin_ref[...]
  t_c = t_CxC.astype(cd)
  w_ref[...] = mm(t_c, (k_CxK.astype(f32) * beta_Cx1 * gt.d_Cx1).astype(cd), precision=prec).astype(cd)
  u_ref[...] = mm(t_c, (v_ref[...].astype(f32) * beta_Cx1).astype(cd), precision=prec).astype(cd)
  p_ref[...] = (scale * mm(q_ref[...], k_CxK, tb=True, precision=prec) * gt.gam_CxC).astype(cd)


def _state_fwd_kernel(q_ref, k_ref, w_ref, u_ref, p_ref, gcc_ref, gcr_ref, sidc_ref, sidr_ref, h0_ref, o_ref,
                      ht_ref, hs_ref, vn_ref, s_ref, *, scale, N):
  cd = w_ref.dtype
  prec = _prec(cd)
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _():
    s_ref[...] = h0_ref[...].astype(f32)

  gt = _gates(gcc_ref, gcr_ref, sidc_ref, sidr_ref)
  s_KxV = s_ref[...]
  s_c = s_KxV.astype(cd)
  if hs_ref is not None:
    hs_ref[...] = s_c
  vn_CxV = u_ref[...].astype(f32) - mm(w_ref[...], s_c, precision=prec)
  vn_c = vn_CxV.astype(cd)
  if vn_ref is not None:
    vn_ref[...] = vn_c
  if o_ref is not None:
    o_CxV = scale * gt.d_Cx1 * mm(q_ref[...], s_c, precision=prec) + mm(p_ref[...], vn_c, precision=prec)
    o_ref[...] = o_CxV.astype(o_ref.dtype)
  s_KxV = gt.gam_1x1 * s_KxV + mm(k_ref[...], (vn_CxV * gt.e_Cx1).astype(cd), ta=True, precision=prec)
  s_ref[...] = s_KxV

  @pl.when(n == N - 1)
  def _():
    ht_ref[...] = s_KxV


def _state_bwd_kernel(q_ref, k_ref, w_ref, p_ref, gcc_ref, gcr_ref, sidc_ref, sidr_ref, do_ref, dht_ref, dvn_ref,
                      dhs_ref, dh0_ref, ds_ref, *, scale, N):
  """Grid step j handles chunk N-1-j (the index maps reverse the chunk axis)."""
  cd = w_ref.dtype
  prec = _prec(cd)
  j = pl.program_id(2)

  @pl.when(j == 0)
  def _():
    ds_ref[...] = dht_ref[...].astype(f32)

  gt = _gates(gcc_ref, gcr_ref, sidc_ref, sidr_ref)
  ds_KxV = ds_ref[...]
  ds_c = ds_KxV.astype(cd)
  dhs_ref[...] = ds_c
  do_CxV = do_ref[...]
  dvn_CxV = mm(p_ref[...], do_CxV, ta=True, precision=prec) + gt.e_Cx1 * mm(k_ref[...], ds_c, precision=prec)
  dvn_c = dvn_CxV.astype(cd)
  dvn_ref[...] = dvn_c
  dod_c = (do_CxV.astype(f32) * (scale * gt.d_Cx1)).astype(cd)
  ds_KxV = (gt.gam_1x1 * ds_KxV + mm(q_ref[...], dod_c, ta=True, precision=prec)
            - mm(w_ref[...], dvn_c, ta=True, precision=prec))
  ds_ref[...] = ds_KxV

  @pl.when(j == N - 1)
  def _():
    dh0_ref[...] = ds_KxV


def _bwd_kernel(q_ref, k_ref, v_ref, gcc_ref, gcr_ref, beta_ref, sidc_ref, sidr_ref, t_ref, hs_ref, dhs_ref,
                vn_ref, dvn_ref, do_ref, dq_ref, dk_ref, dv_ref, dbeta_ref, dgc_ref, *, scale):
  """All chunk-parallel gradients: read-out / hand-off / Vn = U - W S, then W = T (beta d K), U = T (beta V)."""
  cd = k_ref.dtype
  prec, hi = _prec(cd), lax.Precision.HIGHEST
  gt = _gates(gcc_ref, gcr_ref, sidc_ref, sidr_ref)
  C = gcc_ref.shape[0]
  q_CxK, k_CxK, v_CxV, beta_Cx1 = q_ref[...], k_ref[...], v_ref[...], beta_ref[...]
  s_KxV, ds_KxV, vn_CxV, do_CxV, dvn_CxV = hs_ref[...], dhs_ref[...], vn_ref[...], do_ref[...], dvn_ref[...]
  qf, kf, vf = q_CxK.astype(f32), k_CxK.astype(f32), v_CxV.astype(f32)
  # Read-out o = scale d Q S + P Vn and hand-off S' = gam S + K^T diag(e) Vn.
  x_CxK = mm(do_CxV, s_KxV, tb=True, precision=prec)
  y_CxK = mm(vn_CxV, ds_KxV, tb=True, precision=prec)
  dw_CxK = -mm(dvn_CxV, s_KxV, tb=True, precision=prec)
  pm_CxC = scale * mm(do_CxV, vn_CxV, tb=True, precision=prec) * gt.gam_CxC
  pm_c = pm_CxC.astype(cd)
  dq_inter = x_CxK * (scale * gt.d_Cx1)
  dq_ref[...] = (dq_inter + mm(pm_c, k_CxK, precision=prec)).astype(dq_ref.dtype)
  dk_CxK = mm(pm_c, q_CxK, ta=True, precision=prec) + y_CxK * gt.e_Cx1
  g1_CxC = pm_CxC * mm(q_CxK, k_CxK, tb=True, precision=prec)
  z_Cx1 = gt.e_Cx1 * _rowsum(kf * y_CxK)
  dgam_1x1 = jnp.sum(_rowsum(s_KxV.astype(f32) * ds_KxV.astype(f32)), axis=0, keepdims=True)
  dgc_Cx1 = (_rowsum(qf * dq_inter) + _rowsum(g1_CxC) - _colsum(g1_CxC) - z_Cx1
             + _last_Cx1(C, jnp.sum(z_Cx1, axis=0, keepdims=True) + gt.gam_1x1 * dgam_1x1))
  # WY factors.
  kk_CxC = mm(k_CxK, k_CxK, tb=True, precision=prec)
  a_CxC = strict_lower(beta_Cx1 * kk_CxC * gt.gam_CxC)
  t_CxC = unit_lower_inverse(a_CxC, hi) if t_ref is None else t_ref[...]
  bd_Cx1 = beta_Cx1 * gt.d_Cx1
  kb_CxK, vb_CxV = kf * bd_Cx1, vf * beta_Cx1
  dw_c, t_c = dw_CxK.astype(cd), t_CxC.astype(cd)
  dt_CxC = (mm(dw_c, kb_CxK.astype(cd), tb=True, precision=prec)
            + mm(dvn_CxV, vb_CxV.astype(cd), tb=True, precision=prec))
  dkb_CxK = mm(t_c, dw_c, ta=True, precision=prec)
  dvb_CxV = mm(t_c, dvn_CxV, ta=True, precision=prec)
  da_CxC = -strict_lower(mm(mm(t_CxC, dt_CxC, ta=True, precision=hi), t_CxC, tb=True, precision=hi))
  m_CxC = da_CxC * gt.gam_CxC
  mb_c = (beta_Cx1 * m_CxC).astype(cd)
  dk_CxK = dk_CxK + dkb_CxK * bd_Cx1 + mm(mb_c, k_CxK, precision=prec) + mm(mb_c, k_CxK, ta=True, precision=prec)
  dk_ref[...] = dk_CxK.astype(dk_ref.dtype)
  dv_ref[...] = (dvb_CxV * beta_Cx1).astype(dv_ref.dtype)
  dbeta_ref[...] = gt.d_Cx1 * _rowsum(kf * dkb_CxK) + _rowsum(vf * dvb_CxV) + _rowsum(m_CxC * kk_CxC)
  g2_CxC = da_CxC * a_CxC
  dgc_ref[...] = dgc_Cx1 + _rowsum(kb_CxK * dkb_CxK) + _rowsum(g2_CxC) - _colsum(g2_CxC)


# ------------------------------------------------------------------------------------------ pallas_calls


class _Specs:
  """BlockSpecs over the grid (B, H, N) of head-major arrays; ``rev`` walks the chunk axis backwards."""

  def __init__(self, C: int, N: int, rev: bool = False):
    self.C, self.N, self.rev = C, N, rev

  def _n(self, n):
    return self.N - 1 - n if self.rev else n

  def tok(self, width: int) -> pl.BlockSpec:  # [B, H, T, width]
    return pl.BlockSpec((None, None, self.C, width), lambda b, h, n: (b, h, self._n(n), 0))

  def row(self) -> pl.BlockSpec:  # [B, H, N, 1, C]
    return pl.BlockSpec((None, None, None, 1, self.C), lambda b, h, n: (b, h, self._n(n), 0, 0))

  def seg_col(self) -> pl.BlockSpec:  # [B, T, 1]
    return pl.BlockSpec((None, self.C, 1), lambda b, h, n: (b, self._n(n), 0))

  def seg_row(self) -> pl.BlockSpec:  # [B, N, 1, C]
    return pl.BlockSpec((None, None, 1, self.C), lambda b, h, n: (b, self._n(n), 0, 0))

  def states(self, K: int, V: int) -> pl.BlockSpec:  # [B, H, N, K, V]
    return pl.BlockSpec((None, None, None, K, V), lambda b, h, n: (b, h, self._n(n), 0, 0))

  @staticmethod
  def state(K: int, V: int) -> pl.BlockSpec:  # [B, H, K, V], resident across the chunk axis
    return pl.BlockSpec((None, None, K, V), lambda b, h, n: (b, h, 0, 0))


def _run(kernel, cfg, grid, args_specs, outs, sequential=False, scratch=(), n_scratch=0):
  """args_specs: [(array or None, spec)]; outs: [(ShapeDtypeStruct, spec) or None]."""
  sem = ("parallel", "parallel", "arbitrary" if sequential else "parallel")
  interpret = pltpu.InterpretParams(uninitialized_memory="nan") if cfg.interpret else False
  return pallas_call_optional(kernel, args_specs, outs, n_scratch=n_scratch, grid=grid,
                              scratch_shapes=list(scratch), interpret=interpret,
                              compiler_params=pltpu.CompilerParams(dimension_semantics=sem))


def _gate_args(sp: _Specs, gcc, gcr, sidc, sidr):
  return [(gcc, sp.tok(1)), (gcr, sp.row()), (sidc, sp.seg_col()), (sidr, sp.seg_row())]


def _prep(q, k, v, gc, beta, sid, C):
  """Head-major tensors and column / row gate layouts from the glue's [B, T, H, *] / [B, H, T] inputs."""
  B, Tp, H, K = q.shape
  N = Tp // C
  hm = lambda x: None if x is None else x.transpose(0, 2, 1, 3)  # noqa: E731
  gcc, gcr = gc[..., None], gc.reshape(B, H, N, 1, C)
  sidc = None if sid is None else sid[..., None]
  sidr = None if sid is None else sid.reshape(B, N, 1, C)
  return hm(q), hm(k), hm(v), gcc, gcr, beta[..., None], sidc, sidr


def _forward_hm(q, k, v, gcc, gcr, beta, sidc, sidr, h0, t_in, *, C, scale, out_dtype, cfg, emit_t, store):
  B, H, Tp, K = q.shape
  V = v.shape[-1]
  N = Tp // C
  cd = k.dtype
  sp = _Specs(C, N)
  emit_t = emit_t and t_in is None
  tok = lambda width, dt: (jax.ShapeDtypeStruct((B, H, Tp, width), dt), sp.tok(width))  # noqa: E731
  w, u, p, *t = _run(functools.partial(_wy_fwd_kernel, scale=scale), cfg, (B, H, N),
                     [(q, sp.tok(K)), (k, sp.tok(K)), (v, sp.tok(V)), (gcc, sp.tok(1)), (gcr, sp.row()),
                      (beta, sp.tok(1)), (sidc, sp.seg_col()), (sidr, sp.seg_row()), (t_in, sp.tok(C))],
                     [tok(K, cd), tok(V, cd), tok(C, cd), tok(C, f32) if emit_t else None])
  outs = [None if store else tok(V, out_dtype), (jax.ShapeDtypeStruct((B, H, K, V), f32), sp.state(K, V)),
          (jax.ShapeDtypeStruct((B, H, N, K, V), cd), sp.states(K, V)) if store else None,
          tok(V, cd) if store else None]
  res = _run(functools.partial(_state_fwd_kernel, scale=scale, N=N), cfg, (B, H, N),
             [(q, sp.tok(K)), (k, sp.tok(K)), (w, sp.tok(K)), (u, sp.tok(V)), (p, sp.tok(C))]
             + _gate_args(sp, gcc, gcr, sidc, sidr) + [(h0, sp.state(K, V))],
             outs, sequential=True, scratch=[pltpu.VMEM((K, V), f32)], n_scratch=1)
  return (w, p, t[0] if t else t_in), res


def forward(q, k, v, gc, beta, sid, h0, *, C: int, scale: float, out_dtype, cfg: Config, save: bool = False):
  """(o [B, Tp, H, V], final state, saved T or None) from the glue's prepared inputs."""
  qh, kh, vh, gcc, gcr, bc, sidc, sidr = _prep(q, k, v, gc, beta, sid, C)
  (_, _, t), (o, ht) = _forward_hm(qh, kh, vh, gcc, gcr, bc, sidc, sidr, h0, None, C=C, scale=scale,
                                   out_dtype=out_dtype, cfg=cfg, emit_t=save and cfg.save_inverse, store=False)
  return o.transpose(0, 2, 1, 3), ht, t


def backward(q, k, v, gc, beta, sid, h0, t, do, dht, *, C: int, scale: float, cfg: Config):
  """(dq, dk, dv, dgc, dbeta, dh0) in the glue's layouts; recomputes W, U, P and the chunk-entry states."""
  qh, kh, vh, gcc, gcr, bc, sidc, sidr = _prep(q, k, v, gc, beta, sid, C)
  B, H, Tp, K = qh.shape
  V = vh.shape[-1]
  N = Tp // C
  cd = kh.dtype
  (w, p, t), (_, hs, vn) = _forward_hm(qh, kh, vh, gcc, gcr, bc, sidc, sidr, h0, t, C=C, scale=scale,
                                       out_dtype=cd, cfg=cfg, emit_t=False, store=True)
  doh = do.transpose(0, 2, 1, 3)
  rv = _Specs(C, N, rev=True)
  dvn, dhs, dh0 = _run(functools.partial(_state_bwd_kernel, scale=scale, N=N), cfg, (B, H, N),
                       [(qh, rv.tok(K)), (kh, rv.tok(K)), (w, rv.tok(K)), (p, rv.tok(C))]
                       + _gate_args(rv, gcc, gcr, sidc, sidr) + [(doh, rv.tok(V)), (dht, rv.state(K, V))],
                       [(jax.ShapeDtypeStruct((B, H, Tp, V), cd), rv.tok(V)),
                        (jax.ShapeDtypeStruct((B, H, N, K, V), cd), rv.states(K, V)),
                        (jax.ShapeDtypeStruct((B, H, K, V), f32), rv.state(K, V))],
                       sequential=True, scratch=[pltpu.VMEM((K, V), f32)], n_scratch=1)
  sp = _Specs(C, N)
  tok = lambda width, dt: (jax.ShapeDtypeStruct((B, H, Tp, width), dt), sp.tok(width))  # noqa: E731
  dq, dk, dv, dbeta, dgc = _run(
      functools.partial(_bwd_kernel, scale=scale), cfg, (B, H, N),
      [(qh, sp.tok(K)), (kh, sp.tok(K)), (vh, sp.tok(V)), (gcc, sp.tok(1)), (gcr, sp.row()), (bc, sp.tok(1)),
       (sidc, sp.seg_col()), (sidr, sp.seg_row()), (t, sp.tok(C)), (hs, sp.states(K, V)),
       (dhs, sp.states(K, V)), (vn, sp.tok(V)), (dvn, sp.tok(V)), (doh, sp.tok(V))],
      [tok(K, q.dtype), tok(K, k.dtype), tok(V, v.dtype), tok(1, f32), tok(1, f32)])
  bm = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
  return bm(dq), bm(dk), bm(dv), dgc[..., 0], dbeta[..., 0], dh0
