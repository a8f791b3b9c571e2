"""Cross entropy and distillation KL over sequence chunks, never materialising [B, T, V] logits.

The vocabulary projection runs inside the chunk: for positions [s, s + C) the logits [B, C, V] are computed
in float32, reduced (logsumexp, target logit, argmax), and dropped. Gradients are exact and hand-written
(``jax.custom_vjp``): the forward keeps only a per-token logsumexp [B, T]; the backward recomputes each
chunk's logits, forms ``softmax - onehot`` (CE) or ``softmax_student - softmax_teacher`` (KL) scaled by the
incoming per-token cotangent, and produces d hidden [B, C, D] for the chunk and accumulates dW [V, D] in
float32. Peak extra memory is O(B * C * V) floats instead of O(B * T * V).

Why custom_vjp rather than a ``lax.scan`` over ``jax.checkpoint``-ed chunks: under autodiff a scan saves
per-chunk residuals and accumulates dW through the scan transpose, and XLA keeps the softmax of a chunk
alive between the recomputation and its use; the custom rule states exactly what is saved (one float per
token) and fuses ``exp(z - lse) - onehot`` into the backward matmuls' operand. It also lets the forward
return argmax hits without a second pass.

Chunks: positions are cut into ``n = ceil(T / C)`` windows of C = min(chunk, T) positions; the last window
starts at ``T - C`` (it overlaps its predecessor when C does not divide T) and only its new positions are
written / receive gradient, so every token is counted exactly once and no padded copy of the hidden states
is made. Loops are ``lax.fori_loop`` with in-place dynamic slices of the [B, T] / [B, T, D] buffers.

Weight layouts: ``'vd'`` for a tied embedding E [V, D] (logits = x E^T) and ``'dv'`` for an untied head
W [D, V] (logits = x W); see ``HydraHeadLM.output_projection``. Matmul operands are cast to
``compute_dtype`` (default: the hidden states' dtype) and accumulate in float32 (``preferred_element_type``);
bf16 hidden states are fine. Shape letters: B batch, T length, C chunk, D width, V vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

LAYOUTS = ("vd", "dv")
DEFAULT_CHUNK = 2048


def _check(hidden, w, layout: str, chunk: int) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"losses: w_layout must be one of {LAYOUTS}, got {layout!r}")
  if chunk < 1:
    raise ValueError(f"losses: chunk must be >= 1 positions, got {chunk}")
  if hidden.ndim != 3:
    raise ValueError(f"losses: hidden states must be [B, T, D], got shape {hidden.shape}")
  d = w.shape[1] if layout == "vd" else w.shape[0]
  if w.ndim != 2 or d != hidden.shape[-1]:
    raise ValueError(f"losses: weight {w.shape} ({layout!r}) does not match hidden width {hidden.shape[-1]}")


def _vocab(w, layout: str) -> int:
  return w.shape[0] if layout == "vd" else w.shape[1]


def _logits(h_BxCxD, w, layout: str):
  """float32 logits [B, C, V] of one chunk (operands already in the compute dtype)."""
  spec = "bcd,vd->bcv" if layout == "vd" else "bcd,dv->bcv"
  return jnp.einsum(spec, h_BxCxD, w, preferred_element_type=jnp.float32)


def _dh(dz_BxCxV, w, layout: str):
  spec = "bcv,vd->bcd" if layout == "vd" else "bcv,dv->bcd"
  return jnp.einsum(spec, dz_BxCxV, w, preferred_element_type=jnp.float32)


def _dw(dz_BxCxV, h_BxCxD, layout: str):
  spec = "bcv,bcd->vd" if layout == "vd" else "bcv,bcd->dv"
  return jnp.einsum(spec, dz_BxCxV, h_BxCxD, preferred_element_type=jnp.float32)


def _windows(T: int, chunk: int) -> tuple[int, int]:
  """(C, n): window length and number of windows covering [0, T)."""
  C = min(chunk, T)
  return C, -(-T // C)


def _window(i, C: int, T: int):
  """Start of window i (the last one is pulled back to T - C) and its [1, C] mask of not-yet-covered positions."""
  start = jnp.minimum(i * C, T - C)
  fresh_1xC = (start + jnp.arange(C, dtype=jnp.int32) >= i * C)[None]
  return start, fresh_1xC


def _slice(x, start, C: int):
  return jax.lax.dynamic_slice_in_dim(x, start, C, axis=1)


def _write(buf, start, fresh_1xC, new):
  """buf[:, start:start+C] = new where fresh, else unchanged (overlap of the last window)."""
  old = _slice(buf, start, new.shape[1])
  mask = fresh_1xC.reshape(fresh_1xC.shape + (1,) * (new.ndim - 2))
  return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(mask, new, old), start, axis=1)


def _cdt(hidden, compute_dtype):
  return jnp.dtype(hidden.dtype if compute_dtype is None else compute_dtype)


# -- cross entropy ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _ce_fn(chunk: int, layout: str, compute_dtype):
  """custom_vjp (hidden [B, T, D], w, targets [B, T]) -> (ce [B, T] float32, hit [B, T] bool)."""

  def forward(hidden, w, targets):
    B, T, _ = hidden.shape
    C, n = _windows(T, chunk)
    cdt = _cdt(hidden, compute_dtype)
    wc = w.astype(cdt)
    tgt = jnp.clip(targets.astype(jnp.int32), 0, _vocab(w, layout) - 1)

    def body(i, carry):
      ce, hit, lse = carry
      start, fresh = _window(i, C, T)
      z = _logits(_slice(hidden, start, C).astype(cdt), wc, layout)
      t = _slice(tgt, start, C)
      lse_c = jax.nn.logsumexp(z, axis=-1)
      zt = jnp.take_along_axis(z, t[..., None], axis=-1)[..., 0]
      hit_c = jnp.argmax(z, axis=-1).astype(jnp.int32) == t
      return _write(ce, start, fresh, lse_c - zt), _write(hit, start, fresh, hit_c), _write(lse, start, fresh, lse_c)

    init = (jnp.zeros((B, T), jnp.float32), jnp.zeros((B, T), bool), jnp.zeros((B, T), jnp.float32))
    ce, hit, lse = jax.lax.fori_loop(0, n, body, init)
    hit = hit & (targets == tgt)  # an out-of-range target is never hit
    return (ce, hit), lse

  @jax.custom_vjp
  def ce_fn(hidden, w, targets):
    return forward(hidden, w, targets)[0]

  def fwd(hidden, w, targets):
    out, lse = forward(hidden, w, targets)
    return out, (hidden, w, targets, lse)

  def bwd(res, cts):
    hidden, w, targets, lse = res
    g_BxT = cts[0].astype(jnp.float32)
    B, T, _ = hidden.shape
    C, n = _windows(T, chunk)
    cdt = _cdt(hidden, compute_dtype)
    wc = w.astype(cdt)
    V = _vocab(w, layout)
    tgt = jnp.clip(targets.astype(jnp.int32), 0, V - 1)

    def body(i, carry):
      dh, dw = carry
      start, fresh = _window(i, C, T)
      h = _slice(hidden, start, C).astype(cdt)
      z = _logits(h, wc, layout)
      g = jnp.where(fresh, _slice(g_BxT, start, C), 0.0)[..., None]
      p = jnp.exp(z - _slice(lse, start, C)[..., None])
      onehot = jnp.arange(V, dtype=jnp.int32) == _slice(tgt, start, C)[..., None]
      dz = (g * (p - onehot)).astype(cdt)
      dh = _write(dh, start, fresh, _dh(dz, wc, layout).astype(dh.dtype))
      return dh, dw + _dw(dz, h, layout)

    init = (jnp.zeros_like(hidden), jnp.zeros(w.shape, jnp.float32))
    dh, dw = jax.lax.fori_loop(0, n, body, init)
    return dh, dw.astype(w.dtype), None

  ce_fn.defvjp(fwd, bwd)
  return ce_fn


def chunked_cross_entropy(hidden_BxTxD: jax.Array, w: jax.Array, targets_BxT: jax.Array, *, w_layout: str = "vd",
                          chunk: int = DEFAULT_CHUNK, compute_dtype=None) -> tuple[jax.Array, jax.Array]:
  """Per-token next-token cross entropy and argmax hits, ``chunk`` positions at a time.

  hidden [B, T, D] (final-normed states), w the vocabulary projection ([V, D] with ``w_layout='vd'``, tied;
  [D, V] with 'dv'), targets [B, T] int. Returns (ce [B, T] float32 = logsumexp(z) - z[target],
  hit [B, T] bool = argmax(z) == target), equal to the full-logits computation; gradients flow to hidden and
  w through ce (weight / mask it outside, e.g. ``jnp.sum(ce * mask)``), hits carry none. Targets outside
  [0, V) give a finite ce (of a clipped target) and no hit: mask them out.
  """
  _check(hidden_BxTxD, w, w_layout, chunk)
  cdt = None if compute_dtype is None else jnp.dtype(compute_dtype)
  return _ce_fn(int(chunk), w_layout, cdt)(hidden_BxTxD, w, targets_BxT)


def full_cross_entropy(hidden_BxTxD: jax.Array, w: jax.Array, targets_BxT: jax.Array, *, w_layout: str = "vd",
                       compute_dtype=None) -> tuple[jax.Array, jax.Array]:
  """``chunked_cross_entropy`` through the materialised [B, T, V] float32 logits (plain autodiff): the
  reference the chunked version is tested against."""
  _check(hidden_BxTxD, w, w_layout, 1)
  cdt = _cdt(hidden_BxTxD, compute_dtype)
  z = _logits(hidden_BxTxD.astype(cdt), w.astype(cdt), w_layout)
  V = _vocab(w, w_layout)
  tgt = jnp.clip(targets_BxT.astype(jnp.int32), 0, V - 1)
  ce = jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, tgt[..., None], axis=-1)[..., 0]
  hit = (jnp.argmax(z, axis=-1).astype(jnp.int32) == tgt) & (targets_BxT == tgt)
  return ce, hit


# -- distillation KL --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _kl_fn(chunk: int, s_layout: str, t_layout: str, temperature: float, compute_dtype):
  """custom_vjp (hs, ws, ht, wt) -> KL(teacher || student) [B, T] float32 at ``temperature``."""
  inv_tau = 1.0 / temperature

  def chunk_logits(hs, wsc, ht, wtc, start, C, cdt):
    zs = _logits(_slice(hs, start, C).astype(cdt), wsc, s_layout) * inv_tau
    zt = _logits(_slice(ht, start, C).astype(cdt), wtc, t_layout) * inv_tau
    return zs, zt

  def forward(hs, ws, ht, wt):
    B, T, _ = hs.shape
    C, n = _windows(T, chunk)
    cdt = _cdt(hs, compute_dtype)
    wsc, wtc = ws.astype(cdt), wt.astype(cdt)

    def body(i, carry):
      kl, lse_s, lse_t = carry
      start, fresh = _window(i, C, T)
      zs, zt = chunk_logits(hs, wsc, ht, wtc, start, C, cdt)
      ls, lt = jax.nn.logsumexp(zs, axis=-1), jax.nn.logsumexp(zt, axis=-1)
      p = jnp.exp(zt - lt[..., None])
      kl_c = jnp.sum(p * (zt - zs), axis=-1) - lt + ls
      return _write(kl, start, fresh, kl_c), _write(lse_s, start, fresh, ls), _write(lse_t, start, fresh, lt)

    zeros = jnp.zeros((B, T), jnp.float32)
    return jax.lax.fori_loop(0, n, body, (zeros, zeros, zeros))

  @jax.custom_vjp
  def kl_fn(hs, ws, ht, wt):
    return forward(hs, ws, ht, wt)[0]

  def fwd(hs, ws, ht, wt):
    kl, lse_s, lse_t = forward(hs, ws, ht, wt)
    return kl, (hs, ws, ht, wt, lse_s, lse_t)

  def bwd(res, g_BxT):
    hs, ws, ht, wt, lse_s, lse_t = res
    g_BxT = g_BxT.astype(jnp.float32)
    B, T, _ = hs.shape
    C, n = _windows(T, chunk)
    cdt = _cdt(hs, compute_dtype)
    wsc, wtc = ws.astype(cdt), wt.astype(cdt)

    def body(i, carry):
      dh, dw = carry
      start, fresh = _window(i, C, T)
      zs, zt = chunk_logits(hs, wsc, ht, wtc, start, C, cdt)
      q = jnp.exp(zs - _slice(lse_s, start, C)[..., None])
      p = jnp.exp(zt - _slice(lse_t, start, C)[..., None])
      g = jnp.where(fresh, _slice(g_BxT, start, C), 0.0)[..., None] * inv_tau
      dz = (g * (q - p)).astype(cdt)
      dh = _write(dh, start, fresh, _dh(dz, wsc, s_layout).astype(dh.dtype))
      return dh, dw + _dw(dz, _slice(hs, start, C).astype(cdt), s_layout)

    dh, dw = jax.lax.fori_loop(0, n, body, (jnp.zeros_like(hs), jnp.zeros(ws.shape, jnp.float32)))
    return dh, dw.astype(ws.dtype), jnp.zeros_like(ht), jnp.zeros_like(wt)

  kl_fn.defvjp(fwd, bwd)
  return kl_fn


def chunked_kl_tokens(student_hidden: jax.Array, student_w: jax.Array, teacher_hidden: jax.Array,
                      teacher_w: jax.Array, *, temperature: float = 1.0, chunk: int = DEFAULT_CHUNK,
                      student_layout: str = "vd", teacher_layout: str = "vd", compute_dtype=None) -> jax.Array:
  """Per-token KL(teacher || student) [B, T] float32 of the distributions softmax(logits / temperature).

  Student and teacher may differ in width D (and layout) but share the vocabulary. The teacher side is
  under stop_gradient (its cotangents are zeros); the student's gradients (hidden and w) are exact:
  d KL / d z_s = (softmax(z_s / tau) - softmax(z_t / tau)) / tau. No tau^2 factor is applied.
  """
  _check(student_hidden, student_w, student_layout, chunk)
  _check(teacher_hidden, teacher_w, teacher_layout, chunk)
  if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
    raise ValueError(f"chunked_kl: student {student_hidden.shape[:2]} and teacher {teacher_hidden.shape[:2]} "
                     "hidden states differ in [B, T]")
  if _vocab(student_w, student_layout) != _vocab(teacher_w, teacher_layout):
    raise ValueError(f"chunked_kl: student vocabulary {_vocab(student_w, student_layout)} != teacher "
                     f"vocabulary {_vocab(teacher_w, teacher_layout)}")
  if not temperature > 0:
    raise ValueError(f"chunked_kl: temperature must be > 0, got {temperature}")
  cdt = None if compute_dtype is None else jnp.dtype(compute_dtype)
  fn = _kl_fn(int(chunk), student_layout, teacher_layout, float(temperature), cdt)
  return fn(student_hidden, student_w, jax.lax.stop_gradient(teacher_hidden), jax.lax.stop_gradient(teacher_w))


def chunked_kl(student_hidden: jax.Array, student_w: jax.Array, teacher_hidden: jax.Array, teacher_w: jax.Array,
               weights: jax.Array, *, temperature: float = 1.0, chunk: int = DEFAULT_CHUNK,
               student_layout: str = "vd", teacher_layout: str = "vd", compute_dtype=None) -> jax.Array:
  """sum_t weights[b, t] * KL_t(teacher || student): ``chunked_kl_tokens`` weighted and summed (a scalar).

  Divide by the weight sum for a mean; multiply by temperature**2 for Hinton-style scaling.
  """
  kl_BxT = chunked_kl_tokens(student_hidden, student_w, teacher_hidden, teacher_w, temperature=temperature,
                             chunk=chunk, student_layout=student_layout, teacher_layout=teacher_layout,
                             compute_dtype=compute_dtype)
  return jnp.sum(kl_BxT * jax.lax.stop_gradient(weights).astype(jnp.float32))
