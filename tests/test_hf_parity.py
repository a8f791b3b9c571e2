"""Parity with transformers (CPU torch): tiny random Qwen3/Llama checkpoints, HF export, the GDN op.

Needs the [parity] extra (torch, transformers); skipped without it.
"""

import json
import os

import numpy as np
import pytest
from optional import optional_import

torch = optional_import("torch")
transformers = optional_import("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

from hydrahead_jax.config import HeadLayout, ModelConfig  # noqa: E402
from hydrahead_jax.transfer.surgery import convert_flat  # noqa: E402
from hydrahead_jax.interop.hf import load_llama, load_pretrained_hf, load_qwen3, save_hf  # noqa: E402
from hydrahead_jax.ops import gated_delta_rule  # noqa: E402
from hydrahead_jax.interop.names import flat_names, model_from_flat, model_to_flat  # noqa: E402

pytestmark = pytest.mark.parity
TOL = 1e-4  # max abs logit difference in float32

# name: (model_type, config kwargs, save options)
SHAPES = {
    # GQA, head_dim 24 != 64/4, tied, transformers-5 config style (rope_parameters)
    "qwen3_gqa_tied_hd24": ("qwen3", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                          tie_word_embeddings=True), {}),
    # MHA, head_dim = 64/4, untied, bf16 file
    "qwen3_mha_untied_bf16": ("qwen3", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                            tie_word_embeddings=False), {"bf16": True}),
    # Llama GQA, head_dim 12 != 48/6, untied, hub config style (top-level rope_theta)
    "llama_gqa_untied_hd12": ("llama", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=12,
                                            tie_word_embeddings=False), {"hub_style": True}),
    # Llama MHA, tied, sharded safetensors + index.json
    "llama_mha_tied_sharded": ("llama", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                             tie_word_embeddings=True), {"shard": "20KB"}),
}


def _build_hf(kind, kw, opts, path, seed):
  torch.manual_seed(seed)
  cls_cfg, cls_model = ((transformers.Qwen3Config, transformers.Qwen3ForCausalLM) if kind == "qwen3"
                        else (transformers.LlamaConfig, transformers.LlamaForCausalLM))
  cfg = cls_cfg(vocab_size=96, intermediate_size=80, num_hidden_layers=2, rope_theta=50_000.0, rms_norm_eps=1e-6,
                **kw)
  model = cls_model(cfg).eval()
  with torch.no_grad():  # norms away from 1 so their mapping is tested
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
  if opts.get("bf16"):
    model = model.to(torch.bfloat16)
  model.save_pretrained(path, **({"max_shard_size": opts["shard"]} if "shard" in opts else {}))
  if opts.get("hub_style"):
    with open(os.path.join(path, "config.json")) as f:
      c = json.load(f)
    c["rope_theta"] = c.pop("rope_parameters")["rope_theta"]
    c["rope_scaling"] = None
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(c, f)
  # the reference is what transformers reads back from the files, in float32
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  out = {}
  for i, (name, (kind, kw, opts)) in enumerate(SHAPES.items()):
    path = str(tmp_path_factory.mktemp(name))
    out[name] = (path, _build_hf(kind, kw, opts, path, seed=i))
  return out


def _tokens(seed, vocab=96, shape=(2, 21)):
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_match_transformers(checkpoints, name):
  path, ref_model = checkpoints[name]
  kind = SHAPES[name][0]
  cfg, model = (load_qwen3 if kind == "qwen3" else load_llama)(path, dtype="float32")
  assert cfg.qk_norm == (kind == "qwen3")
  assert cfg.tie_embeddings == SHAPES[name][1]["tie_word_embeddings"]
  assert cfg.rope_theta == 50_000.0
  if "shard" in SHAPES[name][2]:
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
  tokens = _tokens(1)
  ours = np.asarray(model(jnp.asarray(tokens)))
  diff = float(np.abs(ours - _torch_logits(ref_model, tokens)).max())
  print(f"{name}: max |logit diff| = {diff:.2e}")
  assert diff <= TOL


def test_layout_import_matches_convert_flat_and_sharding(checkpoints):
  path, ref_model = checkpoints["qwen3_gqa_tied_hd24"]
  cfg, teacher = load_pretrained_hf(path)
  layout = HeadLayout(((1,), ()))
  scfg, student = load_pretrained_hf(path, layout=layout)
  assert scfg.layout == layout
  ref = convert_flat(model_to_flat(teacher), scfg)
  got = model_to_flat(student)
  assert set(ref) == set(got)
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
  # straight onto a mesh, in bf16: every parameter sharded as the rule table says, same logits (bf16 level)
  mesh = jax.make_mesh((2, 2), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:4])
  cfg_b, sharded = load_pretrained_hf(path, dtype="bfloat16", compute_dtype="float32", mesh=mesh)
  wq = sharded.segments[0].mixer.fa.wq[...]
  assert wq.dtype == jnp.bfloat16 and wq.sharding.mesh == mesh and wq.sharding.spec[1] == "fsdp"
  tokens = _tokens(2)
  np.testing.assert_allclose(np.asarray(sharded(jnp.asarray(tokens))), _torch_logits(ref_model, tokens), atol=0.05)


