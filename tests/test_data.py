"""Data layer: tokenizers, synthetic tasks, probes, grain packing/resume, prepare round-trip."""

from __future__ import annotations

import json
import os

import grain
import numpy as np
import pytest

from hydrahead_jax.data import pipeline as P
from hydrahead_jax.data import prepare as prep
from hydrahead_jax.data import synthetic as S
from hydrahead_jax.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

BYTE = ByteTokenizer()
RETRIEVAL = ("mqar", "niah_single", "niah_multikey", "niah_multivalue")


def _cfg(**kw) -> P.DataConfig:
  base = dict(seq_len=256, batch_size=2, seed=3, min_doc_len=40, max_doc_len=257,
              task_weights={"grammar": 0.5, "mqar": 0.5})
  base.update(kw)
  return P.DataConfig(**base)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b) -> bool:
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def _runs(mask: np.ndarray) -> list[np.ndarray]:
  idx = np.nonzero(mask)[0]
  return np.split(idx, np.nonzero(np.diff(idx) > 1)[0] + 1) if len(idx) else []


def _segments(batch, b: int) -> list[np.ndarray]:
  """Documents of row b: input tokens of each segment (+ the last target if it is the same doc's)."""
  seg = batch["segment_ids"][b]
  out = []
  for s in range(1, seg.max() + 1):
    idx = np.nonzero(seg == s)[0]
    doc = batch["inputs"][b, idx]
    if batch["loss_mask"][b, idx[-1]]:
      doc = np.append(doc, batch["targets"][b, idx[-1]])
    out.append(doc)
  return out


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
  """A tiny byte-level BPE tokenizer trained in-process, saved as tokenizer.json."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<pad>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = [S._sentence(np.random.default_rng(i)) for i in range(300)]
  corpus += ["The secret code for amber falcon is 12345.", "Question: What is the answer?"]
  tok.train_from_iterator(corpus, trainer)
  path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
  tok.save(str(path))
  return str(path)


# -- tokenizers -----------------------------------------------------------------------------------
def test_byte_tokenizer():
  assert BYTE.vocab_size == 320 and BYTE.vocab_size % 64 == 0
  ids = {BYTE.pad_id, BYTE.bos_id, BYTE.eos_id, *(BYTE.marker(i) for i in range(BYTE.num_markers))}
  assert len(ids) == 3 + BYTE.num_markers and min(ids) >= 256 and max(ids) < BYTE.vocab_size
  text = "héllo\nwörld ✓"
  assert BYTE.decode([BYTE.bos_id, *BYTE.encode(text), BYTE.eos_id, BYTE.pad_id]) == text
  assert BYTE.decode([104, BYTE.marker(2), 105]) == "h<|m2|>i"
  assert isinstance(load_tokenizer(None), ByteTokenizer)


def test_hf_tokenizer(hf_path):
  tok = load_tokenizer(hf_path)
  assert isinstance(tok, HFTokenizer) and tok.vocab_size <= 400
  assert tok.bos_id == tok.eos_id == 0 and tok.pad_id == 1
  text = "The quiet fox sees 42 dogs. Ünïcode too"
  assert tok.decode(tok.encode(text)) == text
  import pickle
  assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)


# -- synthetic tasks ------------------------------------------------------------------------------
@pytest.mark.parametrize("task", S.TASKS)
def test_examples_exact_length_and_deterministic(task):
  a = S.generate_example(task, 7, 11, 300, BYTE)
  b = S.generate_example(task, 7, 11, 300, BYTE)
  c = S.generate_example(task, 7, 12, 300, BYTE)
  assert len(a["tokens"]) == len(a["answer_mask"]) == 300 and a["tokens"].dtype == np.int32
  assert np.array_equal(a["tokens"], b["tokens"]) and not np.array_equal(a["tokens"], c["tokens"])
  assert a["tokens"][0] == BYTE.bos_id and a["tokens"][-1] == BYTE.eos_id
  assert (task == "grammar") == (a["answer_mask"].sum() == 0)


@pytest.mark.parametrize("tok_kind", ["byte", "hf"])
@pytest.mark.parametrize("task", RETRIEVAL)
def test_answer_mask_marks_exactly_the_answers(task, tok_kind, hf_path):
  tok = BYTE if tok_kind == "byte" else load_tokenizer(hf_path)
  for idx in range(3):
    ex = S.generate_example(task, 1, idx, 400, tok)
    assert len(ex["tokens"]) == 400
    runs = _runs(ex["answer_mask"])
    got = [tok.decode(ex["tokens"][r]).strip() for r in runs]
    assert got == ex["answers"] and len(got) >= 1
    text = tok.decode(ex["tokens"])
    for v in ex["answers"]:  # each answer also appears earlier, in the context
      assert text.count(v) >= 2


def test_too_short_and_unknown_task_errors():
  with pytest.raises(ValueError, match="too short"):
    S.generate_example("niah_multivalue", 0, 0, 40, BYTE)
  with pytest.raises(ValueError, match="unknown synthetic task"):
    S.generate_example("nope", 0, 0, 100, BYTE)
  with pytest.raises(ValueError, match="unknown tasks"):
    S.MixtureConfig(weights={"mqar": 1.0, "bogus": 1.0})


@pytest.mark.parametrize("tok_kind", ["byte", "hf"])
@pytest.mark.parametrize("task", RETRIEVAL)
def test_probe_pairs_differ_only_in_needle(task, tok_kind, hf_path):
  tok = BYTE if tok_kind == "byte" else load_tokenizer(hf_path)
  clean, corrupt, start, a_clean, a_corrupt = S.make_probe_pair(task, 5, 350, tok)
  assert len(clean) == len(corrupt) == start == 350
  assert len(a_clean) == len(a_corrupt) and not np.array_equal(a_clean, a_corrupt)
  again = S.make_probe_pair(task, 5, 350, tok)
  assert np.array_equal(again[0], clean) and np.array_equal(again[1], corrupt)
  # Every differing token lies in an occurrence of a clean needle value, replaced by a corrupt one.
  vals_c = [tok.encode(f" {v}") for v in tok.decode(a_clean).replace(",", " ").split()]
  vals_x = [tok.encode(f" {v}") for v in tok.decode(a_corrupt).replace(",", " ").split()]
  diff = np.nonzero(clean != corrupt)[0]
  covered, hits = np.zeros(len(clean), bool), 0
  for vc, vx in zip(vals_c, vals_x):
    for s in range(len(clean) - len(vc) + 1):
      if list(clean[s:s + len(vc)]) == vc and (clean[s:s + len(vc)] != corrupt[s:s + len(vc)]).any():
        assert list(corrupt[s:s + len(vc)]) == vx
        covered[s:s + len(vc)] = True
        hits += 1
  assert covered[diff].all() and hits == len(vals_c)
  assert tok.decode(clean).rstrip().endswith(("is", "are", ":"))


# -- pipeline -------------------------------------------------------------------------------------
def test_batch_format_and_determinism():
  a = _take(P.make_train_iterator(_cfg()), 3)
  b = _take(P.make_train_iterator(_cfg()), 3)
  c = _take(P.make_train_iterator(_cfg(seed=4)), 3)
  assert _same(a, b) and not _same(a, c)
  dtypes = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
            "loss_mask": np.float32, "answer_mask": np.float32}
  for k, dt in dtypes.items():
    assert a[0][k].shape == (2, 256) and a[0][k].dtype == dt, k


def test_resume_exact():
  it = P.make_train_iterator(_cfg())
  _take(it, 3)
  state = it.get_state()
  json.dumps(state)  # grain checkpoints it as JSON
  want = _take(it, 4)
  fresh = P.make_train_iterator(_cfg())
  fresh.set_state(state)
  assert _same(_take(fresh, 4), want)


def test_packing_segments_positions_masks():
  cfg = _cfg(task_weights={"grammar": 0.5, "mqar": 0.3, "niah_single": 0.2}, min_doc_len=24)
  mcfg = cfg.mixture()
  saw_multi = False
  for batch in _take(P.make_train_iterator(cfg), 4):
    seg, pos, lm = batch["segment_ids"], batch["positions"], batch["loss_mask"]
    for b in range(seg.shape[0]):
      s = seg[b]
      k = s.max()
      saw_multi |= k > 1
      nz = s[s > 0]
      assert (np.diff(nz) >= 0).all() and set(nz) == set(range(1, k + 1))  # contiguous runs 1..k
      assert (s[len(nz):] == 0).all()  # padding only at the end
      for d in range(1, k + 1):
        idx = np.nonzero(s == d)[0]
        assert (pos[b, idx] == np.arange(len(idx))).all()
      for doc in _segments(batch, b):  # each segment is exactly one document
        assert doc[0] == BYTE.bos_id and doc[-1] == BYTE.eos_id
        assert not np.isin(doc[1:-1], [BYTE.bos_id, BYTE.eos_id, BYTE.pad_id]).any()
        assert mcfg.min_len <= len(doc) <= mcfg.max_len
    real = lm > 0
    assert not real[seg == 0].any() and not real[batch["inputs"] == BYTE.eos_id].any()
    inner = real[:, :-1]
    assert (batch["targets"][:, :-1][inner] == batch["inputs"][:, 1:][inner]).all()
    assert (lm[(seg > 0) & (batch["inputs"] != BYTE.eos_id)] == 1).all()
    assert not (batch["answer_mask"] > lm).any()
  assert saw_multi


def test_train_answer_mask_targets_are_answers():
  cfg = _cfg(task_weights={"niah_single": 1.0}, min_doc_len=200)
  batch = next(P.make_train_iterator(cfg))
  for b in range(2):
    am = batch["answer_mask"][b] > 0
    for r in _runs(am):
      assert BYTE.decode(batch["targets"][b, r]).isdigit() and len(r) == 5


def test_split_doc_covers_each_transition_once():
  doc = {"tokens": np.arange(23, dtype=np.int32), "answer_mask": np.zeros(23, np.uint8)}
  pieces = P.SplitDoc(9).flat_map(doc)
  assert [len(p["tokens"]) for p in pieces] == [9, 9, 7]
  pairs = [(int(a), int(b)) for p in pieces for a, b in zip(p["tokens"][:-1], p["tokens"][1:])]
  assert pairs == [(i, i + 1) for i in range(22)]
  assert P.SplitDoc(9).flat_map({"tokens": np.zeros(1, np.int32), "answer_mask": np.zeros(1)}) == []


def test_process_sharding_disjoint():
  cfg = _cfg()
  tok = BYTE
  shards = [P.documents(cfg, tok, grain.sharding.ShardOptions(i, 2)) for i in range(2)]
  seen = [{shards[i][j]["tokens"].tobytes() for j in range(12)} for i in range(2)]
  assert not seen[0] & seen[1]
  a = next(P.make_train_iterator(cfg, 0, 2))
  b = next(P.make_train_iterator(cfg, 1, 2))
  assert not np.array_equal(a["inputs"], b["inputs"])


def test_eval_batches():
  batch = P.make_eval_batches("niah_multikey", 3, 300, seed=2, tokenizer=BYTE)
  assert batch["inputs"].shape == (3, 300) and (batch["segment_ids"] == 1).all()
  assert np.array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  for b in range(3):
    ex = S.generate_example("niah_multikey", 2, P.EVAL_INDEX_OFFSET + b, 301, BYTE)
    got = [BYTE.decode(batch["targets"][b, r]) for r in _runs(batch["answer_mask"][b] > 0)]
    assert got == ex["answers"]
  assert P.retrieval_accuracy(batch["targets"], batch) == 1.0
  assert P.example_accuracy(batch["inputs"], batch) == 0.0


# -- prepare --------------------------------------------------------------------------------------
TXT = "A long document.\n\nWith a blank line, unicode ✓ and more text " + "la " * 60
JSONL_DOCS = ["first doc", "second document with more words", "third ünïcode"]


def _write_inputs(tmp_path):
  a = tmp_path / "a.txt"
  a.write_text(TXT, encoding="utf-8")
  b = tmp_path / "b.jsonl"
  lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(JSONL_DOCS)]
  b.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
  return [str(a), str(b)]


@pytest.mark.parametrize("tok_kind", ["byte", "hf"])
def test_prepare_round_trip(tmp_path, tok_kind, hf_path):
  tok_path = None if tok_kind == "byte" else hf_path
  out = tmp_path / "out"
  assert prep.main(["--inputs", *_write_inputs(tmp_path), "--out", str(out), "--docs-per-shard", "2"]
                   + ([] if tok_path is None else ["--tokenizer", tok_path])) == 0
  m = json.loads((out / "manifest.json").read_text())
  assert m["num_docs"] == 4 and len(m["shards"]) == 2 and m["dtype"] == "int32"
  tok = P.resolve_tokenizer(P.DataConfig(source=str(out)))
  assert m["vocab_size"] == tok.vocab_size and m["tokenizer"]["type"] == tok_kind
  src = grain.sources.ArrayRecordDataSource([str(out / s["file"]) for s in m["shards"]])
  decode = P.DecodeDoc(None, None)
  texts = [tok.decode(decode.map(src[i])["tokens"]) for i in range(len(src))]
  assert texts == [TXT, *JSONL_DOCS]
  assert m["num_tokens"] == sum(len(decode.map(src[i])["tokens"]) for i in range(len(src)))
  # Through the training pipeline: rows long enough for whole documents -> the exact texts.
  cfg = P.DataConfig(source=str(out), seq_len=512, batch_size=2, seed=0)
  seen = set()
  for batch in _take(P.make_train_iterator(cfg), 4):
    for b in range(2):
      for doc in _segments(batch, b):
        assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id
        seen.add(tok.decode(doc[1:-1]))
  assert seen == {TXT, *JSONL_DOCS}
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_prepared_long_docs_are_split(tmp_path):
  out = tmp_path / "out"
  prep.prepare(_write_inputs(tmp_path), str(out))
  full = [np.array([BYTE.bos_id, *BYTE.encode(t), BYTE.eos_id]) for t in [TXT, *JSONL_DOCS]]
  cfg = P.DataConfig(source=str(out), seq_len=32, batch_size=2, seed=1)
  pieces = []
  for batch in _take(P.make_train_iterator(cfg), 8):
    for b in range(2):
      pieces += _segments(batch, b)
      s = batch["segment_ids"][b]
      assert len(np.unique(s[s > 0])) == s.max()
  assert max(len(p) for p in pieces) == 33
  for p in pieces:  # every piece is a contiguous slice of one document
    assert any(any(np.array_equal(f[i:i + len(p)], p) for i in range(len(f) - len(p) + 1))
               for f in full)


def test_prepare_tokenizer_mismatch(tmp_path, hf_path):
  out = tmp_path / "out"
  prep.prepare(_write_inputs(tmp_path), str(out))
  with pytest.raises(ValueError, match="does not match"):
    P.resolve_tokenizer(P.DataConfig(source=str(out), tokenizer=hf_path))


def test_prepare_bad_inputs(tmp_path, capsys):
  good = _write_inputs(tmp_path)
  out = str(tmp_path / "out")

  def fails(inputs, match, **kw):
    with pytest.raises(prep.PrepareError, match=match):
      prep.prepare(inputs, out, **kw)
    assert not os.path.exists(out)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]

  fails([str(tmp_path / "missing.txt")], "missing.txt: no such file")
  (tmp_path / "empty.txt").write_text("  \n\n")
  fails([good[0], str(tmp_path / "empty.txt")], "empty.txt: empty file")
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
  fails([str(tmp_path / "bad.jsonl")], r"bad.jsonl:2: bad JSON")
  (tmp_path / "nokey.jsonl").write_text('{"text": "ok"}\n\n{"body": "x"}\n')
  fails([str(tmp_path / "nokey.jsonl")], r"nokey.jsonl:3: no 'text' key")
  (tmp_path / "blank.jsonl").write_text("\n\n")
  fails([str(tmp_path / "blank.jsonl")], "blank.jsonl: no documents")
  (tmp_path / "x.csv").write_text("a,b\n")
  fails([str(tmp_path / "x.csv")], "unsupported input type")
  fails([], "no input files")
  prep.prepare(good, out)
  with pytest.raises(prep.PrepareError, match="already exists"):
    prep.prepare(good, out)
  assert prep.main(["--inputs", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o2")]) == 2
  err = capsys.readouterr().err
  assert "bad.jsonl:2" in err and err.startswith("error: ") and err.count("\n") == 1, err
