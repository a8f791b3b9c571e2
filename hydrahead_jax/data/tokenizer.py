"""Tokenizers: a small protocol, a byte-level tokenizer, HF `tokenizer.json` files and GGUF-embedded tokenizers.

``ByteTokenizer`` ids: 0..255 are the raw UTF-8 bytes, then pad (256), bos (257), eos (258) and
``NUM_MARKERS`` reserved marker ids (259..) for token-level synthetic tasks; the vocabulary is padded to
a multiple of 64 (320). ``encode`` never emits special ids; ``decode`` drops pad/bos/eos and renders
markers as ``<|m0|>`` etc.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any, Protocol, Sequence, runtime_checkable

from hydrahead_jax.interop.gguf import GGUFCheckpoint

NUM_MARKERS = 8
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "[BOS]", "<bos>", "<|endoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "[EOS]", "<eos>", "<|im_end|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


@runtime_checkable
class Tokenizer(Protocol):
  """What the data layer needs from a tokenizer."""

  vocab_size: int
  bos_id: int | None
  eos_id: int | None
  pad_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def info(self) -> dict[str, Any]: ...


class ByteTokenizer:
  """UTF-8 bytes plus pad/bos/eos and reserved markers; vocab padded to a multiple of 64."""

  pad_id = 256
  bos_id = 257
  eos_id = 258
  marker_base = 259

  def __init__(self, num_markers: int = NUM_MARKERS, multiple: int = 64):
    self.num_markers = num_markers
    used = self.marker_base + num_markers
    self.vocab_size = -(-used // multiple) * multiple

  def marker(self, i: int) -> int:
    """Id of reserved marker ``i`` (0 <= i < num_markers)."""
    if not 0 <= i < self.num_markers:
      raise ValueError(f"marker index {i} out of range [0, {self.num_markers})")
    return self.marker_base + i

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(t.encode("utf-8")) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    out, buf = [], bytearray()
    for i in (int(x) for x in ids):
      if i < 256:
        buf.append(i)
        continue
      if self.marker_base <= i < self.marker_base + self.num_markers:
        out.append(buf.decode("utf-8", errors="replace"))
        out.append(f"<|m{i - self.marker_base}|>")
        buf = bytearray()
    out.append(buf.decode("utf-8", errors="replace"))
    return "".join(out)

  def info(self) -> dict[str, Any]:
    return {"type": "byte", "vocab_size": self.vocab_size, "num_markers": self.num_markers}


def _token_content(tok: Any) -> str | None:
  if isinstance(tok, dict):
    return tok.get("content")
  return tok if isinstance(tok, str) else None


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


class TokenizersBacked:
  """encode/decode over a ``tokenizers.Tokenizer`` held in ``self._tok`` (no special tokens added)."""

  _tok: Any

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


class HFTokenizer(TokenizersBacked):
  """Wraps ``tokenizers.Tokenizer.from_file``. Special tokens come from the arguments, else a
  ``tokenizer_config.json`` beside the file, else common names found in the vocabulary."""

  def __init__(self, path: str, bos_token: str | None = None, eos_token: str | None = None,
               pad_token: str | None = None):
    from tokenizers import Tokenizer as _HF  # local import: optional dependency at import time

    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer: no such file: {path}")
    self.path = os.path.abspath(path)
    self._overrides = (bos_token, eos_token, pad_token)
    self._tok = _HF.from_file(self.path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    cfg = self._read_config()
    self.bos_id = self._resolve(bos_token or _token_content(cfg.get("bos_token")), _BOS_NAMES)
    self.eos_id = self._resolve(eos_token or _token_content(cfg.get("eos_token")), _EOS_NAMES)
    pad = self._resolve(pad_token or _token_content(cfg.get("pad_token")), _PAD_NAMES)
    self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

  def _read_config(self) -> dict[str, Any]:
    cfg_path = os.path.join(os.path.dirname(self.path), "tokenizer_config.json")
    if not os.path.isfile(cfg_path):
      return {}
    with open(cfg_path) as f:
      return json.load(f)

  def _resolve(self, name: str | None, fallbacks: Sequence[str]) -> int | None:
    if name is not None:
      tid = self._tok.token_to_id(name)
      if tid is None:
        raise ValueError(f"tokenizer {self.path}: special token {name!r} is not in the vocabulary")
      return tid
    for cand in fallbacks:
      tid = self._tok.token_to_id(cand)
      if tid is not None:
        return tid
    return None

  def info(self) -> dict[str, Any]:
    return {"type": "hf", "vocab_size": self.vocab_size, "sha256": _sha256(self.path),
            "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}

  # Picklable for grain worker processes: reload from the file.
  def __getstate__(self) -> dict[str, Any]:
    return {"path": self.path, "overrides": self._overrides}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["path"], *state["overrides"])


# -- the tokenizer embedded in a GGUF file (``tokenizer.ggml.*`` metadata) -----------------------------

# Pre-tokenizer splits by ``tokenizer.ggml.pre`` (as llama.cpp applies them before byte-level BPE).
_DIGITS_FIRST = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3_RE, "llama3": _LLAMA3_RE, "llama-v3": _LLAMA3_RE, "qwen2": _QWEN2_RE}


def _pre_tokenizer(pre: str | None):
  from tokenizers import Regex, pre_tokenizers

  if pre in _DIGITS_FIRST:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  if pre in _SPLITS:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  if pre not in (None, "default", "gpt-2", "gpt2"):
    warnings.warn(f"GGUF tokenizer: pre-tokenizer {pre!r} unknown here; using GPT-2 byte-level splitting")
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def tokenizer_from_gguf(ckpt: GGUFCheckpoint):
  """A ``tokenizers.Tokenizer`` (byte-level BPE) from ``tokenizer.ggml.*`` metadata."""
  from tokenizers import AddedToken, Tokenizer, decoders, models

  kind = ckpt.meta("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"GGUF {ckpt.path}: tokenizer type {kind!r} is not supported (only 'gpt2' byte-level BPE)")
  tokens = ckpt.meta("tokenizer.ggml.tokens")
  merges = ckpt.meta("tokenizer.ggml.merges", None)
  if not merges:
    raise ValueError(f"GGUF {ckpt.path}: byte-level BPE tokenizer without 'tokenizer.ggml.merges'")
  vocab = {t: i for i, t in enumerate(tokens)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
  tok.pre_tokenizer = _pre_tokenizer(ckpt.meta("tokenizer.ggml.pre", None))
  tok.decoder = decoders.ByteLevel()
  types = ckpt.meta("tokenizer.ggml.token_type", None) or []
  special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3]
  user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == 4]
  if special:
    tok.add_special_tokens(special)
  if user:
    tok.add_tokens(user)
  return tok


class GGUFTokenizer(TokenizersBacked):
  """``hydrahead_jax.data.tokenizer.Tokenizer`` protocol over the tokenizer stored in a GGUF file."""

  def __init__(self, path: str):
    ckpt = path if isinstance(path, GGUFCheckpoint) else GGUFCheckpoint(path)
    self.path = os.path.abspath(ckpt.path)
    self._tok = tokenizer_from_gguf(ckpt)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    get = lambda k: None if ckpt.meta(k, None) is None else int(ckpt.meta(k))
    self.bos_id = get("tokenizer.ggml.bos_token_id")
    self.eos_id = get("tokenizer.ggml.eos_token_id")
    pad = get("tokenizer.ggml.padding_token_id")
    self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
    self.add_bos = bool(ckpt.meta("tokenizer.ggml.add_bos_token", False))
    self.chat_template = ckpt.meta("tokenizer.chat_template", None)

  @property
  def backend(self):
    """The underlying ``tokenizers.Tokenizer``."""
    return self._tok

  def info(self) -> dict[str, Any]:
    return {"type": "gguf", "path": self.path, "vocab_size": self.vocab_size,
            "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}

  def save(self, path: str) -> None:
    """Writes a ``tokenizer.json`` (loadable with ``hydrahead_jax.data.load_tokenizer``)."""
    self._tok.save(path)

  def __getstate__(self) -> dict[str, Any]:
    return {"path": self.path}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["path"])


def encode_many(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """Encodes each text separately (batched when the tokenizer supports it)."""
  if not texts:
    return []
  batch = getattr(tok, "encode_batch", None)
  return batch(texts) if batch is not None else [tok.encode(t) for t in texts]


def load_tokenizer(path: str | None = None) -> Tokenizer:
  """``None``: ``ByteTokenizer``; a ``.gguf`` file: its embedded tokenizer; a ``tokenizer.json`` (or a
  directory holding one): ``HFTokenizer``."""
  if path is None:
    return ByteTokenizer()
  if str(path).endswith(".gguf"):
    return GGUFTokenizer(path)
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  return HFTokenizer(path)