def test_export_to_hf_round_trips_through_transformers(tmp_path, rng):
  for qk_norm, tie in ((True, False), (False, True)):
    cfg = ModelConfig(vocab_size=80, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=48,
                      qk_norm=qk_norm, tie_embeddings=tie, rope_theta=1e4, dtype="float32")
    # random weights straight from numpy (an eager init is slow on CPU); norms and the FA fusion scales
    # (folded into o_proj on export) away from 1
    flat = {n: (rng.uniform(0.5, 1.5, shape) if n.endswith(("scale", "fa_scale")) else
                0.2 * rng.standard_normal(shape)).astype(np.float32) for n, shape in flat_names(cfg).items()}
    model = model_from_flat(cfg, flat)
    out = str(tmp_path / f"hf_{qk_norm}")
    save_hf(model, out)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert ref.config.model_type == ("qwen3" if qk_norm else "llama")
    tokens = _tokens(3, vocab=80)
    ours = np.asarray(model(jnp.asarray(tokens)))
    diff = float(np.abs(ours - _torch_logits(ref, tokens)).max())
    print(f"export qk_norm={qk_norm}: max |logit diff| = {diff:.2e}")
    assert diff <= TOL
    _, back = load_pretrained_hf(out)
    np.testing.assert_allclose(np.asarray(back(jnp.asarray(tokens))), ours, atol=1e-5)


# -- errors ----------------------------------------------------------------------------------------------


def test_clear_errors(checkpoints, tmp_path):
  from safetensors.numpy import load_file, save_file

  with pytest.raises(FileNotFoundError, match="no such directory"):
    load_pretrained_hf(str(tmp_path / "nope"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_pretrained_hf(str(empty))
  src, _ = checkpoints["qwen3_mha_untied_bf16"]
  with open(os.path.join(src, "config.json")) as f:
    hf_cfg = json.load(f)

  def variant(name, cfg_edit=None, tensors_edit=None, copy_weights=True):
    d = tmp_path / name
    d.mkdir()
    c = dict(hf_cfg)
    if cfg_edit:
      cfg_edit(c)
    (d / "config.json").write_text(json.dumps(c))
    if copy_weights:
      t = load_file(os.path.join(src, "model.safetensors"))
      if tensors_edit:
        tensors_edit(t)
      save_file(t, str(d / "model.safetensors"))
    return str(d)

  with pytest.raises(FileNotFoundError, match="safetensors"):
    load_pretrained_hf(variant("noweights", copy_weights=False))
  with pytest.raises(ValueError, match="unsupported model_type 'mistral'"):
    load_pretrained_hf(variant("mistral", lambda c: c.update(model_type="mistral")))
  with pytest.raises(ValueError, match="model_type 'qwen3', not 'llama'"):
    load_llama(src)
  with pytest.raises(ValueError, match="rope_type='llama3'"):
    load_pretrained_hf(variant("rope", lambda c: c.update(rope_parameters={"rope_type": "llama3", "rope_theta": 1.0})))
  name = "model.layers.1.self_attn.k_proj.weight"
  with pytest.raises(ValueError, match=rf"{name}.*shape \(48, 64\).*implies \(64, 64\)"):
    load_pretrained_hf(variant("shape", tensors_edit=lambda t: t.update({name: t[name][:48]})))
  with pytest.raises(ValueError, match=rf"missing tensor '{name}'"):
    load_pretrained_hf(variant("missing", tensors_edit=lambda t: t.pop(name)))
  with pytest.raises(ValueError, match="does not explain.*model.layers.2"):
    load_pretrained_hf(variant("extra", tensors_edit=lambda t: t.update({"model.layers.2.mlp.up_proj.weight": t[name]})))


# -- GDN op vs transformers' Qwen3-Next torch reference ------------------------------------------------------


def test_gated_delta_rule_matches_qwen3_next_reference(rng):
  from transformers.models.qwen3_next import modeling_qwen3_next as q3n

  B, T, H, K, V = 2, 45, 3, 16, 24
  normalize = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q = normalize(rng.standard_normal((B, T, H, K))).astype(np.float32)
  k = normalize(rng.standard_normal((B, T, H, K))).astype(np.float32)
  v = rng.standard_normal((B, T, H, V)).astype(np.float32)
  g = -np.log1p(np.exp(rng.standard_normal((B, T, H)))).astype(np.float32) * 0.3  # log decay <= 0
  beta = (1 / (1 + np.exp(-rng.standard_normal((B, T, H))))).astype(np.float32)
  s0 = (0.5 * rng.standard_normal((B, H, K, V))).astype(np.float32)
  t = lambda x: torch.tensor(x)
  # transformers scales q by K**-0.5 itself and (with use_qk_l2norm_in_kernel=False) uses q/k as given
  refs = {
      "torch_chunk": q3n.torch_chunk_gated_delta_rule(t(q), t(k), t(v), t(g), t(beta), chunk_size=16,
                                                      initial_state=t(s0), output_final_state=True),
      "torch_recurrent": q3n.torch_recurrent_gated_delta_rule(t(q), t(k), t(v), t(g), t(beta), initial_state=t(s0),
                                                              output_final_state=True),
  }
  o_ref, s_ref = (x.numpy() for x in refs["torch_recurrent"])
  np.testing.assert_allclose(refs["torch_chunk"][0].numpy(), o_ref, atol=1e-4)
  for impl in ("recurrent", "chunked"):
    o, s = gated_delta_rule(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(g), jnp.asarray(beta),
                            initial_state=jnp.asarray(s0), output_final_state=True, chunk_size=16, implementation=impl)
    for ref_name, (o_r, s_r) in refs.items():
      do = float(np.abs(np.asarray(o) - o_r.numpy()).max())
      ds = float(np.abs(np.asarray(s) - s_r.numpy()).max())
      print(f"GDN {impl} vs {ref_name}: max |o diff| {do:.1e}, max |state diff| {ds:.1e}")
      assert do <= 1e-4 and ds <= 1e-4, (impl, ref_name, do, ds)
