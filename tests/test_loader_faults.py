"""Damaged model files and one-line CLI errors (docs/reliability.md, "Model files"; fault injection: tests/faults.py).

Integrity checks run before any tensor is read: a truncated GGUF or safetensors file, an unsupported GGUF
quantisation type, a corrupt safetensors header and a shard missing from a sharded checkpoint are each one
``UserError`` (also the ``ValueError`` / ``FileNotFoundError`` they were) naming the file and the tensor or shard.
The CLIs (``select``, ``convert``, ``prepare``) print exactly one line on stderr for them and exit with code 2.
No model is built here except in the one test that converts a good file (a 2-layer toy).
"""

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from optional import optional_import

import faults

gguf = optional_import("gguf")

from hydrahead_jax.cli import UserError  # noqa: E402
from hydrahead_jax.config import ModelConfig  # noqa: E402
from hydrahead_jax.interop.gguf import GGUFCheckpoint, GGUFError, hf_to_gguf_name, permute_rope_rows  # noqa: E402
from hydrahead_jax.interop.hf import config_to_hf, hf_name_map  # noqa: E402
from hydrahead_jax.interop.load import load  # noqa: E402
from hydrahead_jax.interop.safetensors import (CheckpointError, CheckpointFileMissing,  # noqa: E402
                                               SafetensorsCheckpoint, save_safetensors_sharded)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(vocab_size=96, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=64,
                  qk_norm=False, tie_embeddings=False, rope_theta=1e4, rms_eps=1e-5, dtype="float32")
Q = gguf.GGMLQuantizationType


def hf_tensors(seed=0):
  rng = np.random.default_rng(seed)
  return {name: (0.3 * rng.standard_normal(shape)).astype(np.float32) for name, shape, _ in hf_name_map(CFG).values()}


def write_gguf(path, tensors, quant=None):
  """A llama-architecture GGUF of HF-named tensors (as tests/test_gguf.py writes them)."""
  hf = config_to_hf(CFG)
  w = gguf.GGUFWriter(path, "llama")
  w.add_context_length(hf["max_position_embeddings"])
  w.add_embedding_length(hf["hidden_size"])
  w.add_block_count(hf["num_hidden_layers"])
  w.add_feed_forward_length(hf["intermediate_size"])
  w.add_head_count(hf["num_attention_heads"])
  w.add_head_count_kv(hf["num_key_value_heads"])
  w.add_key_length(hf["head_dim"])
  w.add_rope_dimension_count(hf["head_dim"])
  w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
  w.add_rope_freq_base(hf["rope_theta"])
  w.add_vocab_size(hf["vocab_size"])
  w.add_tokenizer_model("gpt2")
  w.add_token_list(["t", "1", "t1"] + [f"x{i}" for i in range(3, hf["vocab_size"])])
  w.add_token_merges(["t 1"])
  w.add_eos_token_id(0)
  for name, t in tensors.items():
    if name.endswith(("q_proj.weight", "k_proj.weight")):
      t = permute_rope_rows(t, hf["num_attention_heads"] if "q_proj" in name else hf["num_key_value_heads"])
    qt = next((q for pat, q in (quant or {}).items() if pat in name), None)
    if qt is None:
      w.add_tensor(hf_to_gguf_name(name), t)
    else:
      w.add_tensor(hf_to_gguf_name(name), gguf.quants.quantize(t, qt), raw_dtype=qt)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
  return write_gguf(str(tmp_path_factory.mktemp("gguf") / "toy.gguf"), hf_tensors(), quant={"up_proj": Q.Q8_0})


def copy(src, dst):
  shutil.copyfile(src, dst)
  return str(dst)


def one_line(err):
  """The single line a CLI printed on stderr (progress bars redraw with '\\r' and are erased on errors: only what
  follows the last '\\r' of a line stays visible); fails unless there is exactly one."""
  assert err.count("\n") == 1 and err.endswith("\n"), repr(err)
  line = err[:-1].rsplit("\r", 1)[-1]
  assert line.startswith("error: ") and "Traceback" not in err, repr(err)
  return line


def ranges(path):
  """{tensor name: (start, end)} file byte ranges, from the gguf package's own reader (of the intact file)."""
  return {t.name: (int(t.data_offset), int(t.data_offset) + int(t.n_bytes)) for t in gguf.GGUFReader(path).tensors}


