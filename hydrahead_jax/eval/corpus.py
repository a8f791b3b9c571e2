"""Natural text built offline from what every Python install ships: the docstrings of the standard library
(read with ``ast``, nothing imported) and the prose of the language reference (``pydoc_data.topics``).

Prose paragraphs only (>= 8 words, starts upper-case, ends a sentence, >= 85% letters and spaces, no doctest);
in a fixed order (stdlib files sorted by path, then the reference topics). About 5,400 paragraphs,
~230K SmolLM2 tokens on Python 3.11. The text depends on the Python version only; ``fingerprint()`` names it
and is recorded with every result.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import sysconfig

import numpy as np

from hydrahead_jax.data.tokenizer import encode_many

_SKIP_DIRS = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3",
              "turtledemo", "ensurepip")


def _prose(p: str) -> bool:
  if len(p.split()) < 8 or not p[0].isupper() or not p.endswith((".", ":")) or ">>>" in p:
    return False
  return sum(c.isalpha() or c == " " for c in p) / len(p) >= 0.85


def _paragraphs(doc: str, skip_indented: bool = False) -> list[str]:
  out = []
  for p in re.split(r"\n\s*\n", doc):
    if skip_indented and p.startswith("   "):  # code and grammar blocks of the reference
      continue
    p = " ".join(p.split())
    if _prose(p):
      out.append(p)
  return out


@functools.lru_cache(maxsize=1)
def paragraphs() -> tuple[str, ...]:
  """The corpus: prose paragraphs in a fixed order (deduplicated)."""
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for d, dirs, names in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("."))
    files += [os.path.join(d, f) for f in names if f.endswith(".py")]
  out: list[str] = []
  for path in sorted(files, key=lambda f: os.path.relpath(f, root)):
    try:
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc:
          out += _paragraphs(doc)
  try:
    from pydoc_data.topics import topics
  except ImportError:  # some distributions strip it
    topics = {}
  for name in sorted(topics):
    out += _paragraphs(topics[name], skip_indented=True)
  if not out:
    raise RuntimeError(f"eval corpus: no prose found in the Python standard library at {root}")
  return tuple(dict.fromkeys(out))


def fingerprint(paras: tuple[str, ...] | None = None) -> str:
  """sha256 (16 hex digits) of the corpus text."""
  paras = paragraphs() if paras is None else paras
  return hashlib.sha256("\n".join(paras).encode()).hexdigest()[:16]


class TokenizedCorpus:
  """The corpus as token ids for one tokenizer: each paragraph tokenized on its own with a trailing newline."""

  def __init__(self, tokenizer, paras: tuple[str, ...] | None = None):
    self.paragraphs = paragraphs() if paras is None else tuple(paras)
    self.ids = [list(x) for x in encode_many(tokenizer, [p + "\n" for p in self.paragraphs])]
    self.lengths = np.asarray([len(x) for x in self.ids])
    self.total = int(self.lengths.sum())

  def take(self, start: int, budget: int) -> list[list[int]]:
    """Consecutive paragraphs from paragraph ``start`` (wrapping around) totalling exactly ``budget`` tokens
    (the last one cut)."""
    out, n, i = [], 0, start % len(self.ids)
    while n < budget:
      ids = self.ids[i][: budget - n]
      out.append(ids)
      n += len(ids)
      i = (i + 1) % len(self.ids)
    return out

  def document(self, start: int, length: int) -> list[int]:
    """``length`` tokens of running text from paragraph ``start``; never wraps (errors if the corpus is shorter)."""
    if length > self.total:
      raise ValueError(f"eval corpus: {length} tokens requested, the corpus has {self.total} with this tokenizer")
    first = int(np.searchsorted(np.cumsum(self.lengths[::-1]), length))  # paragraphs from the end that hold it
    start = min(start % len(self.ids), len(self.ids) - 1 - first)
    return [t for p in self.take(start, length) for t in p]


@functools.lru_cache(maxsize=4)
def _cached(tokenizer_key, tokenizer) -> TokenizedCorpus:
  return TokenizedCorpus(tokenizer)


def tokenized(tokenizer) -> TokenizedCorpus:
  """The corpus tokenized with ``tokenizer`` (cached per tokenizer)."""
  info = tokenizer.info() if hasattr(tokenizer, "info") else {}
  key = (type(tokenizer).__name__, str(sorted(info.items())))
  return _cached(key, tokenizer)
