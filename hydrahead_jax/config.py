"""Model configuration and the head layout (which KV groups of each layer are FA).

A ``HeadLayout`` names, per layer, the KV groups that keep full softmax
attention (FA); every other query head of that layer is a Gated DeltaNet (LA)
head. Inside the model, FA groups are stored first and contiguous (the
converter permutes teacher weights to match), so only the *number* of FA groups
per layer shapes the parameters; the group indices are kept for conversion and
reporting.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Sequence

import jax.numpy as jnp

FUSION_VARIANTS = ("scale_norm", "rmsnorm_all", "none")
LA_SHARING = ("none", "kv", "kv_gates")
REMAT_POLICIES = ("none", "full", "dots", "save_proj", "offload")  # per layer; see nn/model.py _REMAT_POLICIES
FA_CONTEXT_ALGORITHMS = ("heads", "gather")  # ModelConfig.fa_context_algorithm (parallel/context.py)


@dataclasses.dataclass(frozen=True)
class HeadLayout:
  """Per layer, the sorted tuple of KV-group indices that are full attention."""

  fa_groups: tuple[tuple[int, ...], ...]

  def __post_init__(self):
    object.__setattr__(
        self, "fa_groups", tuple(tuple(sorted(int(g) for g in layer)) for layer in self.fa_groups)
    )

  # -- constructors -----------------------------------------------------------
  @classmethod
  def all_fa(cls, num_layers: int, num_groups: int) -> "HeadLayout":
    return cls(tuple(tuple(range(num_groups)) for _ in range(num_layers)))

  @classmethod
  def all_la(cls, num_layers: int) -> "HeadLayout":
    return cls(tuple(() for _ in range(num_layers)))

  @classmethod
  def layerwise(cls, num_layers: int, num_groups: int, every: int, offset: int | None = None) -> "HeadLayout":
    """Whole layers FA: layer i is FA when ``i % every == offset`` (default: last of each block)."""
    if every < 1:
      raise ValueError(f"layout: 'every' must be >= 1, got {every}")
    offset = every - 1 if offset is None else offset
    return cls(tuple(tuple(range(num_groups)) if i % every == offset else () for i in range(num_layers)))

  @classmethod
  def per_layer(cls, num_layers: int, groups: Sequence[int]) -> "HeadLayout":
    """The same FA groups in every layer (e.g. ``[0]`` = 1 of G groups per layer)."""
    return cls(tuple(tuple(groups) for _ in range(num_layers)))

  # -- properties ------------------------------------------------------------
  @property
  def num_layers(self) -> int:
    return len(self.fa_groups)

  def num_fa(self, layer: int) -> int:
    return len(self.fa_groups[layer])

  def total_fa_groups(self) -> int:
    return sum(len(x) for x in self.fa_groups)

  def describe(self, num_groups: int) -> str:
    fa = self.total_fa_groups()
    la = self.num_layers * num_groups - fa
    ratio = "all LA" if not fa else ("all FA" if not la else f"{la / fa:.2f}:1 LA:FA")
    return f"{fa} FA / {la} LA groups over {self.num_layers} layers ({ratio})"

  def validate(self, num_layers: int, num_groups: int) -> None:
    if len(self.fa_groups) != num_layers:
      raise ValueError(
          f"layout.fa_groups: has {len(self.fa_groups)} entries but the model has num_layers={num_layers}; "
          "give one tuple of FA group indices per layer"
      )
    for i, layer in enumerate(self.fa_groups):
      if len(set(layer)) != len(layer):
        raise ValueError(f"layout.fa_groups[{i}]: repeated group index in {layer}")
      for g in layer:
        if not 0 <= g < num_groups:
          raise ValueError(
              f"layout.fa_groups[{i}]: group index {g} out of range [0, {num_groups}) (num_kv_heads={num_groups})"
          )

  def to_json(self) -> str:
    return json.dumps({"fa_groups": [list(x) for x in self.fa_groups]})

  @classmethod
  def from_json(cls, text: str) -> "HeadLayout":
    data = json.loads(text)
    if "fa_groups" not in data:
      raise ValueError("layout file: missing key 'fa_groups' (a list of per-layer lists of FA group indices)")
    return cls(tuple(tuple(x) for x in data["fa_groups"]))


def parse_ratio(ratio: str) -> tuple[int, int]:
  """'7:1' -> (7, 1) as LA:FA."""
  m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", ratio)
  if not m or int(m.group(2)) == 0:
    raise ValueError(f"ratio: expected 'LA:FA' like '7:1', got {ratio!r}")
  return int(m.group(1)), int(m.group(2))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Qwen3/Llama-style decoder whose attention is the HydraHead mixer."""

  vocab_size: int = 512
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 8  # query heads
  num_kv_heads: int = 4  # KV groups (the unit of FA/LA selection)
  head_dim: int = 32
  mlp_dim: int = 704
  rope_theta: float = 1_000_000.0
  rms_eps: float = 1e-6
  qk_norm: bool = True  # Qwen3: True; Llama family: False
  tie_embeddings: bool = True
  max_position: int = 32768  # informational (teacher's trained window)
  # head layout: None = all FA (the plain teacher architecture)
  layout: HeadLayout | None = None
  # scale-normalized fusion
  fusion: str = "scale_norm"
  fa_implementation: str | None = None  # None = auto: 'cudnn' on GPU with bf16/fp16, else 'xla'
  # How the cuDNN path attends rows packed with several documents: 'pallas' (segment-aware Pallas flash attention,
  # no T x T tensor) | 'mask' (cuDNN with a dense T x T segment mask); None = 'mask' up to 16K, else 'pallas'.
  fa_packed_implementation: str | None = None
  # FA under context parallelism (parallel/context.py): 'heads' (all-to-all: each device attends 1/n of the query
  # heads over the whole sequence) | 'gather' (each device its own queries against all-gathered keys; the last one
  # computes the whole causal square on cuDNN); None = 'heads' where the heads split, else 'gather'. Exact both.
  fa_context_algorithm: str | None = None
  # Gated DeltaNet heads
  la_conv_size: int = 4
  la_output_gate: bool = True
  # What the LA heads of one KV group share (a GQA teacher shares k, v per group): 'none' = every LA head has its
  # own k/v projections and gates (copies of its group's k/v at conversion); 'kv' = k, v projections and convs
  # per KV group, decay/write gates per head; 'kv_gates' = k, v and the decay/write gates per group (one delta-rule
  # state per group, read by the group's queries). Conversion from a GQA teacher is exact for both sharing modes.
  la_sharing: str = "none"
  la_chunk_size: int = 64
  la_implementation: str | None = None  # GDN op: None = 'pallas' on GPU/TPU, else 'chunked' (ops registry)
  # Kernel choices (None = automatic): they change numerics at the bf16 rounding level, so they are config fields,
  # recorded in run configs and checkpoints and part of what jit sees. The choice is made from the default backend.
  conv_implementation: str | None = None  # short conv + SiLU + L2 norm: 'pallas' | 'xla'; None = 'pallas' on GPU
  fusion_implementation: str | None = None  # head fusion: 'pallas' | 'xla'; None = 'xla' (measured no faster)
  # numerics / compile
  dtype: str = "bfloat16"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = True

  def __post_init__(self):
    if self.layout is None:
      object.__setattr__(self, "layout", HeadLayout.all_fa(self.num_layers, self.num_kv_heads))
    elif not isinstance(self.layout, HeadLayout):
      object.__setattr__(self, "layout", HeadLayout(tuple(tuple(x) for x in self.layout)))
    self.validate()

  def validate(self) -> None:
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"model.{name}: must be a positive int, got {v!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"model.num_heads: {self.num_heads} query heads are not divisible by num_kv_heads={self.num_kv_heads}"
      )
    if self.fusion not in FUSION_VARIANTS:
      raise ValueError(f"model.fusion: unknown variant {self.fusion!r}; choose one of {FUSION_VARIANTS}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat: unknown policy {self.remat!r}; choose one of {REMAT_POLICIES}")
    if self.fa_implementation not in (None, "xla", "cudnn"):
      raise ValueError(f"model.fa_implementation: {self.fa_implementation!r}; choose None (auto), 'xla' or 'cudnn'")
    if self.fa_packed_implementation not in (None, "pallas", "mask"):
      raise ValueError(f"model.fa_packed_implementation: {self.fa_packed_implementation!r}; choose None (auto), "
                       "'pallas' or 'mask'")
    if self.fa_context_algorithm not in (None, *FA_CONTEXT_ALGORITHMS):
      raise ValueError(f"model.fa_context_algorithm: {self.fa_context_algorithm!r}; choose None (auto), 'heads' or "
                       "'gather'")
    for name in ("conv_implementation", "fusion_implementation"):
      if getattr(self, name) not in (None, "xla", "pallas"):
        raise ValueError(f"model.{name}: {getattr(self, name)!r}; choose None (auto), 'xla' or 'pallas'")
    if self.la_sharing not in LA_SHARING:
      raise ValueError(f"model.la_sharing: unknown mode {self.la_sharing!r}; choose one of {LA_SHARING}")
    if self.la_conv_size < 1:
      raise ValueError(f"model.la_conv_size: must be >= 1, got {self.la_conv_size}")
    if self.la_chunk_size < 1:
      raise ValueError(f"model.la_chunk_size: must be >= 1, got {self.la_chunk_size}")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f"model.{name}: not a dtype: {getattr(self, name)!r}") from e
    if self.rope_theta <= 0:
      raise ValueError(f"model.rope_theta: must be > 0, got {self.rope_theta}")
    self.layout.validate(self.num_layers, self.num_kv_heads)

  # -- derived -----------------------------------------------------------------
  @property
  def heads_per_group(self) -> int:
    return self.num_heads // self.num_kv_heads

  def num_fa_groups(self, layer: int) -> int:
    return self.layout.num_fa(layer)

  def num_fa_heads(self, layer: int) -> int:
    return self.layout.num_fa(layer) * self.heads_per_group

  def num_la_kv_heads(self, layer: int) -> int:
    """k/v heads of the layer's LA heads: one per LA head, or one per LA KV group when ``la_sharing`` shares them."""
    n = self.num_la_heads(layer)
    return n if self.la_sharing == "none" else n // self.heads_per_group

  def num_la_states(self, layer: int) -> int:
    """Delta-rule states of the layer's LA heads: one per head, or one per LA KV group with la_sharing='kv_gates'
    (the heads of a group share k, v and gates, so their states are equal: grouped-query linear attention)."""
    n = self.num_la_heads(layer)
    return n // self.heads_per_group if self.la_sharing == "kv_gates" else n

  def num_la_heads(self, layer: int) -> int:
    return self.num_heads - self.num_fa_heads(layer)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["layout"] = [list(x) for x in self.layout.fa_groups]
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"model config: unknown keys {unknown}; known keys are {sorted(known)}")
    d = dict(d)
    if d.get("layout") is not None:
      lay = d["layout"]
      d["layout"] = HeadLayout(tuple(tuple(x) for x in (lay["fa_groups"] if isinstance(lay, dict) else lay)))
    return cls(**d)