# -- GGUF ----------------------------------------------------------------------------------------------------------
def test_truncated_gguf_names_tensor_and_bytes(good_gguf, tmp_path):
  path = copy(good_gguf, tmp_path / "cut.gguf")
  faults.truncate(path, 0.6)
  size = os.path.getsize(path)
  spans = ranges(good_gguf)
  name, (start, end) = min(((n, r) for n, r in spans.items() if r[1] > size), key=lambda x: x[1][0])
  with pytest.raises(GGUFError) as e:
    GGUFCheckpoint(path)
  msg = str(e.value)
  assert isinstance(e.value, UserError) and isinstance(e.value, ValueError) and "\n" not in msg
  assert f"GGUF file {path} is truncated: tensor {name!r}" in msg, msg
  assert f"needs bytes {start:,} to {end:,}, but the file has only {size:,} bytes" in msg, msg
  assert f"at least {os.path.getsize(good_gguf):,} bytes" in msg, msg
  with pytest.raises(GGUFError, match="is truncated: tensor"):  # the one loader: the same error, nothing read
    load(path, tokenizer=False)

  faults.truncate(path, 1000 / size)  # now inside the header (metadata / tensor table)
  with pytest.raises(GGUFError, match=rf"GGUF file {path}: truncated or damaged header: .* needs bytes up to .*, "
                                      rf"but the file has {os.path.getsize(path):,} bytes"):
    GGUFCheckpoint(path)


def test_gguf_unsupported_quantisation_names_type_and_tensor(tmp_path):
  tensors = hf_tensors()
  tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.float64)  # F64: no dequantiser
  path = write_gguf(str(tmp_path / "f64.gguf"), tensors)
  with pytest.raises(GGUFError, match=r"unsupported quantisation type\(s\) \['F64'\] \(F64: tensors "
                                      r"\['output_norm.weight'\]\)") as e:
    GGUFCheckpoint(path)
  assert isinstance(e.value, UserError) and path in str(e.value)

  # a type id the gguf package does not know (a newer llama.cpp, or a damaged tensor table)
  path = write_gguf(str(tmp_path / "new.gguf"), hf_tensors())
  data = bytearray(open(path, "rb").read())
  name = b"blk.1.ffn_up.weight"
  at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
  n_dims = struct.unpack_from("<I", data, at)[0]
  struct.pack_into("<I", data, at + 4 + 8 * n_dims, 99)
  open(path, "wb").write(data)
  with pytest.raises(GGUFError, match=r"\['type id 99'\] \(type id 99: tensors \['blk.1.ffn_up.weight'\]\)"):
    GGUFCheckpoint(path)


# -- safetensors ---------------------------------------------------------------------------------------------------
def hf_dir(path, max_shard_bytes=2 << 30):
  os.makedirs(path)
  files = save_safetensors_sharded(hf_tensors(), str(path), max_shard_bytes=max_shard_bytes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(CFG), f)
  return str(path), files


def test_truncated_safetensors_names_tensor_and_bytes(tmp_path):
  d, [fname] = hf_dir(tmp_path / "hf")
  path = os.path.join(d, fname)
  full = os.path.getsize(path)
  faults.truncate(path, 0.7)
  size = os.path.getsize(path)
  with pytest.raises(CheckpointError) as e:
    SafetensorsCheckpoint(d)
  msg = str(e.value)
  assert isinstance(e.value, UserError) and isinstance(e.value, ValueError) and "\n" not in msg
  assert f"safetensors file {path} is truncated: tensor '" in msg, msg
  assert f"but the file has only {size:,} bytes" in msg and f"the complete file has {full:,} bytes" in msg, msg
  with pytest.raises(CheckpointError, match="is truncated: tensor"):
    load(d, tokenizer=False)


