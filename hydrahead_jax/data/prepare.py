"""Tokenize local text into ArrayRecord shards plus ``manifest.json``.

  python -m hydrahead_jax.data.prepare --inputs a.txt b.jsonl --tokenizer tok/tokenizer.json \\
      --out DIR [--text-key text] [--docs-per-shard N] [--overwrite]

Inputs: a ``.txt`` file is ONE document (whole file, e.g. a book: long-context data stays whole);
a ``.jsonl`` file holds one JSON object per line whose ``--text-key`` field is a document (blank
lines and empty texts are skipped). Each record is one document's token ids as little-endian int32
bytes, without bos/eos (the pipeline adds them). The tokenizer file is copied into DIR, so the
output is self-contained. Everything is written to a temporary sibling directory that is renamed to
DIR at the end; on any error it is removed and a ``PrepareError`` names the file (and line).
The CLI prints a user error (``PrepareError``, a bad argument or tokenizer) as one line ``error: ...`` on stderr and
exits with code 2; ``--debug`` shows the traceback (``hydrahead_jax.cli``, docs/reliability.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Iterator, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from hydrahead_jax.cli import ArgumentParser, UserError, cli_main
from hydrahead_jax.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

FORMAT = "hydrahead-tokens-v1"


class PrepareError(ValueError):
  """Bad input for the prepare step (the message names the file and line)."""


def _read_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise PrepareError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _jsonl_docs(path: str, text_key: str) -> Iterator[str]:
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise PrepareError(f"{where}: not valid UTF-8 ({e.reason})") from None
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise PrepareError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(obj, dict):
        raise PrepareError(f"{where}: expected a JSON object, got {type(obj).__name__}")
      if text_key not in obj:
        raise PrepareError(f"{where}: no {text_key!r} key (keys: {sorted(obj)[:10]}); "
                           "choose the field with --text-key")
      text = obj[text_key]
      if not isinstance(text, str):
        raise PrepareError(f"{where}: {text_key!r} must be a string, got {type(text).__name__}")
      if text:
        yield text


def iter_documents(path: str, text_key: str = "text") -> Iterator[str]:
  """The documents of one input file (see the module docstring)."""
  ext = os.path.splitext(path)[1].lower()
  if ext == ".txt":
    text = _read_text(path)
    if not text.strip():
      raise PrepareError(f"{path}: empty file")
    yield text
  elif ext == ".jsonl":
    yield from _jsonl_docs(path, text_key)
  else:
    raise PrepareError(f"{path}: unsupported input type {ext or '(none)'!r}; use .txt or .jsonl")


def _check_inputs(inputs: Sequence[str]) -> None:
  if not inputs:
    raise PrepareError("no input files given")
  for p in inputs:
    if not os.path.isfile(p):
      raise PrepareError(f"{p}: no such file")


class _ShardWriter:
  """Rolls ArrayRecord shards of ``docs_per_shard`` documents in ``tmp``."""

  def __init__(self, tmp: str, docs_per_shard: int):
    self.tmp, self.per = tmp, docs_per_shard
    self.shards: list[dict[str, Any]] = []
    self._w: ArrayRecordWriter | None = None

  def write(self, ids: Sequence[int]) -> None:
    if self._w is None or self.shards[-1]["num_docs"] >= self.per:
      self._roll()
    arr = np.asarray(ids, dtype="<i4")
    self._w.write(arr.tobytes())
    self.shards[-1]["num_docs"] += 1
    self.shards[-1]["num_tokens"] += int(arr.size)

  def _roll(self) -> None:
    self.close()
    name = f"shard-{len(self.shards):05d}.array_record"
    self._w = ArrayRecordWriter(os.path.join(self.tmp, name), "group_size:1")
    self.shards.append({"file": name, "num_docs": 0, "num_tokens": 0})

  def close(self) -> None:
    if self._w is not None:
      self._w.close()
      self._w = None


def _tokenizer_record(tok: Tokenizer, tmp: str) -> dict[str, Any]:
  info = dict(tok.info())
  if isinstance(tok, HFTokenizer):
    shutil.copy(tok.path, os.path.join(tmp, "tokenizer.json"))
    cfg = os.path.join(os.path.dirname(tok.path), "tokenizer_config.json")
    if os.path.isfile(cfg):
      shutil.copy(cfg, os.path.join(tmp, "tokenizer_config.json"))
    info["file"] = "tokenizer.json"
  return info


def _write_all(inputs, tok, tmp, text_key, docs_per_shard) -> dict[str, Any]:
  writer = _ShardWriter(tmp, docs_per_shard)
  try:
    for path in inputs:
      before = sum(s["num_docs"] for s in writer.shards)
      for text in iter_documents(path, text_key):
        ids = tok.encode(text)
        if ids:
          writer.write(ids)
      if sum(s["num_docs"] for s in writer.shards) == before:
        raise PrepareError(f"{path}: no documents (all lines blank or texts empty)")
  finally:
    writer.close()
  return {
      "format": FORMAT, "dtype": "int32", "byte_order": "little", "add_bos_eos": False,
      "tokenizer": _tokenizer_record(tok, tmp), "vocab_size": tok.vocab_size,
      "num_docs": sum(s["num_docs"] for s in writer.shards),
      "num_tokens": sum(s["num_tokens"] for s in writer.shards),
      "shards": writer.shards, "inputs": [os.path.abspath(p) for p in inputs], "text_key": text_key,
  }


def prepare(inputs: Sequence[str], out: str, tokenizer: str | None = None, text_key: str = "text",
            docs_per_shard: int = 10_000, overwrite: bool = False) -> dict[str, Any]:
  """Tokenizes ``inputs`` into ``out`` (ArrayRecord shards + manifest.json); returns the manifest."""
  _check_inputs(inputs)
  if docs_per_shard < 1:
    raise PrepareError(f"docs_per_shard must be >= 1, got {docs_per_shard}")
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite:
    raise PrepareError(f"{out}: already exists (pass --overwrite to replace it)")
  tok = load_tokenizer(tokenizer)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
  try:
    manifest = _write_all(inputs, tok, tmp, text_key, docs_per_shard)
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
      json.dump(manifest, f, indent=2)
    _replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def _replace(tmp: str, out: str) -> None:
  if not os.path.exists(out):
    os.rename(tmp, out)
    return
  old = tmp + ".old"
  os.rename(out, old)
  os.rename(tmp, out)
  shutil.rmtree(old, ignore_errors=True)


def _check_tokenizer(path: str) -> None:
  """--tokenizer names a tokenizer that loads (checked before any output is written)."""
  if not os.path.exists(path):
    raise PrepareError(f"--tokenizer {path}: no such file or directory")
  try:
    load_tokenizer(path)
  except UserError:
    raise
  except (OSError, ValueError, KeyError) as e:
    raise PrepareError(f"--tokenizer {path}: cannot be read ({e})") from e
  except Exception as e:  # the tokenizers library raises plain Exceptions for files it cannot parse
    if type(e) is not Exception:
      raise
    raise PrepareError(f"--tokenizer {path}: cannot be read ({e})") from e


@cli_main(user_errors=(PrepareError,))
def main(argv: Sequence[str] | None = None) -> int:
  ap = ArgumentParser(prog="python -m hydrahead_jax.data.prepare", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--inputs", nargs="+", required=True, help=".txt (one document each) / .jsonl files")
  ap.add_argument("--out", required=True, help="output directory (created atomically)")
  ap.add_argument("--tokenizer", default=None, help="tokenizer.json; default: byte-level")
  ap.add_argument("--text-key", default="text", help="jsonl field holding the text")
  ap.add_argument("--docs-per-shard", type=int, default=10_000)
  ap.add_argument("--overwrite", action="store_true")
  args = ap.parse_args(argv)
  if args.tokenizer is not None:
    _check_tokenizer(args.tokenizer)
  m = prepare(args.inputs, args.out, args.tokenizer, args.text_key, args.docs_per_shard, args.overwrite)
  print(f"prepare: {m['num_docs']} documents, {m['num_tokens']} tokens, {len(m['shards'])} shards "
        f"-> {os.path.abspath(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
