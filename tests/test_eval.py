"""Evaluation: deterministic exact-length RULER-style examples over natural text, scoring through the cache equals
the full forward, perplexity buckets, the CLI (outputs, model comparison, one-line errors); the generation
benchmark's CPU smoke run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hydrahead_jax.config import HeadLayout, ModelConfig
from hydrahead_jax.data.tokenizer import ByteTokenizer
from hydrahead_jax.eval import (TASKS, RunSettings, build_examples, chat_parts, evaluate_examples, evaluate_model,
                                match_values, position_buckets)
from hydrahead_jax.eval.cli import main, parse_lengths
from hydrahead_jax.eval.corpus import TokenizedCorpus, fingerprint, paragraphs, tokenized
from hydrahead_jax.nn.model import HydraHeadLM

BYTE = ByteTokenizer()
CFG = ModelConfig(vocab_size=BYTE.vocab_size, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  mlp_dim=64, dtype="float32", la_chunk_size=16, layout=HeadLayout(((0,), ())))


@pytest.fixture(scope="module")
def corpus():
  return tokenized(BYTE)


@pytest.fixture(scope="module")
def model():
  return HydraHeadLM(CFG, rngs=nnx.Rngs(0))


def test_corpus_is_natural_text_and_fixed():
  paras = paragraphs()
  assert len(paras) > 2000 and sum(map(len, paras)) > 500_000  # room for 128K-token haystacks
  assert fingerprint() == fingerprint(tuple(paras))
  assert len(set(paras)) == len(paras) and all(p[0].isupper() and len(p.split()) >= 8 for p in paras)
  small = TokenizedCorpus(BYTE, ("Alpha beta gamma.", "Delta epsilon."))
  assert [len(x) for x in small.take(1, 20)] == [15, 5] and BYTE.decode(small.take(1, 20)[1]) == "Alpha"
  with pytest.raises(ValueError, match="corpus has"):
    small.document(0, 100)


@pytest.mark.parametrize("task", TASKS)
def test_examples_exact_length_and_deterministic(task, corpus):
  for length in (1024, 1100):
    a = build_examples(task, BYTE, corpus, length, 3, seed=7)
    b = build_examples(task, BYTE, corpus, length, 3, seed=7)
    c = build_examples(task, BYTE, corpus, length, 3, seed=8)
    assert [e.prompt for e in a] == [e.prompt for e in b] and [e.prompt for e in a] != [e.prompt for e in c]
    for e in a:
      assert len(e.prompt) == length and e.values
      text = BYTE.decode(e.prompt)
      assert all(v in text for v in e.values)  # every expected value is in the context
      assert all(v in BYTE.decode(e.answer) for v in e.values)


def test_same_content_for_every_tokenizer(corpus):
  """Keys, values and depths depend on the seed only; a second tokenizer (SmolLM2's) gets the same content."""
  from hydrahead_jax.interop.load import tokenizer_for

  try:
    gguf = tokenizer_for("smollm2")
  except FileNotFoundError as e:
    pytest.skip(str(e))
  for task in ("niah_multikey", "vt"):
    a = build_examples(task, BYTE, corpus, 1024, 2, seed=1)
    b = build_examples(task, gguf, tokenized(gguf), 1024, 2, seed=1)
    assert [(e.values, e.depths) for e in a] == [(e.values, e.depths) for e in b]
    assert all(len(e.prompt) == 1024 for e in b)
  before, after = chat_parts(gguf)  # SmolLM2's own template, rendered with jinja2
  assert before.endswith("<|im_start|>user\n") and after == "<|im_end|>\n<|im_start|>assistant\n"
  e = build_examples("niah_single", gguf, tokenized(gguf), 1024, 1, chat=(before, after))[0]
  assert len(e.prompt) == 1024 and gguf.decode(e.prompt).rstrip().endswith("provided text is")


def test_chat_parts_and_matching():
  assert chat_parts(BYTE) is None and chat_parts(BYTE, "off") is None
  assert chat_parts(BYTE, "on") == ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
  with pytest.raises(ValueError, match="auto, on or off"):
    chat_parts(BYTE, "yes")
  assert match_values("The number is 1234567.", ["1234567"]) == 1.0
  assert match_values("12345678", ["1234567"]) == 0.0
  assert match_values("ABCDE, FGHIJ", ["ABCDE", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)
  assert parse_lengths("2K,1024, 128k,1000") == [1000, 1024, 2048, 131072]
  with pytest.raises(ValueError, match="not a length"):
    parse_lengths("1K,two")
  assert position_buckets(300) == [(0, 64), (64, 128), (128, 256), (256, 300)]


def test_cached_scoring_matches_full_forward(model, corpus):
  """The runner's answer log-probability (prefill + teacher-forced decode steps) equals the full forward's."""
  exs = build_examples("niah_multivalue", BYTE, corpus, 1024, 3, seed=2)
  settings = RunSettings(batch_size=2, chunk_size=512, max_new_tokens=40)
  cell = evaluate_examples(model, BYTE, exs, settings)
  assert cell["n"] == 3 and 0 <= cell["gen_acc"] <= 1
  fwd = nnx.jit(lambda m, t: jax.nn.log_softmax(m(t), axis=-1))
  for e, r in zip(exs, cell["examples"]):
    seq = jnp.asarray([e.prompt + e.answer], jnp.int32)
    lp = np.asarray(fwd(model, seq))[0, len(e.prompt) - 1:-1]
    ref = lp[np.arange(len(e.answer)), e.answer].mean()
    np.testing.assert_allclose(r["logprob"], ref, rtol=1e-4, atol=1e-4)
  # one cache size for a whole suite (2x this length's): the same generations and log-probabilities
  big = evaluate_examples(model, BYTE, exs, RunSettings(batch_size=2, chunk_size=512, max_new_tokens=40,
                                                        cache_slots=2048))
  assert [r["prediction"] for r in big["examples"]] == [r["prediction"] for r in cell["examples"]]
  np.testing.assert_allclose([r["logprob"] for r in big["examples"]], [r["logprob"] for r in cell["examples"]],
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="cache_slots 1024 < prompt length 1024"):
    evaluate_examples(model, BYTE, exs[:1], RunSettings(batch_size=2, chunk_size=512, max_new_tokens=40,
                                                        cache_slots=1024))


def test_evaluate_model_and_perplexity(model):
  res = evaluate_model(model, BYTE, tasks=("mqar", "ppl"), lengths=(300, 512), examples=2, ppl_docs=3,
                       settings=RunSettings(batch_size=2, chunk_size=256, max_new_tokens=16), verbose=False)
  assert list(res["tasks"]) == ["mqar"] and set(res["tasks"]["mqar"]) == {"300", "512"}
  ppl = res["ppl"]
  assert ppl["length"] == 512 and ppl["docs"] == 3 and ppl["buckets"][-1]["end"] == 512
  assert np.isfinite(ppl["nll"]) and 0 < ppl["nll"] < 2 * np.log(BYTE.vocab_size)
  with pytest.raises(ValueError, match="unknown task"):
    evaluate_model(model, BYTE, tasks=("niah",), lengths=(512,))


def test_cli_compares_models_and_writes_outputs(model, tmp_path, capsys):
  from hydrahead_jax.interop.safetensors import save_hybrid_safetensors

  path = save_hybrid_safetensors(model, str(tmp_path / "tiny"))
  out = tmp_path / "eval"
  rc = main(["--model", f"{path},{path}", "--tasks", "niah_single,ppl", "--lengths", "512", "--examples", "2",
             "--ppl-docs", "2", "--batch-size", "2", "--chunk-size", "256", "--max-new-tokens", "24",
             "--out", str(out)])
  assert rc == 0
  res = json.loads((out / "results.json").read_text())
  assert list(res["models"]) == ["tiny", "tiny#2"] and res["config"]["lengths"] == [512]
  a, b = (res["models"][k]["tasks"]["niah_single"]["512"] for k in ("tiny", "tiny#2"))
  assert a["examples"] == b["examples"]  # same model, same seed: same examples and answers
  assert (out / "accuracy_heatmap.png").stat().st_size > 0 and (out / "perplexity_by_position.png").stat().st_size > 0
  printed = capsys.readouterr().out
  assert "niah_single" in printed and "tiny#2" in printed and "ppl@" in printed


@pytest.mark.parametrize("argv, message", [
    (["--model", "smollm2", "--lengths", "1K,x"], "--lengths"),
    (["--model", "/no/such/dir"], "no such file"),
    (["--model", "smollm2", "--tasks", "niah"], "unknown niah"),
    (["--model", "smollm2", "--examples", "0"], "--examples"),
    (["--lengths", "1K"], "--model"),
])
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path):
  assert main(argv + ["--out", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "error:" in err[0] and message in err[0], err


def test_bench_generation_smoke(tmp_path):
  """The GPU benchmark's CPU smoke run: one layout, one length, with the cached-vs-full check."""
  import sys

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from benchmarks import bench_generation

  bench_generation.main(["--smoke", "--check", "--layouts", "layer_3to1", "--lengths", "64", "--out", str(tmp_path)])
  res = json.loads((tmp_path / "bench_generation_smoke.json").read_text())["layouts"]["layer_3to1"]
  cell = res["cells"]["64"]
  assert cell["prefill_tok_s"] > 0 and cell["decode_tok_s"] > 0 and cell["cache"]["per_token"] > 0
  assert res["check"]["prefill_max_abs_err"] < 1e-4 and res["check"]["decode_max_abs_err"] < 1e-4