def test_corrupt_safetensors_header_names_file(tmp_path):
  d, [fname] = hf_dir(tmp_path / "hf")
  path = os.path.join(d, fname)
  good = open(path, "rb").read()
  faults.flip_bytes(path, count=4, offset=20)  # inside the JSON header
  with pytest.raises(CheckpointError, match=rf"safetensors file {path}: damaged header \(its .* bytes are not valid JSON"):
    SafetensorsCheckpoint(d)
  open(path, "wb").write(good)
  faults.flip_bytes(path, count=2, offset=5)  # the header length field: far larger than the file
  with pytest.raises(CheckpointError, match=rf"safetensors file {path}: truncated or damaged header: its length "
                                            rf"field says .* bytes of JSON, but the file has only"):
    SafetensorsCheckpoint(d)
  open(path, "wb").write(good[:5])
  with pytest.raises(CheckpointError, match=rf"safetensors file {path}: only 5 bytes, too short for a header"):
    SafetensorsCheckpoint(d)
  header = json.loads(good[8: 8 + struct.unpack_from("<Q", good)[0]])  # a tensor whose range does not fit its shape
  name = sorted(k for k in header if k != "__metadata__")[0]
  header[name]["data_offsets"][1] -= 4
  raw = json.dumps(header).encode()
  open(path, "wb").write(struct.pack("<Q", len(raw)) + raw + good[8 + struct.unpack_from("<Q", good)[0]:])
  with pytest.raises(CheckpointError, match=rf"damaged header: tensor {name!r} \(F32 .* has data_offsets"):
    SafetensorsCheckpoint(d)


def test_missing_shard_is_named(tmp_path):
  d, files = hf_dir(tmp_path / "hf", max_shard_bytes=20_000)
  assert len(files) >= 3
  index = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
  os.remove(os.path.join(d, files[1]))
  held = sum(v == files[1] for v in index.values())
  with pytest.raises(CheckpointFileMissing, match=rf"safetensors checkpoint {d}: shard {files[1]!r} is missing; "
                                                  rf"model.safetensors.index.json puts {held} tensors? there") as e:
    SafetensorsCheckpoint(d)
  assert isinstance(e.value, UserError) and isinstance(e.value, FileNotFoundError)
  with pytest.raises(CheckpointFileMissing, match=f"shard {files[1]!r} is missing"):
    load(d, tokenizer=False)


# -- the CLIs: one line, exit code 2 --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cut_gguf(good_gguf, tmp_path_factory):
  path = copy(good_gguf, tmp_path_factory.mktemp("cut") / "cut.gguf")
  faults.truncate(path, 0.6)
  return path


def test_select_cli_errors_are_one_line(cut_gguf, good_gguf, tmp_path, capsys, monkeypatch):
  from hydrahead_jax import select

  monkeypatch.delenv("HYDRAHEAD_DEBUG", raising=False)
  out = str(tmp_path / "sel")

  def fails(*argv):
    assert select.main(list(argv)) == 2
    return one_line(capsys.readouterr().err)

  line = fails("analyze", "--teacher", cut_gguf, "--out", out)
  assert line.startswith(f"error: GGUF file {cut_gguf} is truncated: tensor '") and not os.path.exists(out)
  assert fails("analyze", "--teacher", str(tmp_path / "nope.gguf"), "--out", out).startswith(
      f"error: model {tmp_path / 'nope.gguf'}: no such file or directory")
  assert "--policies: unknown ['best']" in fails("analyze", "--teacher", good_gguf, "--policies", "global,best",
                                                 "--out", out)
  assert "--budget: ratio: expected 'LA:FA'" in fails("analyze", "--teacher", good_gguf, "--budget", "7-1", "--out", out)
  assert "the following arguments are required: --teacher" in fails("analyze", "--out", out)  # argparse, one line
  (tmp_path / "bad.json").write_text('{"fa_groups": [[0], ')
  assert fails("convert", "--teacher", good_gguf, "--layout", str(tmp_path / "bad.json"), "--out", out).startswith(
      f"error: layout file {tmp_path / 'bad.json'}: cannot read (")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("x")
  assert f"--out {tmp_path / 'full'}: exists and is not empty" in fails(
      "convert", "--teacher", good_gguf, "--layout", str(tmp_path / "bad.json"), "--out", str(tmp_path / "full"))
  # a layout that does not fit the teacher is found once it is loaded: the error is the last line, after the
  # load's own (completed) progress output
  (tmp_path / "wide.json").write_text('{"fa_groups": [[0], [5]]}')
  assert select.main(["convert", "--teacher", good_gguf, "--layout", str(tmp_path / "wide.json"), "--out", out]) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and err.rstrip("\n").rsplit("\n", 1)[-1] == (
      f"error: layout file {tmp_path / 'wide.json'} does not fit {good_gguf}: layout.fa_groups[1]: group index 5 out "
      "of range [0, 2) (num_kv_heads=2)"), err

  # --debug: the same exit code, the traceback first
  assert select.main(["analyze", "--teacher", cut_gguf, "--out", out, "--debug"]) == 2
  err = capsys.readouterr().err
  assert "Traceback" in err and err.rstrip("\n").rsplit("\n", 1)[-1].startswith("error: GGUF file")


