"""Pallas (Triton backend) kernels of the chunked gated delta rule, forward and backward.

Kernels (grid over batch and head; the fla-style split of parallel and sequential work):
  wy_fwd     parallel over chunks: decay, A = StrictTril(beta K K^T Gam), T = (I + A)^-1 (doubling on the
             matrix units), W = T (beta d K), U = T (beta V), P = scale (Q K^T Gam); writes W, U, P and,
             under grad, T (float32, saved for the backward, which then skips the inverse).
  state_fwd  sequential over chunks, grid also over V tiles: float32 state in registers,
             Vn = U - W S, O = scale (d Q) S + P Vn, S <- gam S + (e K)^T Vn; optionally writes the
             chunk-entry states and Vn (for the backward).
  state_bwd  sequential in reverse: dVn = P^T dO + (e K) dS', dS <- gam dS' + scale (d Q)^T dO - W^T dVn.
  dqk        parallel over chunks: dq (complete), the read-out / hand-off parts of dk and dgc, and dW.
  wy_bwd     parallel over chunks: back-propagates W, U and T into dk, dv, dbeta, dgc.
  output     (fwd_split only) parallel read-out of O from stored chunk states and Vn.
The backward recomputes W, U, P and the chunk-entry states (only the inputs and T are saved between forward
and backward, unless save_states). Arrays keep the caller's [B, T, H, *] layout (no transposes); the gate,
beta and segment vectors come as [B, H, T] / [B, T].

In Pallas interpret mode (CPU tests) the same kernels run with every chunk in one program
(chunks_per_program=0) and one V tile, so the grid stays at B x H.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.gated_delta_rule.chunk_math import (Decay, chunk_decay, chunk_vectors, mm, one_hot_last,
                                                        strict_lower, unit_lower_inverse, wy_matrix)
from pallas_kernels.optional_refs import pallas_call_optional

Array = jax.Array
f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
  """Tiling and precision of the Triton kernels (hashable: a static argument)."""
  block_v: int = 16  # V tile of the sequential kernels (grid B x H x V/block_v)
  chunks_per_program: int = 1  # chunks per program in the parallel kernels; 0: all of them
  warps_seq: int = 4
  warps_par: int = 4
  warps_dqk: int = 8
  warps_wyb: int = 4
  stages: int = 2  # software-pipelining depth of the chunk-parallel kernels
  stages_seq: int = 3  # ... and of the sequential state passes (loads of chunk n+1.. overlap chunk n)
  inv_precision: str = "tf32"  # dots of the 64x64 inverse: 'tf32' | 'tf32x3' | 'bf16x3' | 'ieee'
  inv_block: int = 4  # diagonal blocks of the inverse solved by substitution, then merged (chunk_math)
  save_inverse: bool = True  # keep T = (I + A)^-1 (float32, [B, H, T, C]) from forward to backward
  dqk_block: int = 0  # K / V tile of the dqk kernel (0: whole K, V)
  wyb_block: int = 64  # K / V tile of the wy_bwd kernel
  fwd_split: bool = False  # forward: state pass writes chunk states + Vn, a parallel kernel reads out o
  save_states: bool = True  # under grad: keep chunk states + Vn from the forward (no state recompute backward)
  save_wp: bool = True  # under grad: keep W and P from the forward (no wy_fwd recompute backward)
  interpret: bool = False


INTERPRET = Config(block_v=0, chunks_per_program=0, dqk_block=16, wyb_block=16, interpret=True)  # tiled paths


def padded_dim(d: int) -> int:
  """Head dim (K or V) the kernels run at: a power of two (Triton's tensor sizes), at least 16 (its dot tiles).

  ops.py zero-pads K and V to it; every tile width below then divides it (the tiles are powers of two too)."""
  return max(16, 1 << (d - 1).bit_length())


def _tile(dim: int, block: int, what: str) -> int:
  """Tile width of ``block`` (0: the whole dim) over ``dim``; a ValueError unless it divides dim (the kernels
  loop over dim // width tiles, so a remainder would be silently skipped)."""
  width = dim if block == 0 else min(block, dim)
  if dim % width:
    raise ValueError(f"gated delta rule (Triton): {what} tile {width} does not divide the head dim {dim}; "
                     "call through ops.gated_delta_rule_pallas (it pads K and V to padded_dim)")
  return width

_PRECISIONS = {
    "ieee": lax.Precision.HIGHEST,
    "tf32": lax.Precision.DEFAULT,
    "tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
    "bf16x3": lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
}


def _precisions(cfg: Config, cd) -> tuple:
  """(precision of the data matmuls, precision of the float32 inverse matmuls)."""
  if cfg.interpret:
    return lax.Precision.HIGHEST, lax.Precision.HIGHEST
  main = lax.Precision.HIGHEST if jnp.dtype(cd) == jnp.float32 else None
  inv = lax.Precision.HIGHEST if jnp.dtype(cd) == jnp.float32 else _PRECISIONS[cfg.inv_precision]
  return main, inv


def _loop(n: int, body, init, reverse: bool = False):
  if n == 1:
    return body(0, init)
  if reverse:
    return lax.fori_loop(0, n, lambda i, c: body(n - 1 - i, c), init)
  return lax.fori_loop(0, n, body, init)


def _rows(ref, t0, C):
  return ref[pl.ds(t0, C), :]


def _vec(ref, t0, C):
  return ref[pl.ds(t0, C)]


def _decay_at(gc_ref, sid_ref, t0, C) -> Decay:
  sid = None if sid_ref is None else _vec(sid_ref, t0, C)
  sid_last = None if sid_ref is None else sid_ref[t0 + C - 1]
  return chunk_decay(_vec(gc_ref, t0, C), gc_ref[t0 + C - 1], sid, sid_last)


def _scale_rows(x, s_C, dtype):
  return (x.astype(f32) * s_C[:, None]).astype(dtype)


# ----------------------------------------------------------------------------------------------- kernels


def _vectors_at(gc_ref, sid_ref, t0, C):
  sid = None if sid_ref is None else _vec(sid_ref, t0, C)
  sid_last = None if sid_ref is None else sid_ref[t0 + C - 1]
  return chunk_vectors(_vec(gc_ref, t0, C), gc_ref[t0 + C - 1], sid, sid_last)


def _wy_fwd_kernel(q_ref, k_ref, v_ref, gc_ref, beta_ref, sid_ref, tin_ref, w_ref, u_ref, p_ref, tout_ref, *,
                   C, L, scale, prec, inv_prec, inv_block):
  """W, U, P of each chunk; T = (I + A)^-1 computed (optionally written) or read from a saved one."""
  cd = w_ref.dtype

  def chunk(i, carry):
    t0 = i * C
    k_CxK, q_CxK = _rows(k_ref, t0, C), _rows(q_ref, t0, C)
    beta_C = _vec(beta_ref, t0, C)
    dec = _decay_at(gc_ref, sid_ref, t0, C)
    if tin_ref is None:
      _, _, t_CxC = wy_matrix(k_CxK, beta_C, dec, prec, inv_prec, inv_block)
      if tout_ref is not None:
        tout_ref[pl.ds(t0, C), :] = t_CxC
    else:
      t_CxC = _rows(tin_ref, t0, C)
    t_CxC = t_CxC.astype(cd)
    w_ref[pl.ds(t0, C), :] = mm(t_CxC, _scale_rows(k_CxK, beta_C * dec.d_C, cd), precision=prec).astype(cd)
    u_ref[pl.ds(t0, C), :] = mm(t_CxC, _scale_rows(_rows(v_ref, t0, C), beta_C, cd), precision=prec).astype(cd)
    p_CxC = scale * mm(q_CxK, k_CxK, tb=True, precision=prec) * dec.gam_CxC
    p_ref[pl.ds(t0, C), :] = p_CxC.astype(cd)
    return carry

  _loop(L, chunk, 0)


def _state_fwd_kernel(q_ref, k_ref, w_ref, u_ref, p_ref, gc_ref, sid_ref, h0_ref, o_ref, ht_ref, hs_ref,
                      vn_ref, *, C, N, scale, prec):
  """Sequential pass; row scalings go on the small [C, block_v] operands so Q, K, W, P feed the dots as loaded."""
  cd = w_ref.dtype

  def chunk(n, s_KxV):
    t0 = n * C
    d_C, e_C, gam_last = _vectors_at(gc_ref, sid_ref, t0, C)
    s_c = s_KxV.astype(cd)
    if hs_ref is not None:
      hs_ref[n] = s_c
    vn_CxV = _rows(u_ref, t0, C).astype(f32) - mm(_rows(w_ref, t0, C), s_c, precision=prec)
    vn_c = vn_CxV.astype(cd)
    if vn_ref is not None:
      vn_ref[pl.ds(t0, C), :] = vn_c
    if o_ref is not None:
      o_CxV = ((scale * d_C)[:, None] * mm(_rows(q_ref, t0, C), s_c, precision=prec)
               + mm(_rows(p_ref, t0, C), vn_c, precision=prec))
      o_ref[pl.ds(t0, C), :] = o_CxV.astype(o_ref.dtype)
    ve_c = (vn_CxV * e_C[:, None]).astype(cd)
    return gam_last * s_KxV + mm(_rows(k_ref, t0, C), ve_c, ta=True, precision=prec)

  ht_ref[...] = _loop(N, chunk, h0_ref[...].astype(f32))


def _state_bwd_kernel(q_ref, k_ref, w_ref, p_ref, gc_ref, sid_ref, do_ref, dht_ref, dvn_ref, dhs_ref, dh0_ref,
                      *, C, N, scale, prec):
  cd = w_ref.dtype

  def chunk(n, ds_KxV):
    t0 = n * C
    d_C, e_C, gam_last = _vectors_at(gc_ref, sid_ref, t0, C)
    ds_c = ds_KxV.astype(cd)
    dhs_ref[n] = ds_c
    do_CxV = _rows(do_ref, t0, C)
    dvn_CxV = (mm(_rows(p_ref, t0, C), do_CxV, ta=True, precision=prec)
               + e_C[:, None] * mm(_rows(k_ref, t0, C), ds_c, precision=prec))
    dvn_c = dvn_CxV.astype(cd)
    dvn_ref[pl.ds(t0, C), :] = dvn_c
    dod_c = _scale_rows(do_CxV, scale * d_C, cd)
    return (gam_last * ds_KxV + mm(_rows(q_ref, t0, C), dod_c, ta=True, precision=prec)
            - mm(_rows(w_ref, t0, C), dvn_c, ta=True, precision=prec))

  dh0_ref[...] = _loop(N, chunk, dht_ref[...].astype(f32), reverse=True)


def _output_kernel(q_ref, p_ref, gc_ref, sid_ref, hs_ref, vn_ref, o_ref, *, C, L, scale, prec):
  """Chunk-parallel read-out o = scale (d Q) S + P Vn from stored chunk-entry states and Vn."""

  def chunk(i, carry):
    t0 = i * C
    d_C, _, _ = _vectors_at(gc_ref, sid_ref, t0, C)
    o_CxV = ((scale * d_C)[:, None] * mm(_rows(q_ref, t0, C), hs_ref[i], precision=prec)
             + mm(_rows(p_ref, t0, C), _rows(vn_ref, t0, C), precision=prec))
    o_ref[pl.ds(t0, C), :] = o_CxV.astype(o_ref.dtype)
    return carry

  _loop(L, chunk, 0)


def _cols(ref, t0, C, j, b):
  """Rows t0..t0+C, column tile j of width b."""
  return ref[pl.ds(t0, C), pl.ds(j * b, b)]


def _acc(total, x):
  return x if total is None else total + x


def _tile_sum(terms):
  total = None
  for x in terms:
    total = _acc(total, x)
  return total


def _dqk_kernel(q_ref, k_ref, gc_ref, sid_ref, hs_ref, dhs_ref, vn_ref, dvn_ref, do_ref, dq_ref, dk_ref, dw_ref,
                dgc_ref, *, C, L, scale, prec, bk, bv):
  """Gradients through o = scale (d Q) S + P Vn, the hand-off gam S + (e K)^T Vn and Vn = U - W S:
  dq (complete), the partial dk, dW and the partial d gc. Works on [C, bk] / [bk, bv] tiles."""
  cd = hs_ref.dtype
  nk, nv = q_ref.shape[-1] // bk, vn_ref.shape[-1] // bv

  def chunk(i, carry):
    t0 = i * C
    dec = _decay_at(gc_ref, sid_ref, t0, C)
    dp_CxC = _tile_sum(mm(_cols(do_ref, t0, C, j, bv), _cols(vn_ref, t0, C, j, bv), tb=True, precision=prec)
                       for j in range(nv))
    qk_CxC = _tile_sum(mm(_cols(q_ref, t0, C, j, bk), _cols(k_ref, t0, C, j, bk), tb=True, precision=prec)
                       for j in range(nk))
    pm_CxC = scale * dp_CxC * dec.gam_CxC
    pm_c = pm_CxC.astype(cd)
    g1_CxC = pm_CxC * qk_CxC
    dgc_C = jnp.sum(g1_CxC, axis=1) - jnp.sum(g1_CxC, axis=0)
    zsum, dgam = 0.0, 0.0
    for kb in range(nk):
      x, y, dw = None, None, None
      for j in range(nv):
        s_c = hs_ref[i, pl.ds(kb * bk, bk), pl.ds(j * bv, bv)]
        ds_c = dhs_ref[i, pl.ds(kb * bk, bk), pl.ds(j * bv, bv)]
        x = _acc(x, mm(_cols(do_ref, t0, C, j, bv), s_c, tb=True, precision=prec))
        y = _acc(y, mm(_cols(vn_ref, t0, C, j, bv), ds_c, tb=True, precision=prec))
        dw = _acc(dw, mm(_cols(dvn_ref, t0, C, j, bv), s_c, tb=True, precision=prec))
        dgam = dgam + jnp.sum(jnp.sum(s_c.astype(f32) * ds_c.astype(f32), axis=1), axis=0)
      q_c, k_c = _cols(q_ref, t0, C, kb, bk), _cols(k_ref, t0, C, kb, bk)
      dq_inter = x * (scale * dec.d_C)[:, None]
      dq = dq_inter + mm(pm_c, k_c, precision=prec)
      dk = mm(pm_c, q_c, ta=True, precision=prec) + y * dec.e_C[:, None]
      z_C = dec.e_C * jnp.sum(k_c.astype(f32) * y, axis=1)
      dgc_C = dgc_C + jnp.sum(q_c.astype(f32) * dq_inter, axis=1) - z_C
      zsum = zsum + jnp.sum(z_C)
      dq_ref[pl.ds(t0, C), pl.ds(kb * bk, bk)] = dq.astype(dq_ref.dtype)
      dk_ref[pl.ds(t0, C), pl.ds(kb * bk, bk)] = dk.astype(dk_ref.dtype)
      dw_ref[pl.ds(t0, C), pl.ds(kb * bk, bk)] = (-dw).astype(dw_ref.dtype)
    dgc_ref[pl.ds(t0, C)] = dgc_C + one_hot_last(C, zsum + dec.gam_last * dgam)
    return carry

  _loop(L, chunk, 0)


def _wy_bwd_kernel(k_ref, v_ref, gc_ref, beta_ref, sid_ref, t_ref, dw_ref, du_ref, dk_part_ref, dgc_part_ref,
                   dk_ref, dv_ref, dbeta_ref, dgc_ref, *, C, L, prec, inv_prec, inv_block, bk, bv):
  """Gradients through W = T diag(beta d) K, U = T diag(beta) V, T = (I + A)^-1 on [C, bk] / [C, bv] tiles."""
  cd = k_ref.dtype
  nk, nv = k_ref.shape[-1] // bk, v_ref.shape[-1] // bv

  def chunk(i, carry):
    t0 = i * C
    dec = _decay_at(gc_ref, sid_ref, t0, C)
    beta_C = _vec(beta_ref, t0, C)
    bd_C = beta_C * dec.d_C
    kk_CxC = _tile_sum(mm(_cols(k_ref, t0, C, j, bk), _cols(k_ref, t0, C, j, bk), tb=True, precision=prec)
                       for j in range(nk))
    dt_CxC = _tile_sum(
        [mm(_cols(dw_ref, t0, C, j, bk).astype(cd), _scale_rows(_cols(k_ref, t0, C, j, bk), bd_C, cd), tb=True,
            precision=prec) for j in range(nk)]
        + [mm(_cols(du_ref, t0, C, j, bv), _scale_rows(_cols(v_ref, t0, C, j, bv), beta_C, cd), tb=True,
              precision=prec) for j in range(nv)])
    a_CxC = strict_lower(beta_C[:, None] * kk_CxC * dec.gam_CxC)
    t_CxC = unit_lower_inverse(a_CxC, inv_prec, inv_block) if t_ref is None else _rows(t_ref, t0, C)
    da_CxC = -strict_lower(mm(mm(t_CxC, dt_CxC, ta=True, precision=inv_prec), t_CxC, tb=True,
                              precision=inv_prec))
    m_CxC = da_CxC * dec.gam_CxC
    mb_c = (beta_C[:, None] * m_CxC).astype(cd)
    g2_CxC = da_CxC * a_CxC
    dbeta_C = jnp.sum(m_CxC * kk_CxC, axis=1)
    dgc_C = _vec(dgc_part_ref, t0, C) + jnp.sum(g2_CxC, axis=1) - jnp.sum(g2_CxC, axis=0)
    t_c = t_CxC.astype(cd)
    for j in range(nk):
      k_c = _cols(k_ref, t0, C, j, bk)
      dkb = mm(t_c, _cols(dw_ref, t0, C, j, bk).astype(cd), ta=True, precision=prec)
      kf = k_c.astype(f32)
      dk = (_cols(dk_part_ref, t0, C, j, bk).astype(f32) + dkb * bd_C[:, None] + mm(mb_c, k_c, precision=prec)
            + mm(mb_c, k_c, ta=True, precision=prec))
      dbeta_C = dbeta_C + dec.d_C * jnp.sum(kf * dkb, axis=1)
      dgc_C = dgc_C + bd_C * jnp.sum(kf * dkb, axis=1)
      dk_ref[pl.ds(t0, C), pl.ds(j * bk, bk)] = dk.astype(dk_ref.dtype)
    for j in range(nv):
      dvb = mm(t_c, _cols(du_ref, t0, C, j, bv), ta=True, precision=prec)
      dbeta_C = dbeta_C + jnp.sum(_cols(v_ref, t0, C, j, bv).astype(f32) * dvb, axis=1)
      dv_ref[pl.ds(t0, C), pl.ds(j * bv, bv)] = (dvb * beta_C[:, None]).astype(dv_ref.dtype)
    dbeta_ref[pl.ds(t0, C)] = dbeta_C
    dgc_ref[pl.ds(t0, C)] = dgc_C
    return carry

  _loop(L, chunk, 0)


# ------------------------------------------------------------------------------------------ pallas_calls


class _Specs:
  """BlockSpecs of a grid (B, H, J); ``rows`` tokens per block (J indexes token blocks or V tiles)."""

  def __init__(self, rows: int, by_rows: bool):
    self.rows, self.by_rows = rows, by_rows

  def tok(self, width: int, v_tiled: bool = False) -> pl.BlockSpec:  # [B, T, H, width]
    if self.by_rows:
      return pl.BlockSpec((None, self.rows, None, width), lambda b, h, j: (b, j, h, 0))
    return pl.BlockSpec((None, self.rows, None, width), lambda b, h, j: (b, 0, h, j if v_tiled else 0))

  def vec(self) -> pl.BlockSpec:  # [B, H, T]
    return pl.BlockSpec((None, None, self.rows), lambda b, h, j: (b, h, j if self.by_rows else 0))

  def mat(self, C: int) -> pl.BlockSpec:  # [B, H, T, C]
    return pl.BlockSpec((None, None, self.rows, C), lambda b, h, j: (b, h, j if self.by_rows else 0, 0))

  def seg(self) -> pl.BlockSpec:  # [B, T]
    return pl.BlockSpec((None, self.rows), lambda b, h, j: (b, j if self.by_rows else 0))

  def states(self, n: int, K: int, V: int) -> pl.BlockSpec:  # [B, H, N, K, V]
    if self.by_rows:
      return pl.BlockSpec((None, None, n, K, V), lambda b, h, j: (b, h, j, 0, 0))
    return pl.BlockSpec((None, None, n, K, V), lambda b, h, j: (b, h, 0, 0, j))

  @staticmethod
  def state(K: int, V: int) -> pl.BlockSpec:  # [B, H, K, V], V tiled
    return pl.BlockSpec((None, None, K, V), lambda b, h, j: (b, h, 0, j))


def _call(kernel, cfg: Config, grid, args_specs, outs, warps: int, name: str, cd=jnp.bfloat16) -> list:
  """args_specs: [(array or None, spec)]; outs: [(ShapeDtypeStruct, spec) or None], in the kernel's ref order."""
  stages = cfg.stages_seq if name.startswith("gdn_state") else cfg.stages
  stages = 1 if jnp.dtype(cd) == jnp.float32 else stages  # float32 tiles: no room for a second stage
  params = None if cfg.interpret else pltr.CompilerParams(num_warps=warps, num_stages=stages)
  return pallas_call_optional(kernel, args_specs, outs, grid=grid, compiler_params=params, interpret=cfg.interpret,
                              name=name)


def _par_layout(Tp: int, C: int, cfg: Config) -> tuple[int, int]:
  """(chunks per program L, number of programs along T) of the parallel kernels."""
  N = Tp // C
  L = N if cfg.chunks_per_program == 0 else cfg.chunks_per_program
  while N % L:
    L -= 1
  return L, N // L


def _block_v(V: int, cfg: Config) -> int:
  return _tile(V, cfg.block_v, "V (block_v)")


def wy_fwd(q, k, v, gc, beta, sid, t_in=None, *, C: int, scale: float, cfg: Config, emit_t: bool = False):
  """(W, U, P[, T]): T is computed (and returned when emit_t) unless a saved one is given."""
  B, Tp, H, K = k.shape
  V = v.shape[-1]
  cd = k.dtype
  L, J = _par_layout(Tp, C, cfg)
  sp = _Specs(L * C, by_rows=True)
  prec, inv = _precisions(cfg, cd)
  emit_t = emit_t and t_in is None
  kernel = functools.partial(_wy_fwd_kernel, C=C, L=L, scale=scale, prec=prec, inv_prec=inv,
                             inv_block=cfg.inv_block)
  args_specs = list(zip([q, k, v, gc, beta, sid, t_in],
                         [sp.tok(K), sp.tok(K), sp.tok(V), sp.vec(), sp.vec(), sp.seg(), sp.mat(C)]))
  outs = [(jax.ShapeDtypeStruct((B, Tp, H, K), cd), sp.tok(K)), (jax.ShapeDtypeStruct((B, Tp, H, V), cd), sp.tok(V)),
          (jax.ShapeDtypeStruct((B, H, Tp, C), cd), sp.mat(C)),
          (jax.ShapeDtypeStruct((B, H, Tp, C), f32), sp.mat(C)) if emit_t else None]
  return _call(kernel, cfg, (B, H, J), args_specs, outs, cfg.warps_par, "gdn_wy_fwd", cd)


def state_fwd(q, k, w, u, p, gc, sid, h0, *, C: int, scale: float, out_dtype, store: bool, cfg: Config,
              readout: bool | None = None):
  """(o if readout, final state, then chunk-entry states and Vn if store). readout defaults to not store."""
  readout = not store if readout is None else readout
  B, Tp, H, K = k.shape
  V = u.shape[-1]
  N = Tp // C
  cd = k.dtype
  bv = _block_v(V, cfg)
  sp = _Specs(Tp, by_rows=False)
  prec, _ = _precisions(cfg, cd)
  kernel = functools.partial(_state_fwd_kernel, C=C, N=N, scale=scale, prec=prec)
  args_specs = list(zip(
      [q, k, w, u, p, gc, sid, h0],
      [sp.tok(K), sp.tok(K), sp.tok(K), sp.tok(bv, True), sp.mat(C), sp.vec(), sp.seg(), sp.state(K, bv)]))
  outs = [(jax.ShapeDtypeStruct((B, Tp, H, V), out_dtype), sp.tok(bv, True)) if readout else None,
          (jax.ShapeDtypeStruct((B, H, K, V), f32), sp.state(K, bv)),
          (jax.ShapeDtypeStruct((B, H, N, K, V), cd), sp.states(N, K, bv)) if store else None,
          (jax.ShapeDtypeStruct((B, Tp, H, V), cd), sp.tok(bv, True)) if store else None]
  return _call(kernel, cfg, (B, H, V // bv), args_specs, outs, cfg.warps_seq, "gdn_state_fwd", cd)


def state_bwd(q, k, w, p, gc, sid, do, dht, *, C: int, scale: float, cfg: Config):
  B, Tp, H, K = k.shape
  V = do.shape[-1]
  N = Tp // C
  cd = k.dtype
  bv = _block_v(V, cfg)
  sp = _Specs(Tp, by_rows=False)
  prec, _ = _precisions(cfg, cd)
  kernel = functools.partial(_state_bwd_kernel, C=C, N=N, scale=scale, prec=prec)
  args_specs = list(zip(
      [q, k, w, p, gc, sid, do, dht],
      [sp.tok(K), sp.tok(K), sp.tok(K), sp.mat(C), sp.vec(), sp.seg(), sp.tok(bv, True), sp.state(K, bv)]))
  outs = [(jax.ShapeDtypeStruct((B, Tp, H, V), cd), sp.tok(bv, True)),
          (jax.ShapeDtypeStruct((B, H, N, K, V), cd), sp.states(N, K, bv)),
          (jax.ShapeDtypeStruct((B, H, K, V), f32), sp.state(K, bv))]
  return _call(kernel, cfg, (B, H, V // bv), args_specs, outs, cfg.warps_seq, "gdn_state_bwd", cd)


def _bwd_tiles(K: int, V: int, block: int, cd) -> dict:
  if jnp.dtype(cd) == jnp.float32:  # float32 tiles: keep shared memory in bounds
    block = 64 if block == 0 else min(block, 64)
  return dict(bk=_tile(K, block, "K (backward)"), bv=_tile(V, block, "V (backward)"))


def dqk(q, k, gc, sid, hs, dhs, vn, dvn, do, *, C: int, scale: float, dq_dtype, cfg: Config):
  B, Tp, H, K = k.shape
  V = vn.shape[-1]
  cd = k.dtype
  L, J = _par_layout(Tp, C, cfg)
  sp = _Specs(L * C, by_rows=True)
  prec, _ = _precisions(cfg, cd)
  kernel = functools.partial(_dqk_kernel, C=C, L=L, scale=scale, prec=prec, **_bwd_tiles(K, V, cfg.dqk_block, cd))
  args_specs = list(zip([q, k, gc, sid, hs, dhs, vn, dvn, do],
                         [sp.tok(K), sp.tok(K), sp.vec(), sp.seg(), sp.states(L, K, V), sp.states(L, K, V),
                          sp.tok(V), sp.tok(V), sp.tok(V)]))
  outs = [(jax.ShapeDtypeStruct((B, Tp, H, K), dq_dtype), sp.tok(K)),
          (jax.ShapeDtypeStruct((B, Tp, H, K), cd), sp.tok(K)), (jax.ShapeDtypeStruct((B, Tp, H, K), cd), sp.tok(K)),
          (jax.ShapeDtypeStruct((B, H, Tp), f32), sp.vec())]
  return _call(kernel, cfg, (B, H, J), args_specs, outs, cfg.warps_dqk, "gdn_dqk", cd)


def output(q, p, gc, sid, hs, vn, *, C: int, scale: float, out_dtype, cfg: Config):
  B, Tp, H, K = q.shape
  V = vn.shape[-1]
  cd = q.dtype
  L, J = _par_layout(Tp, C, cfg)
  sp = _Specs(L * C, by_rows=True)
  prec, _ = _precisions(cfg, cd)
  kernel = functools.partial(_output_kernel, C=C, L=L, scale=scale, prec=prec)
  args_specs = list(zip([q, p, gc, sid, hs, vn],
                         [sp.tok(K), sp.mat(C), sp.vec(), sp.seg(), sp.states(L, K, V), sp.tok(V)]))
  (o,) = _call(kernel, cfg, (B, H, J), args_specs, [(jax.ShapeDtypeStruct((B, Tp, H, V), out_dtype), sp.tok(V))],
               cfg.warps_par, "gdn_output", cd)
  return o


def wy_bwd(k, v, gc, beta, sid, t, dw, du, dk_part, dgc_part, *, C: int, dk_dtype, dv_dtype, cfg: Config):
  B, Tp, H, K = k.shape
  V = v.shape[-1]
  cd = k.dtype
  L, J = _par_layout(Tp, C, cfg)
  sp = _Specs(L * C, by_rows=True)
  prec, inv = _precisions(cfg, cd)
  kernel = functools.partial(_wy_bwd_kernel, C=C, L=L, prec=prec, inv_prec=inv, inv_block=cfg.inv_block,
                             **_bwd_tiles(K, V, cfg.wyb_block, cd))
  args_specs = list(zip([k, v, gc, beta, sid, t, dw, du, dk_part, dgc_part],
                         [sp.tok(K), sp.tok(V), sp.vec(), sp.vec(), sp.seg(), sp.mat(C), sp.tok(K), sp.tok(V),
                          sp.tok(K), sp.vec()]))
  outs = [(jax.ShapeDtypeStruct((B, Tp, H, K), dk_dtype), sp.tok(K)),
          (jax.ShapeDtypeStruct((B, Tp, H, V), dv_dtype), sp.tok(V)),
          (jax.ShapeDtypeStruct((B, H, Tp), f32), sp.vec()), (jax.ShapeDtypeStruct((B, H, Tp), f32), sp.vec())]
  return _call(kernel, cfg, (B, H, J), args_specs, outs, cfg.warps_wyb, "gdn_wy_bwd", cd)


# ------------------------------------------------------------------------------------------ entry points


def forward(q, k, v, gc, beta, sid, h0, *, C: int, scale: float, out_dtype, cfg: Config, save: bool = False):
  """(o [B, Tp, H, V], final state [B, H, K, V] f32, saved (T, states, Vn, W, P)) from prepared inputs.

  With save (under grad), the residuals the Config asks for; None where the backward recomputes."""
  outs = wy_fwd(q, k, v, gc, beta, sid, C=C, scale=scale, cfg=cfg, emit_t=save and cfg.save_inverse)
  w, u, p = outs[:3]
  t = outs[3] if len(outs) > 3 else None
  keep_states = save and cfg.save_states
  wp = (w, p) if save and cfg.save_wp else (None, None)
  if not cfg.fwd_split:
    kw = dict(C=C, scale=scale, out_dtype=out_dtype, cfg=cfg)
    if not keep_states:
      o, ht = state_fwd(q, k, w, u, p, gc, sid, h0, store=False, **kw)
      return o, ht, (t, None, None) + wp
    o, ht, hs, vn = state_fwd(q, k, w, u, p, gc, sid, h0, store=True, readout=True, **kw)
    return o, ht, (t, hs, vn) + wp
  ht, hs, vn = state_fwd(q, k, w, u, p, gc, sid, h0, C=C, scale=scale, out_dtype=out_dtype, store=True, cfg=cfg)
  o = output(q, p, gc, sid, hs, vn, C=C, scale=scale, out_dtype=out_dtype, cfg=cfg)
  if keep_states:
    return o, ht, (t, hs, vn) + wp
  return o, ht, (t, None, None) + wp


def backward(q, k, v, gc, beta, sid, h0, saved, do, dht, *, C: int, scale: float, cfg: Config):
  """(dq, dk, dv, dgc, dbeta, dh0); recomputes what the forward did not save: W, U, P (from the saved T if any)
  and the chunk-entry states with Vn."""
  t, hs, vn, w, p = saved
  if hs is None or w is None:
    w, u, p = wy_fwd(q, k, v, gc, beta, sid, t, C=C, scale=scale, cfg=cfg)[:3]
  if hs is None:
    _, hs, vn = state_fwd(q, k, w, u, p, gc, sid, h0, C=C, scale=scale, out_dtype=k.dtype, store=True, cfg=cfg)
  dvn, dhs, dh0 = state_bwd(q, k, w, p, gc, sid, do, dht, C=C, scale=scale, cfg=cfg)
  dq, dk_part, dw, dgc_part = dqk(q, k, gc, sid, hs, dhs, vn, dvn, do, C=C, scale=scale, dq_dtype=q.dtype,
                                  cfg=cfg)
  dk, dv, dbeta, dgc = wy_bwd(k, v, gc, beta, sid, t, dw, dvn, dk_part, dgc_part, C=C, dk_dtype=k.dtype,
                              dv_dtype=v.dtype, cfg=cfg)
  return dq, dk, dv, dgc, dbeta, dh0
