"""Logical axis names -> mesh axes, through one rule table.

Every parameter carries logical axis names as NNX sharding metadata
(``out_sharding``); activations are constrained with the same names. The one
table below maps names to mesh axes. Mesh axes that the active mesh lacks are
dropped, so the same model code runs unsharded, data-parallel, FSDP or tensor
parallel without change.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import jax
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec as P

# Canonical mesh axes, outermost first.
MESH_AXES = ("data", "fsdp", "context", "tensor")

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("conv", None),
    ("norm", None),
)


def _active_mesh():
  """The abstract mesh in effect while tracing (``jax.set_mesh``), or None: what layout decisions read."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None
  return mesh


def concrete_mesh(mesh=None):
  """``mesh``, else the concrete mesh made active with ``jax.set_mesh`` (None when there is none): what placing
  arrays on devices (``device_put``, restores) needs."""
  if mesh is not None:
    return mesh
  active = jax.sharding.get_mesh()
  return None if active is None or active.empty else active


def rules_for_mesh(mesh=None, rules=LOGICAL_RULES):
  """Returns the rule table restricted to axes present in ``mesh``."""
  mesh = mesh if mesh is not None else _active_mesh()
  names = set(mesh.axis_names) if mesh is not None else set()
  out = []
  for logical, target in rules:
    if target is None:
      out.append((logical, None))
      continue
    targets = (target,) if isinstance(target, str) else tuple(target)
    kept = tuple(t for t in targets if t in names)
    out.append((logical, kept if len(kept) > 1 else (kept[0] if kept else None)))
  return tuple(out)


def logical_to_pspec(names: Sequence[str | None], mesh=None) -> P:
  """Maps a tuple of logical axis names to a mesh ``PartitionSpec``.

  A mesh axis is used at most once per array: the first dimension that claims it keeps it (so activations
  ``[batch, length, embed]`` shard batch over data+fsdp and leave embed whole, while a weight ``[vocab, embed]``
  shards embed over fsdp).
  """
  table = dict(rules_for_mesh(mesh))
  used: set[str] = set()
  out = []
  for n in names:
    if n is not None and n not in table:
      raise ValueError(f"logical axis {n!r} has no rule in LOGICAL_RULES")
    target = table[n] if n is not None else None
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    kept = tuple(a for a in axes if a not in used)
    used.update(kept)
    out.append(None if not kept else (kept[0] if len(kept) == 1 else kept))
  return P(*out)


def fit_pspec(spec: P, shape: Sequence[int], mesh) -> P:
  """Drops mesh axes from dims they do not divide (e.g. 2 FA heads on a 4-way tensor axis -> replicated)."""
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    kept, prod = [], 1
    for a in axes:
      if dim % (prod * sizes[a]) == 0:
        kept.append(a)
        prod *= sizes[a]
    out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op when no mesh is active."""
  mesh = _active_mesh()
  if mesh is None:
    return x
  if len(names) != x.ndim:
    raise ValueError(f"constrain: {len(names)} names for an array of rank {x.ndim}")
  return jax.lax.with_sharding_constraint(x, fit_pspec(logical_to_pspec(names, mesh), x.shape, mesh))


def per_shard(fn, in_names: Sequence[Sequence[str | None] | None], out_names: Sequence[Sequence[str | None]]):
  """``fn`` run on each device's shard of the active mesh (``jax.shard_map``), specs from logical names.

  For ops that are independent along the named axes (batch rows, heads) but opaque to XLA's partitioner: a Pallas
  kernel is a custom call, so without this XLA would gather its operands onto every device. ``in_names``: one
  entry per positional argument (None: the argument is replicated, e.g. a None or a scalar); ``out_names``: one per
  output (fn returns a tuple). Mesh axes that do not divide a dimension are dropped (that dimension is then
  computed redundantly, never split). A dimension named None is kept whole on every device, so name only the
  axes the op is independent along (never 'length' for a recurrence). Without an active mesh, fn itself runs;
  under any mesh (one device too) fn runs inside shard_map, where XLA's partitioner never sees it.
  """

  def wrapped(*args):
    mesh = _active_mesh()
    if mesh is None:
      return fn(*args)
    spec = lambda names, x: P() if names is None else fit_pspec(logical_to_pspec(names, mesh), x.shape, mesh)  # noqa: E731
    outs = jax.eval_shape(fn, *args)
    return shard_map_skipping_none(fn, mesh, args, [None if a is None else spec(n, a) for n, a in zip(in_names, args)],
                                   tuple(spec(n, o) for n, o in zip(out_names, outs)))

  return wrapped


def shard_map_skipping_none(fn, mesh, args, in_specs, out_specs):
  """``jax.shard_map`` of ``fn(*args)`` over the arguments that are not None (None ones reach ``fn`` as None on every
  shard); ``in_specs`` has one entry per argument (ignored for None arguments)."""
  present = [i for i, a in enumerate(args) if a is not None]

  def on_shard(*shards):
    full = list(args)
    for i, x in zip(present, shards):
      full[i] = x
    return fn(*full)

  return jax.shard_map(on_shard, mesh=mesh, in_specs=tuple(in_specs[i] for i in present), out_specs=out_specs,
                       check_vma=False)(*[args[i] for i in present])


@contextlib.contextmanager
def axis_rules(mesh=None):
  """Activates the rule table for flax's ``nnx.get_partition_spec``."""
  with core_spmd.logical_axis_rules(rules_for_mesh(mesh)):
    yield


def param_pspecs(model_or_state, mesh=None):
  """Mesh PartitionSpecs of every variable of a model (or an nnx.State), fitted to the shapes."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
  mesh = mesh if mesh is not None else _active_mesh()
  with axis_rules(mesh):
    specs = nnx.get_partition_spec(state)
  if mesh is None:
    return specs
  return jax.tree.map(lambda sp, x: fit_pspec(sp, x.shape, mesh), specs, state,
                      is_leaf=lambda v: isinstance(v, P))


def param_shardings(model_or_state, mesh):
  """NamedShardings of every variable, by the rule table."""
  specs = param_pspecs(model_or_state, mesh)
  return jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs, is_leaf=lambda v: isinstance(v, P))


def shard_model(model: nnx.Module, mesh) -> nnx.Module:
  """Places every parameter of ``model`` on ``mesh`` by its logical axes (in place)."""
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
  return model
