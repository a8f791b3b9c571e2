"""pallas_call with optional operands: the one place that maps absent (None) inputs and outputs to None refs."""

from __future__ import annotations

from jax.experimental import pallas as pl


def pallas_call_optional(kernel, args_specs, outs, *, n_scratch: int = 0, **pallas_call_kwargs) -> list:
  """Runs ``kernel`` whose refs are (inputs, outputs, scratch) with some inputs / outputs optional.

  ``args_specs``: [(array or None, BlockSpec)] in the kernel's input order; ``outs``: [(ShapeDtypeStruct, BlockSpec)
  or None] in its output order; ``n_scratch`` trailing scratch refs (always present). The kernel receives None for
  each absent one; only the present arrays and outputs reach ``pl.pallas_call``. Returns the present outputs, in
  order.
  """
  present = [a is not None for a, _ in args_specs] + [o is not None for o in outs] + [True] * n_scratch
  outs = [o for o in outs if o is not None]

  def with_none(*refs):
    it = iter(refs)
    return kernel(*[next(it) if p else None for p in present])

  call = pl.pallas_call(with_none, in_specs=[s for a, s in args_specs if a is not None],
                        out_specs=[s for _, s in outs], out_shape=[o for o, _ in outs], **pallas_call_kwargs)
  return call(*[a for a, _ in args_specs if a is not None])
