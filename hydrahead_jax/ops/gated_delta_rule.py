"""Public gated delta rule op: argument validation, implementation registry and dispatch.

An implementation is a callable
  fn(q, k, v, g, beta, *, scale, initial_state, segment_ids, chunk_size, output_final_state) -> (o, final_state)
receiving validated arguments (``scale`` a Python float, ``initial_state`` / ``segment_ids`` possibly None) and
returning o [B, T, H, V] in v's dtype and the float32 final state [B, H, K, V] (or None when not requested).

Registered here, from the standalone kernel package ``pallas_kernels.gated_delta_rule`` (which imports nothing
from this library): 'recurrent' and 'chunked', its pure-JAX references (``reference.py``,
``reference_chunked.py``), and 'pallas', its kernels (``ops.py``), loaded on first request.
"""

from __future__ import annotations

import warnings

from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gated_delta_rule.reference import gdn_recurrent
from pallas_kernels.gated_delta_rule.reference_chunked import gdn_chunked

Array = jax.Array


class GDNImplementation(Protocol):

  def __call__(self, q: Array, k: Array, v: Array, g: Array, beta: Array, *, scale: float,
               initial_state: Array | None, segment_ids: Array | None, chunk_size: int,
               output_final_state: bool) -> tuple[Array, Array | None]:
    ...


_IMPLEMENTATIONS: dict[str, GDNImplementation] = {}


