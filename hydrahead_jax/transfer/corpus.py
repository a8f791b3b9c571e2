"""Real text offline: a corpus from the Python packages installed in this interpreter.

Every installed distribution (or the named ones) in name order; its files with the given extensions (``.py``
sources with their docstrings and comments, ``.md``/``.rst``/``.txt`` docs) in path order, concatenated with a
``# file: <path>`` header each into documents of up to ``doc_chars`` characters, until about ``max_tokens``
tokens (estimated from a tokenized sample, counted exactly by ``prepare``). The documents are tokenized with the
teacher's tokenizer through ``hydrahead_jax.data.prepare``; the last ``heldout_docs`` documents are kept out of
training (``heldout.jsonl``, raw text) for evaluation. The manifest gets a ``provenance`` entry: interpreter,
package names and versions with file / character / document counts, per-document token-length statistics.

    python -m hydrahead_jax.transfer.corpus --tokenizer runs/x/tokenizer/tokenizer.json --out runs/corpus \\
        [--max-tokens 4000000] [--packages numpy,jax]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import sys
import tempfile
import time
from typing import Iterator, Sequence

import numpy as np

from hydrahead_jax.transfer.config import CorpusConfig

HELDOUT = "heldout.jsonl"
MIN_FILE_CHARS = 200
MAX_FILE_CHARS = 400_000  # generated tables / vendored blobs are skipped


def _distributions(names: Sequence[str]) -> list[md.Distribution]:
  dists = {}
  for d in md.distributions():
    name = (d.metadata["Name"] or "").lower()
    if name and name not in dists:
      dists[name] = d
  if names:
    missing = [n for n in names if n.lower() not in dists]
    if missing:
      raise ValueError(f"corpus.packages: not installed here: {missing}")
    return [dists[n.lower()] for n in names]
  return [dists[k] for k in sorted(dists)]


def _files(dist: md.Distribution, extensions: Sequence[str]) -> Iterator[tuple[str, str]]:
  for f in sorted(dist.files or [], key=str):
    path = str(f)
    if not path.endswith(tuple(extensions)) or "__pycache__" in path or ".dist-info" in path:
      continue
    full = dist.locate_file(f)
    try:
      size = os.path.getsize(full)
      if not MIN_FILE_CHARS <= size <= MAX_FILE_CHARS:
        continue
      with open(full, encoding="utf-8") as fh:
        text = fh.read()
    except (OSError, UnicodeDecodeError):
      continue
    yield path, text


def collect(ccfg: CorpusConfig, chars_per_token: float) -> tuple[list[str], list[dict]]:
  """Documents (text) and per-package provenance, stopping at about ``max_tokens`` tokens (plus held-out docs)."""
  docs, packages = [], []
  budget_chars = int(ccfg.max_tokens * chars_per_token)
  total = 0
  want = None  # number of documents to stop at: those reaching the budget, then the held-out ones

  def full():
    return want is not None and len(docs) >= want

  for dist in _distributions(ccfg.packages):
    info = {"name": dist.metadata["Name"], "version": dist.version, "files": 0, "chars": 0, "docs": 0}
    cur: list[str] = []
    cur_len = 0
    for path, text in _files(dist, ccfg.extensions):
      piece = f"# file: {path}\n{text}\n"[:ccfg.doc_chars]
      if cur and cur_len + len(piece) > ccfg.doc_chars:
        docs.append("".join(cur))
        info["docs"] += 1
        cur, cur_len = [], 0
        if want is None and total >= budget_chars:
          want = len(docs) + ccfg.heldout_docs
        if full():
          break
      cur.append(piece)
      cur_len += len(piece)
      info["files"] += 1
      info["chars"] += len(piece)
      total += len(piece)
    if cur and not full():  # documents never span two packages
      docs.append("".join(cur))
      info["docs"] += 1
      if want is None and total >= budget_chars:
        want = len(docs) + ccfg.heldout_docs
    if info["files"]:
      packages.append(info)
    if full():
      break
  return docs, packages


def _chars_per_token(tok, sample: str) -> float:
  ids = tok.encode(sample)
  return max(len(sample) / max(len(ids), 1), 0.5)


def build(ccfg: CorpusConfig, tokenizer_path: str | None, out: str, print_fn=print) -> dict:
  """Builds the corpus into ``out`` (atomically, through ``prepare``); returns the manifest."""
  from hydrahead_jax.data.prepare import prepare
  from hydrahead_jax.data.tokenizer import load_tokenizer

  t0 = time.perf_counter()
  tok = load_tokenizer(tokenizer_path)
  probe_docs, _ = collect(CorpusConfig(packages=ccfg.packages, max_tokens=20_000, doc_chars=ccfg.doc_chars,
                                       extensions=ccfg.extensions, heldout_docs=0), 1.0)
  cpt = _chars_per_token(tok, "".join(probe_docs)[:200_000]) if probe_docs else 1.0
  docs, packages = collect(ccfg, cpt)
  if len(docs) <= ccfg.heldout_docs:
    raise ValueError(f"corpus: only {len(docs)} documents found in the installed packages "
                     f"(need more than corpus.heldout_docs={ccfg.heldout_docs})")
  train_docs = docs[:len(docs) - ccfg.heldout_docs]
  held = docs[len(docs) - ccfg.heldout_docs:]
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, "docs.jsonl")
    with open(src, "w") as f:
      for d in train_docs:
        f.write(json.dumps({"text": d}) + "\n")
    manifest = prepare([src], out, tokenizer_path, overwrite=True)
  with open(os.path.join(out, HELDOUT), "w") as f:
    for d in held:
      f.write(json.dumps({"text": d}) + "\n")
  lengths = doc_lengths(out, manifest)
  manifest["inputs"] = ["<installed python packages, see provenance>"]
  manifest["provenance"] = {
      "source": "text of the Python packages installed in this interpreter (hydrahead_jax.transfer.corpus)",
      "python": sys.version.split()[0], "prefix": sys.prefix,
      "extensions": list(ccfg.extensions), "doc_chars": ccfg.doc_chars, "max_tokens_asked": ccfg.max_tokens,
      "chars_per_token_estimate": round(cpt, 3), "packages": packages,
      "train_docs": len(train_docs), "heldout_docs": len(held), "heldout_file": HELDOUT,
      "doc_tokens": {"max": int(lengths.max()), "median": float(np.median(lengths)), "min": int(lengths.min()),
                     "docs_over_8192": int((lengths > 8192).sum()), "docs_over_16384": int((lengths > 16384).sum())},
      "seconds": round(time.perf_counter() - t0, 1),
  }
  with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2)
  print_fn(f"corpus: {len(train_docs)} documents, {manifest['num_tokens']:,} tokens from {len(packages)} installed "
           f"packages (+{len(held)} held-out documents) -> {out} ({manifest['provenance']['seconds']} s)")
  return manifest


def doc_lengths(path: str, manifest: dict) -> np.ndarray:
  from array_record.python.array_record_module import ArrayRecordReader

  out = []
  for s in manifest["shards"]:
    r = ArrayRecordReader(os.path.join(path, s["file"]))
    try:
      out += [len(x) // 4 for x in r.read(0, r.num_records())]
    finally:
      r.close()
  return np.asarray(out, np.int64)


def heldout_rows(path: str, tokenizer, length: int, max_rows: int) -> np.ndarray | None:
  """Up to ``max_rows`` rows of ``length + 1`` tokens (one per held-out document long enough), or None."""
  file = os.path.join(path, HELDOUT)
  if not os.path.isfile(file):
    return None
  rows = []
  with open(file) as f:
    for line in f:
      ids = tokenizer.encode(json.loads(line)["text"])
      if len(ids) >= length + 1:
        rows.append(np.asarray(ids[:length + 1], np.int32))
      if len(rows) >= max_rows:
        break
  return np.stack(rows) if rows else None


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m hydrahead_jax.transfer.corpus", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: byte-level)")
  ap.add_argument("--out", required=True)
  ap.add_argument("--max-tokens", type=int, default=CorpusConfig.max_tokens)
  ap.add_argument("--doc-chars", type=int, default=CorpusConfig.doc_chars)
  ap.add_argument("--packages", default="", help="comma-separated distribution names (default: all installed)")
  ap.add_argument("--heldout-docs", type=int, default=CorpusConfig.heldout_docs)
  args = ap.parse_args(argv)
  ccfg = CorpusConfig(packages=tuple(p for p in args.packages.split(",") if p), max_tokens=args.max_tokens,
                      doc_chars=args.doc_chars, heldout_docs=args.heldout_docs)
  try:
    build(ccfg, args.tokenizer, args.out)
  except ValueError as e:
    print(f"corpus: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