def test_convert_cli_errors_are_one_line(cut_gguf, good_gguf, tmp_path, capsys, monkeypatch):
  from hydrahead_jax.convert import main

  monkeypatch.delenv("HYDRAHEAD_DEBUG", raising=False)

  def fails(*argv):
    assert main(list(argv)) == 2
    return one_line(capsys.readouterr().err)

  assert fails(cut_gguf, str(tmp_path / "y")).startswith(f"error: GGUF file {cut_gguf} is truncated: tensor '")
  assert not os.path.exists(tmp_path / "y")
  d, files = hf_dir(tmp_path / "hf", max_shard_bytes=20_000)
  os.remove(os.path.join(d, files[-1]))
  assert f"shard {files[-1]!r} is missing" in fails(d, str(tmp_path / "y"))
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("x")
  assert fails(good_gguf, str(tmp_path / "full")) == (
      f"error: {tmp_path / 'full'}: exists and is not empty (pass --overwrite to replace it)")
  assert fails(good_gguf, str(tmp_path / "y"), "--dtype", "float33") == "error: --dtype: not a dtype: 'float33'"
  # the checks pass a good file: the toy teacher converts
  assert main([good_gguf, str(tmp_path / "st"), "--to", "safetensors"]) == 0
  capsys.readouterr()


def test_prepare_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
  from hydrahead_jax.data.prepare import main

  monkeypatch.delenv("HYDRAHEAD_DEBUG", raising=False)
  (tmp_path / "a.txt").write_text("some text")

  def fails(*argv):
    assert main(list(argv)) == 2
    return one_line(capsys.readouterr().err)

  out = str(tmp_path / "out")
  assert fails("--inputs", str(tmp_path / "missing.txt"), "--out", out) == f"error: {tmp_path / 'missing.txt'}: no such file"
  (tmp_path / "bad.json").write_text("{not json")
  assert fails("--inputs", str(tmp_path / "a.txt"), "--out", out, "--tokenizer", str(tmp_path / "bad.json")).startswith(
      f"error: --tokenizer {tmp_path / 'bad.json'}: cannot be read (")
  assert fails("--inputs", str(tmp_path / "a.txt"), "--out", out, "--tokenizer", str(tmp_path / "no.json")) == (
      f"error: --tokenizer {tmp_path / 'no.json'}: no such file or directory")
  os.makedirs(out)
  assert fails("--inputs", str(tmp_path / "a.txt"), "--out", out) == (
      f"error: {out}: already exists (pass --overwrite to replace it)")
  assert "the following arguments are required: --out" in fails("--inputs", str(tmp_path / "a.txt"))


def test_real_teacher_truncated_to_50mb_through_python_m(tmp_path):
  """The issue's case, through the real entry point (one subprocess): SmolLM2 cut to its first 50,000,000 bytes.
  Only the header is parsed and the extents checked (about 2 s); no tensor is read."""
  from hydrahead_jax.interop.smollm2 import smollm2_gguf_path

  try:
    real = smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  path = str(tmp_path / "trunc.gguf")
  with open(real, "rb") as src, open(path, "wb") as dst:
    dst.write(src.read(50_000_000))
  env = {k: v for k, v in os.environ.items() if k != "HYDRAHEAD_DEBUG"}
  r = subprocess.run([sys.executable, "-m", "hydrahead_jax.select", "analyze", "--teacher", path, "--out",
                      str(tmp_path / "x")], cwd=ROOT, env=env, capture_output=True, timeout=300)
  err = r.stderr.decode()  # (not text=True: that turns the progress bar's '\r' into newlines)
  assert r.returncode == 2, err
  line = one_line(err)
  assert line == (f"error: GGUF file {path} is truncated: tensor 'blk.16.ffn_down.weight' (Q4_1 [576, 1536], "
                  f"552,960 bytes) needs bytes 49,600,576 to 50,153,536, but the file has only 50,000,000 bytes "
                  f"(198 of 272 tensors lie past its end; the complete file has at least "
                  f"{os.path.getsize(real):,} bytes); re-download or re-export it"), line