def register_gdn_implementation(name: str, fn: GDNImplementation) -> None:
  """Register (or replace) an implementation under ``name``."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"register_gdn_implementation: name must be a non-empty str, got {name!r}")
  if not callable(fn):
    raise ValueError(f"register_gdn_implementation: fn for {name!r} is not callable")
  _IMPLEMENTATIONS[name] = fn


def available_implementations() -> tuple[str, ...]:
  return tuple(sorted(_IMPLEMENTATIONS))


_FALLBACK_WARNED: set[str] = set()


def _register_pallas() -> None:
  """Registers 'pallas' by importing the kernels (raises what the import raises).

  The registered function runs ``gated_delta_rule_pallas``; where the kernels raise NotImplementedError or
  ImportError for a call (a backend that cannot run it), it falls back to 'chunked' with a one-time warning.
  """
  from pallas_kernels.gated_delta_rule.ops import gated_delta_rule_pallas

  def gdn_pallas(q, k, v, g, beta, *, scale, initial_state, segment_ids, chunk_size, output_final_state):
    kw = dict(scale=scale, initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size,
              output_final_state=output_final_state)
    try:
      return gated_delta_rule_pallas(q, k, v, g, beta, **kw)
    except (NotImplementedError, ImportError) as err:
      if "pallas-call" not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add("pallas-call")
        warnings.warn(f"gated_delta_rule: Pallas kernels cannot run this call ({type(err).__name__}: {err}); "
                      "using the pure-JAX 'chunked' implementation", stacklevel=3)
      return gdn_chunked(q, k, v, g, beta, **kw)

  register_gdn_implementation("pallas", gdn_pallas)


def default_implementation() -> str:
  """Name used when ``implementation=None``: 'pallas' on GPU/TPU, 'chunked' elsewhere.

  Where the Pallas kernels cannot be loaded for the default backend, falls back to 'chunked' with a
  one-time warning naming the reason.
  """
  platform = jax.default_backend()
  if platform not in ("gpu", "cuda", "rocm", "tpu"):
    return "chunked"
  if "pallas" not in _IMPLEMENTATIONS:
    try:
      _register_pallas()
    except Exception as e:  # noqa: BLE001 - any import failure means: no kernels on this backend
      if platform not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(platform)
        warnings.warn(f"gated_delta_rule: Pallas kernels unavailable on {platform} ({type(e).__name__}: {e}); "
                      "using the pure-JAX 'chunked' implementation", stacklevel=3)
      return "chunked"
  return "pallas"


def get_gdn_implementation(name: str | None = None) -> GDNImplementation:
  """The registered implementation ``name`` (None: the default); 'pallas' is loaded on first request."""
  name = default_implementation() if name is None else name
  if name == "pallas" and name not in _IMPLEMENTATIONS:
    _register_pallas()
  if name not in _IMPLEMENTATIONS:
    raise ValueError(f"gated_delta_rule: unknown implementation {name!r}; known: {list(available_implementations())}")
  return _IMPLEMENTATIONS[name]


register_gdn_implementation("recurrent", gdn_recurrent)
register_gdn_implementation("chunked", gdn_chunked)


def _check(name: str, x, expected: tuple[int | None, ...], dims: str, kind: str = "floating") -> None:
  """One ValueError naming the argument, the expected layout and shape (None: any size), and the dtype kind."""
  shape = tuple(getattr(x, "shape", ()))
  if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
    want = "(" + ", ".join("?" if e is None else str(e) for e in expected) + ")"
    raise ValueError(f"gated_delta_rule: {name} has shape {shape}, expected [{dims}] = {want}")
  dtype = jnp.result_type(x)
  want = jnp.floating if kind == "floating" else jnp.integer
  if not jnp.issubdtype(dtype, want):
    raise ValueError(f"gated_delta_rule: {name} has dtype {dtype}, expected a {kind} dtype")


def _validate(q, k, v, g, beta, scale, initial_state, segment_ids, chunk_size) -> float:
  _check("q", q, (None,) * 4, "B, T, H, K")
  B, T, H, K = q.shape
  _check("k", k, q.shape, "B, T, H, K")
  _check("v", v, (B, T, H, None), "B, T, H, V")
  V = v.shape[-1]
  _check("g", g, (B, T, H), "B, T, H")
  _check("beta", beta, (B, T, H), "B, T, H")
  if initial_state is not None:
    _check("initial_state", initial_state, (B, H, K, V), "B, H, K, V")
  if segment_ids is not None:
    _check("segment_ids", segment_ids, (B, T), "B, T", kind="integer")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"gated_delta_rule: chunk_size must be a positive int, got {chunk_size!r}")
  if scale is None:
    return K**-0.5
  if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
    raise ValueError(f"gated_delta_rule: scale must be a Python float, got {scale!r}")
  return float(scale)


def gated_delta_rule(
    q: Array,
    k: Array,
    v: Array,
    g: Array,
    beta: Array,
    *,
    scale: float | None = None,
    initial_state: Array | None = None,
    segment_ids: Array | None = None,
    chunk_size: int = 64,
    output_final_state: bool = False,
    implementation: str | None = None,
) -> tuple[Array, Array | None]:
  """Gated delta rule over [B, T, H, *] inputs.

  Per head: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = scale * S_t^T q_t.

  Args:
    q, k: [B, T, H, K] (used as given; L2-normalise them beforehand). v: [B, T, H, V].
    g: [B, T, H] log decay (<= 0). beta: [B, T, H] write strength.
    scale: output scale, default K**-0.5.
    initial_state: [B, H, K, V], the state before token 0 (default zeros); used in float32.
    segment_ids: [B, T] int; the state is zeroed before every token whose id differs from the previous
      token's (packed documents never see each other; initial_state therefore reaches only the first one).
    chunk_size: chunk length of chunked forms (positive int); results do not depend on it.
    output_final_state: also return the float32 state after the last token [B, H, K, V].
    implementation: registered name ('recurrent', 'chunked', ...); None -> default_implementation().

  Returns:
    (o [B, T, H, V] in v's dtype, final_state or None).
  """
  fn = get_gdn_implementation(implementation)
  scale = _validate(q, k, v, g, beta, scale, initial_state, segment_ids, chunk_size)
  B, T, H, K = q.shape
  V = v.shape[-1]
  if T == 0:
    final = jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    return jnp.zeros((B, 0, H, V), v.dtype), (final if output_final_state else None)
  return fn(q, k, v, g, beta, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
            chunk_size=int(chunk_size), output_final_state=output_final_state)
