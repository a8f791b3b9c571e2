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

from hydrahead_jax.cli import UserError
from hydrahead_jax.data import synthetic
from hydrahead_jax.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

EVAL_INDEX_OFFSET = 1 << 32  # eval examples never coincide with training indices (< 10**9)
MANIFEST = "manifest.json"
SCAN_TOKENS = 1 << 26  # token ids checked before training (all of a source up to ~64M tokens)


class DataSourceError(UserError, ValueError):
  """Unusable training data; one line naming the file, what is wrong and what to do."""


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


# -- validation (before the first step) -----------------------------------------------------------
def validate_source(cfg: DataConfig, vocab_size: int, scan_tokens: int = SCAN_TOKENS) -> None:
  """Raises ``DataSourceError`` (one line) unless the data source can feed a model of ``vocab_size``.

  Synthetic data: the tokenizer fits the vocabulary. Prepared data (``prepare``): the directory and
  its manifest exist and parse, every listed shard exists and holds the listed number of documents,
  the totals add up, the tokenizer matches and fits, and the token ids of the first ``scan_tokens``
  tokens (spread over the shards; all of them when the source is smaller) lie in ``[0, vocab_size)``.
  """
  shards = _check_prepared(cfg.source) if cfg.source != "synthetic" else []
  try:
    tok = resolve_tokenizer(cfg)
  except (ValueError, OSError) as e:
    raise DataSourceError(f"data: {e}") from None
  where = "the tokenizer" if cfg.source == "synthetic" else f"the tokenizer of {cfg.source!r}"
  if tok.vocab_size > vocab_size:
    raise DataSourceError(f"model.vocab_size={vocab_size} is smaller than the vocabulary of {where} "
                          f"({tok.vocab_size}); token ids would fall outside the embedding table")
  special = {k: v for k, v in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id))
             if v is not None and not 0 <= v < vocab_size}
  if special:
    raise DataSourceError(f"special token id(s) of {where} outside model.vocab_size={vocab_size}: "
                          + ", ".join(f"{k}={v}" for k, v in special.items()))
  budget = max(scan_tokens, 0) // max(len(shards), 1)  # per shard; unspent budget carries over
  spent = 0
  for i, s in enumerate(shards):
    spent += _scan_ids(s, vocab_size, budget * (i + 1) - spent, _redo(cfg.source))


def _redo(path: str) -> str:
  return f"re-create it with `python -m hydrahead_jax.data.prepare --inputs ... --out {path} --overwrite`"


def _reader(file: str, redo: str):
  from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

  try:
    return ArrayRecordReader(file)
  except Exception as e:  # noqa: BLE001 (any reader failure: truncated / not an ArrayRecord file)
    raise DataSourceError(f"{file}: unreadable shard ({' '.join(str(e).split())[:160]}); {redo}") from None


def _check_prepared(path: str) -> list[dict[str, Any]]:
  """Checks a prepared directory against its manifest; returns the shard entries (absolute files)."""
  from hydrahead_jax.data.prepare import FORMAT  # noqa: PLC0415

  redo = _redo(path)
  if not os.path.exists(path):
    raise DataSourceError(f"data.source {path!r}: no such directory (set data.source to a directory "
                          "written by `python -m hydrahead_jax.data.prepare`, or to 'synthetic')")
  if not os.path.isdir(path):
    raise DataSourceError(f"data.source {path!r}: not a directory (expected one written by prepare)")
  if not os.listdir(path):
    raise DataSourceError(f"data.source {path!r}: empty directory (no {MANIFEST}, no shards); {redo}")
  mf = os.path.join(path, MANIFEST)
  if not os.path.isfile(mf):
    raise DataSourceError(f"data.source {path!r}: no {MANIFEST} (an unfinished or foreign directory); {redo}")
  try:
    with open(mf) as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataSourceError(f"{mf}: not valid JSON ({e}); {redo}") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    raise DataSourceError(f"{mf}: format {got!r}, expected {FORMAT!r}; {redo}")
  shards = manifest.get("shards")
  if not isinstance(shards, list) or not shards or not all(
      isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("num_docs"), int)
      for s in shards):
    raise DataSourceError(f"{mf}: lists no shards (or malformed shard entries); {redo}")
  total = sum(s["num_docs"] for s in shards)
  if total < 1:
    raise DataSourceError(f"{mf}: the source holds no documents; {redo}")
  if manifest.get("num_docs") not in (None, total):
    raise DataSourceError(f"{mf}: num_docs={manifest['num_docs']} but its shards list {total} documents; {redo}")
  out = []
  for s in shards:
    file = os.path.join(path, s["file"])
    if not os.path.isfile(file):
      raise DataSourceError(f"data.source {path!r}: shard {s['file']!r} listed in {MANIFEST} is missing; "
                            f"the directory does not match its manifest; {redo}")
    reader = _reader(file, redo)
    try:
      n = reader.num_records()
    finally:
      reader.close()
    if n != s["num_docs"]:
      raise DataSourceError(f"{file}: holds {n} documents but {MANIFEST} lists {s['num_docs']}; the "
                            f"directory does not match its manifest; {redo}")
    out.append({**s, "file": file})
  return out


def _scan_ids(shard: Mapping[str, Any], vocab_size: int, allowance: int, redo: str) -> int:
  """Checks the token ids of the shard's first documents (up to ``allowance`` tokens); returns the
  number of tokens read. A fully read shard must hold the manifest's ``num_tokens``."""
  file, n = shard["file"], shard["num_docs"]
  reader = _reader(file, redo)
  read, doc = 0, 0
  try:
    while doc < n and read < allowance:
      end = min(n, doc + 256)
      try:
        records = reader.read(doc, end)
      except Exception as e:  # noqa: BLE001
        raise DataSourceError(f"{file}: unreadable records {doc}..{end - 1} "
                              f"({' '.join(str(e).split())[:160]}); {redo}") from None
      for j, rec in enumerate(records):
        if len(rec) % 4:
          raise DataSourceError(f"{file}: document {doc + j} is {len(rec)} bytes, not whole int32 token "
                                f"ids; {redo}")
        ids = np.frombuffer(rec, dtype="<i4")
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
          bad = int(ids.max()) if ids.max() >= vocab_size else int(ids.min())
          raise DataSourceError(f"{file}: document {doc + j} has token id {bad}, outside [0, {vocab_size}) "
                                "of model.vocab_size (prepared with another tokenizer, or a damaged shard?)")
        read += ids.size
      doc = end
  finally:
    reader.close()
  if doc == n and shard.get("num_tokens") is not None and read != shard["num_tokens"]:
    raise DataSourceError(f"{file}: holds {read} tokens but {MANIFEST} lists {shard['num_tokens']}; the "
                          f"directory does not match its manifest; {redo}")
  return read


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
