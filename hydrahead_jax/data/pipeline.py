"""grain input pipelines: packed, checkpointable training batches and fixed retrieval eval sets.

Training pipeline (one JAX process)::

  MapDataset.source(docs).shuffle(seed)[shard::count].repeat()   # synthetic and/or prepared shards
    -> to_iter_dataset -> split docs into pieces of <= seq_len+1 tokens (FlatMapIterDataset)
    -> FirstFitPackIterDataset (rows of seq_len+1) -> batch(B) -> shift -> [mp_prefetch]

Packing and shifting: documents (with bos/eos when the tokenizer has them) are packed into rows of
``T + 1 = seq_len + 1`` tokens; ``inputs = row[:T]``, ``targets = row[1:]``, and segment ids and
positions are those of the input tokens. ``loss_mask[t] = 1`` iff input t and target t belong to the
same document (so 0 at each document's last token and on padding). A document longer than T + 1 is
split into pieces ``doc[kT : kT + T + 1]`` that overlap by one token, so every next-token transition
is trained exactly once; each piece is its own segment with positions restarting at 0.

Batch dict (numpy, shape [B, T]): ``inputs``/``targets``/``segment_ids``/``positions`` int32,
``loss_mask``/``answer_mask`` float32. Segment ids are 1.. per row, 0 on padding (pad token id).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import grain
import numpy as np

from hydrahead_jax.data import synthetic
from hydrahead_jax.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

EVAL_INDEX_OFFSET = 1 << 32  # eval examples never coincide with training indices (< 10**9)
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where documents come from and how they are packed into batches."""

  source: str = "synthetic"  # 'synthetic' or a directory written by `prepare`
  task_weights: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: dict(synthetic.DEFAULT_WEIGHTS))
  seq_len: int = 1024
  batch_size: int = 8
  seed: int = 0
  tokenizer: str | None = None  # tokenizer.json (or its directory); None: byte-level / the manifest's
  num_workers: int = 0  # grain worker processes (mp_prefetch); 0 = in-process
  min_doc_len: int | None = None  # synthetic document lengths; None: (seq_len + 1) // 2
  max_doc_len: int | None = None  # None: seq_len + 1
  synthetic_fraction: float = 0.0  # share of synthetic documents mixed into a prepared source
  packing_bins: int | None = None  # None: batch_size
  read_threads: int = 1
  prefetch_buffer: int = 16

  def __post_init__(self):
    if self.seq_len < 1 or self.batch_size < 1:
      raise ValueError(f"DataConfig: seq_len and batch_size must be >= 1, got {self.seq_len}, "
                       f"{self.batch_size}")
    if not 0.0 <= self.synthetic_fraction <= 1.0:
      raise ValueError(f"DataConfig.synthetic_fraction must be in [0, 1], got {self.synthetic_fraction}")
    if not 0 <= self.seed < 2 ** 32:
      raise ValueError(f"DataConfig.seed must be in [0, 2**32), got {self.seed}")

  def mixture(self) -> synthetic.MixtureConfig:
    hi = self.max_doc_len or self.seq_len + 1
    lo = self.min_doc_len or max(2, min(hi, (self.seq_len + 1) // 2))
    return synthetic.MixtureConfig(weights=dict(self.task_weights), min_len=lo, max_len=hi)


# -- documents ------------------------------------------------------------------------------------
def read_manifest(path: str) -> dict[str, Any]:
  mf = os.path.join(path, MANIFEST)
  if not os.path.isfile(mf):
    raise FileNotFoundError(f"data source {path!r}: no {MANIFEST} (expected 'synthetic' or a "
                            "directory written by hydrahead_jax.data.prepare)")
  with open(mf) as f:
    return json.load(f)


def resolve_tokenizer(cfg: DataConfig) -> Tokenizer:
  """The config's tokenizer; for prepared data it must match the one recorded in the manifest."""
  if cfg.source == "synthetic":
    return load_tokenizer(cfg.tokenizer)
  recorded = read_manifest(cfg.source)["tokenizer"]
  if cfg.tokenizer is None:
    if recorded["type"] == "byte":
      return ByteTokenizer()
    return load_tokenizer(os.path.join(cfg.source, recorded["file"]))
  tok = load_tokenizer(cfg.tokenizer)
  info = tok.info()
  for k in ("type", "vocab_size", "sha256"):
    if info.get(k) != recorded.get(k):
      raise ValueError(f"tokenizer {cfg.tokenizer!r} does not match the one {cfg.source!r} was "
                       f"prepared with ({k}: {info.get(k)!r} vs {recorded.get(k)!r})")
  return tok


class DecodeDoc(grain.transforms.Map):
  """ArrayRecord bytes (int32 tokens) -> ``{"tokens", "answer_mask"}`` with bos/eos added."""

  def __init__(self, bos_id: int | None, eos_id: int | None):
    self.bos = [bos_id] if bos_id is not None else []
    self.eos = [eos_id] if eos_id is not None else []

  def map(self, record: bytes) -> dict[str, np.ndarray]:
    body = np.frombuffer(record, dtype=np.int32)
    tokens = np.concatenate([np.asarray(self.bos, np.int32), body, np.asarray(self.eos, np.int32)])
    return {"tokens": tokens, "answer_mask": np.zeros(len(tokens), np.uint8)}


def _shard(ds: grain.MapDataset, seed: int, shard: grain.sharding.ShardOptions) -> grain.MapDataset:
  if len(ds) < shard.shard_count:
    raise ValueError(f"data source has {len(ds)} documents, fewer than {shard.shard_count} processes")
  return ds.shuffle(seed)[shard.shard_index::shard.shard_count].repeat()


def synthetic_documents(cfg: DataConfig, tok: Tokenizer, shard: grain.sharding.ShardOptions
                        ) -> grain.MapDataset:
  src = synthetic.SyntheticSource(cfg.mixture(), tok, cfg.seed)
  return _shard(grain.MapDataset.source(src), cfg.seed, shard)


def prepared_documents(path: str, tok: Tokenizer, seed: int, shard: grain.sharding.ShardOptions
                       ) -> grain.MapDataset:
  manifest = read_manifest(path)
  files = [os.path.join(path, s["file"]) for s in manifest["shards"]]
  src = grain.sources.ArrayRecordDataSource(files)
  return _shard(grain.MapDataset.source(src), seed, shard).map(DecodeDoc(tok.bos_id, tok.eos_id))


def documents(cfg: DataConfig, tok: Tokenizer, shard: grain.sharding.ShardOptions) -> grain.MapDataset:
  """The infinite, shuffled, process-sharded stream of documents."""
  if cfg.source == "synthetic":
    return synthetic_documents(cfg, tok, shard)
  docs = prepared_documents(cfg.source, tok, cfg.seed, shard)
  if cfg.synthetic_fraction <= 0:
    return docs
  if cfg.synthetic_fraction >= 1:
    return synthetic_documents(cfg, tok, shard)
  syn = synthetic_documents(cfg, tok, shard)
  return grain.MapDataset.mix([docs, syn], [1 - cfg.synthetic_fraction, cfg.synthetic_fraction])


# -- packing --------------------------------------------------------------------------------------
class SplitDoc(grain.experimental.FlatMapTransform):
  """Splits a document into pieces of at most ``row_len`` tokens overlapping by one token (every
  transition appears once); drops documents shorter than 2 tokens (nothing to predict)."""

  max_fan_out = 1 << 30

  def __init__(self, row_len: int):
    self.row_len = row_len

  def flat_map(self, doc: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    n = len(doc["tokens"])
    if n < 2:
      return []
    if n <= self.row_len:
      return [doc]
    step = self.row_len - 1
    return [{k: v[s:s + self.row_len] for k, v in doc.items()} for s in range(0, n - 1, step)]


class ShiftRows(grain.transforms.Map):
  """Packed rows of T + 1 tokens -> model batch of T (see the module docstring)."""

  def map(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return shift_rows(rows["tokens"], rows["tokens_segment_ids"], rows["tokens_positions"],
                      rows["answer_mask"])


def shift_rows(tokens: np.ndarray, segs: np.ndarray, pos: np.ndarray, answer: np.ndarray
               ) -> dict[str, np.ndarray]:
  same = (segs[:, :-1] == segs[:, 1:]) & (segs[:, :-1] > 0)
  return {
      "inputs": tokens[:, :-1].astype(np.int32),
      "targets": tokens[:, 1:].astype(np.int32),
      "segment_ids": segs[:, :-1].astype(np.int32),
      "positions": pos[:, :-1].astype(np.int32),
      "loss_mask": same.astype(np.float32),
      "answer_mask": ((answer[:, 1:] > 0) & same).astype(np.float32),
  }


def make_train_dataset(cfg: DataConfig, process_index: int = 0, process_count: int = 1
                       ) -> grain.IterDataset:
  """The training ``IterDataset`` of packed, shifted batches for one JAX process."""
  tok = resolve_tokenizer(cfg)
  shard = grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True)
  row = cfg.seq_len + 1
  read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer)
  ds = documents(cfg, tok, shard).to_iter_dataset(read)
  ds = grain.experimental.FlatMapIterDataset(ds, SplitDoc(row))
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={"tokens": row, "answer_mask": row},
      num_packing_bins=cfg.packing_bins or cfg.batch_size, seed=cfg.seed, shuffle_bins=True,
      padding_struct={"tokens": tok.pad_id, "answer_mask": 0})
  ds = ds.batch(cfg.batch_size, drop_remainder=True).map(ShiftRows())
  if cfg.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  return ds


def make_train_iterator(cfg: DataConfig, process_index: int = 0, process_count: int = 1
                        ) -> grain.DatasetIterator:
  """Checkpointable iterator (``get_state``/``set_state``; grain.checkpoint for orbax) of batches."""
  return iter(make_train_dataset(cfg, process_index, process_count))


# -- evaluation -----------------------------------------------------------------------------------
def make_eval_batches(task: str, num: int, length: int, seed: int, tokenizer: Tokenizer | None = None
                      ) -> dict[str, np.ndarray]:
  """``num`` retrieval examples of ``length + 1`` tokens as one batch dict of shape [num, length].

  Example i is ``generate_example(task, seed, EVAL_INDEX_OFFSET + i, length + 1)``: disjoint from
  training streams; one document per row (segment 1, no padding).
  """
  tok = tokenizer or ByteTokenizer()
  exs = [synthetic.generate_example(task, seed, EVAL_INDEX_OFFSET + i, length + 1, tok)
         for i in range(num)]
  tokens = np.stack([e["tokens"] for e in exs])
  answer = np.stack([e["answer_mask"] for e in exs])
  ones = np.ones_like(tokens)
  pos = np.broadcast_to(np.arange(length + 1, dtype=np.int32), tokens.shape)
  return shift_rows(tokens, ones, pos, answer)


def retrieval_accuracy(predictions: np.ndarray, batch: Mapping[str, np.ndarray]) -> float:
  """Fraction of answer positions where ``predictions`` (argmax ids, [B, T]) equal the targets."""
  mask = np.asarray(batch["answer_mask"]) > 0
  if not mask.any():
    raise ValueError("retrieval_accuracy: the batch has no answer positions")
  return float((np.asarray(predictions) == np.asarray(batch["targets"]))[mask].mean())


def example_accuracy(predictions: np.ndarray, batch: Mapping[str, np.ndarray]) -> float:
  """Fraction of rows whose answer tokens are all predicted correctly (exact-match retrieval)."""
  mask = np.asarray(batch["answer_mask"]) > 0
  wrong = (np.asarray(predictions) != np.asarray(batch["targets"])) & mask
  return float((~wrong.any(axis=1))[mask.any(axis=1)].mean())
