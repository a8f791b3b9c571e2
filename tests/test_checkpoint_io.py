"""Orbax checkpoints (onto another sharding), the portable safetensors format, HF export, the convert CLI."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

import hydrahead_jax
from hydrahead_jax.interop.load import load, load_pretrained
from hydrahead_jax.interop.orbax import MANIFEST, save_pretrained
from hydrahead_jax.interop.safetensors import SAFETENSORS_CONFIG, save_hybrid_safetensors
from hydrahead_jax.config import HeadLayout, ModelConfig
from hydrahead_jax.interop.hf import save_hf
from hydrahead_jax.interop.names import flat_names, model_from_flat, model_to_flat

HYBRID = ModelConfig(vocab_size=64, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                     dtype="float32", la_chunk_size=8, layout=HeadLayout(((0,), (1,), ())))
TEACHER = HYBRID.replace(layout=None)


def _mesh(shape):
  return jax.make_mesh(shape, ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2,
                       devices=jax.devices()[: shape[0] * shape[1]])


def _same(a, b):
  fa, fb = model_to_flat(a), model_to_flat(b)
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _specs(model):
  return {".".join(map(str, p)): v[...].sharding.spec for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def random_model(cfg, rng, unit_fa_scale=False):
  """Random parameters straight from numpy (much faster than an eager init on CPU)."""
  flat = {n: (0.3 * rng.standard_normal(shape)).astype(np.float32) for n, shape in flat_names(cfg).items()}
  if unit_fa_scale:  # as in a teacher; HF export folds other values into o_proj
    flat.update({n: np.ones_like(v) for n, v in flat.items() if n.endswith("fa_scale")})
  return model_from_flat(cfg, flat)


@pytest.fixture(scope="module")
def hybrid():
  seed = int(np.random.SeedSequence().entropy % (1 << 30))
  print(f"model seed: {seed}")
  return random_model(HYBRID, np.random.default_rng(seed))


def test_orbax_round_trip_onto_another_sharding(tmp_path, hybrid):
  model = model_from_flat(HYBRID, model_to_flat(hybrid), mesh=_mesh((2, 4)))  # saved from a 2x4 mesh
  path = save_pretrained(model, str(tmp_path / "ckpt"))
  manifest = json.loads(open(os.path.join(path, MANIFEST)).read())
  assert manifest["format"] == "hydrahead-orbax" and manifest["param_dtype"] == "float32"
  assert ModelConfig.from_dict(manifest["config"]) == HYBRID

  cfg, plain = hydrahead_jax.load_pretrained(path)  # no mesh: one device
  assert cfg == HYBRID
  _same(model, plain)
  mesh = _mesh((4, 2))
  _, resharded = load_pretrained(path, mesh)
  _same(model, resharded)
  specs = _specs(resharded)
  assert specs["embed.embedding"] == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert specs["segments.0.mixer.fa.wq"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert all(v[...].sharding.mesh == mesh for _, v in nnx.to_flat_state(nnx.state(resharded, nnx.Param)))

  _, bf16 = load_pretrained(path, dtype="bfloat16")
  assert bf16.cfg.param_dtype == "bfloat16" and bf16.embed.embedding[...].dtype == jnp.bfloat16
  with pytest.raises(FileExistsError, match="overwrite"):
    save_pretrained(model, path)


def test_portable_safetensors_format(tmp_path, hybrid):
  from safetensors.numpy import load_file

  model = hybrid
  path = save_hybrid_safetensors(model, str(tmp_path / "st"), max_shard_bytes=20_000)
  files = sorted(os.listdir(path))
  assert SAFETENSORS_CONFIG in files and "model.safetensors.index.json" in files
  # readable without JAX: canonical names, one tensor per layer
  flat = {}
  for f in files:
    if f.endswith(".safetensors"):
      flat.update(load_file(os.path.join(path, f)))
  assert flat["layers.2.mixer.la.wq"].shape == (32, 4, 8) and flat["layers.0.mixer.fa.wq"].shape == (32, 2, 8)
  np.testing.assert_array_equal(flat["layers.1.mixer.wo"], model_to_flat(model)["layers.1.mixer.wo"])
  mesh = _mesh((2, 2))
  with jax.set_mesh(mesh):  # the active mesh is used when none is passed
    cfg, back = load_pretrained(path)
  assert cfg == HYBRID
  assert back.segments[0].mixer.fa.wq[...].sharding.mesh == mesh
  _same(model, back)
  with open(os.path.join(path, SAFETENSORS_CONFIG)) as f:
    meta = json.load(f)
  meta["config"]["num_layers"] = 2
  meta["config"]["layout"] = [[0], [1]]
  with open(os.path.join(path, SAFETENSORS_CONFIG), "w") as f:
    json.dump(meta, f)
  with pytest.raises(ValueError, match="does not use.*layers.2"):
    load_pretrained(path)


def test_hf_export_round_trip_without_torch(tmp_path, rng, hybrid):
  model = random_model(TEACHER.replace(qk_norm=False), rng)
  scale = model.segments[0].mixer.fusion.fa_scale
  scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, scale[...].shape), jnp.float32)
  save_hf(model, str(tmp_path / "hf"), max_shard_bytes=30_000)
  assert os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json")
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
  cfg, back = load_pretrained(str(tmp_path / "hf"))
  tokens = jnp.asarray(rng.integers(0, 64, (2, 16)), jnp.int32)
  np.testing.assert_allclose(np.asarray(back(tokens)), np.asarray(model(tokens)), atol=1e-5)
  with pytest.raises(ValueError, match="only all-FA models export to HF.*--to safetensors"):
    save_hf(hybrid, str(tmp_path / "bad"))


def test_load_pretrained_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file or directory"):
    load_pretrained(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="holds none of"):
    load_pretrained(str(tmp_path))
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / MANIFEST).write_text(json.dumps({"format": "something-else", "config": {}}))
  with pytest.raises(ValueError, match="format 'something-else'"):
    load_pretrained(str(tmp_path / "bad"))
  (tmp_path / "nostate").mkdir()
  (tmp_path / "nostate" / MANIFEST).write_text(json.dumps({"format": "hydrahead-orbax", "version": 1,
                                                           "config": TEACHER.to_dict()}))
  with pytest.raises(FileNotFoundError, match="no state/"):
    load_pretrained(str(tmp_path / "nostate"))


def test_convert_cli(tmp_path, rng, capsys):
  from hydrahead_jax.convert import main

  teacher = random_model(TEACHER, rng, unit_fa_scale=True)
  save_hf(teacher, str(tmp_path / "hf"))
  assert main([str(tmp_path / "hf"), str(tmp_path / "orbax")]) == 0
  assert main([str(tmp_path / "orbax"), str(tmp_path / "hf2"), "--to", "hf", "--out-dtype", "bfloat16"]) == 0
  assert "(all FA)" in capsys.readouterr().out
  # a hybrid, made by the one loader, exported to the portable format by the CLI
  _, hybrid, _ = load(str(tmp_path / "hf"), layout=HeadLayout(((1,), (), (0, 1))), tokenizer=False)
  save_pretrained(hybrid, str(tmp_path / "hybrid"))
  assert main([str(tmp_path / "hybrid"), str(tmp_path / "st"), "--to", "safetensors"]) == 0
  _, back = load_pretrained(str(tmp_path / "orbax"))
  _same(teacher, back)
  cfg, hf2 = load_pretrained(str(tmp_path / "hf2"))
  np.testing.assert_allclose(model_to_flat(hf2)["layers.1.mlp.w_up"], model_to_flat(teacher)["layers.1.mlp.w_up"],
                             rtol=1e-2, atol=1e-2)
  cfg, student = load_pretrained(str(tmp_path / "st"))
  assert cfg.layout == HeadLayout(((1,), (), (0, 1)))
  _same(student, hybrid)
  assert main([str(tmp_path / "st"), str(tmp_path / "hf3"), "--to", "hf"]) == 2
  assert "only all-FA" in capsys.readouterr().err
  assert main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2


def test_load_dispatch(tmp_path, rng):
  """One loader: the tokenizer each source carries, restore-time overrides limited to numerics, layouts for
  teachers only, a progress bar that counts every tensor."""
  teacher = random_model(TEACHER, rng, unit_fa_scale=True)
  save_hf(teacher, str(tmp_path / "hf"))
  save_pretrained(teacher, str(tmp_path / "orbax"), metadata={"tokenizer": None})
  cfg, model, tok = load(str(tmp_path / "orbax"), compute_dtype="bfloat16", remat="full")
  assert (cfg.dtype, cfg.remat, type(tok).__name__) == ("bfloat16", "full", "ByteTokenizer")
  _same(model, teacher)
  with pytest.raises(ValueError, match="cannot override .*num_layers"):
    load(str(tmp_path / "orbax"), num_layers=2)
  with pytest.raises(ValueError, match="converts a teacher"):
    load(str(tmp_path / "orbax"), layout=HeadLayout.all_la(3))

  class Bar:
    def __init__(self, **kw):
      self.total, self.n = None, 0
    def reset(self, total):
      self.total, self.n = total, 0
    def update(self, n=1):
      self.n += n
    def set_description(self, *a):
      pass
    def __enter__(self):
      return self
    def __exit__(self, *a):
      pass

  import tqdm
  bars = []
  orig = tqdm.tqdm
  tqdm.tqdm = lambda **kw: bars.append(Bar(**kw)) or bars[-1]
  try:
    load(str(tmp_path / "hf"), tokenizer=False, progress=True)
  finally:
    tqdm.tqdm = orig
  assert bars[0].total == len(flat_names(TEACHER)) and bars[0].n == bars[0].total
