"""Context parallelism (hydrahead_jax/parallel/context.py) on 8 fake CPU devices: the sequence split over the
'context' mesh axis gives the single-device forward and gradients, for the FA path, the GDN path and the short conv
alone and for whole models of every layout, with packed segments that cross (and start at) shard boundaries."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hydrahead_jax.config import HeadLayout, ModelConfig
from hydrahead_jax.nn.layers import causal_depthwise_conv, l2_normalize
from hydrahead_jax.nn.model import create_model
from hydrahead_jax.ops import gated_delta_rule
from hydrahead_jax.sharding import param_shardings
from hydrahead_jax.parallel.context import (context_attention, context_conv, context_gated_delta_rule, context_size,
                                            incoming_states, per_token_shards, shard_summary)

B, T = 2, 32
# Segment starts: row 0 at 8 and 16 (shard boundaries for CP 2/4/8), 13 and 27 inside shards; row 1 at 3, 17, 20
# (a boundary for CP 8 only) and 24. Several segments span two or more shards.
SEG = np.zeros((B, T), np.int32)
for row, starts in enumerate(((8, 13, 16, 27), (3, 17, 20, 24))):
  for s in starts:
    SEG[row, s:] += 1
SEG = jnp.asarray(SEG)

MESHES = {
    "cp2": ((2,), ("context",)),
    "cp4": ((4,), ("context",)),
    "cp8": ((8,), ("context",)),
    "dp2_cp2_tp2": ((2, 2, 2), ("data", "context", "tensor")),
    "fsdp2_cp2_tp2": ((2, 2, 2), ("fsdp", "context", "tensor")),
}


def mesh(name):
  shape, axes = MESHES[name]
  return jax.make_mesh(shape, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def close(got, want, tol=2e-4):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)


def value_and_grads(fn, argnums):
  """jit(value_and_grad) of a smooth scalar of fn's output, returning (output, grads)."""
  def loss(*args):
    o = fn(*args)
    return jnp.sum(jnp.sin(o) * o), o
  return jax.jit(lambda *a: jax.value_and_grad(loss, argnums=argnums, has_aux=True)(*a)[::-1])


def test_context_size():
  assert context_size() == 1
  with jax.set_mesh(mesh("dp2_cp2_tp2")):
    assert context_size() == 2


def test_affine_summary_composes(rng):
  """A shard's state map S_out = A S_in + B: the shard run from S_in equals o0 + oA S_in and A S_in + B; the prefix
  of two halves' summaries is the state entering the second half; a segment change inside a shard zeroes its A."""
  H, K = 2, 8
  q, k = (l2_normalize(jnp.asarray(rng.normal(size=(1, 16, H, K)), jnp.float32)) for _ in range(2))
  v = jnp.asarray(rng.normal(size=(1, 16, H, K)), jnp.float32)
  g = -jnp.asarray(rng.random((1, 16, H)), jnp.float32)
  beta = jnp.asarray(rng.random((1, 16, H)), jnp.float32)
  s_in = jnp.asarray(rng.normal(size=(1, H, K, K)), jnp.float32)
  summary = lambda *a, seg=None: shard_summary(*a, seg, chunk_size=8, implementation="chunked", scale=None)  # noqa

  @jax.jit
  def check(q, k, v, g, beta, s_in):
    o0, oa, a, b = summary(q, k, v, g, beta)
    o_ref, s_ref = gated_delta_rule(q, k, v, g, beta, initial_state=s_in, output_final_state=True, chunk_size=8,
                                    implementation="chunked")
    halves = [summary(*(x[:, sl] for x in (q, k, v, g, beta))) for sl in (slice(0, 8), slice(8, 16))]
    states = incoming_states(jnp.stack([h[2] for h in halves]), jnp.stack([h[3] for h in halves]))
    s_mid = gated_delta_rule(q[:, :8], k[:, :8], v[:, :8], g[:, :8], beta[:, :8], output_final_state=True,
                             implementation="chunked")[1]
    a_reset = summary(q, k, v, g, beta, seg=jnp.asarray([[0] * 5 + [1] * 11]))[2]
    return ((o0 + jnp.einsum("bthk,bhkv->bthv", oa, s_in), jnp.einsum("bhkj,bhjv->bhkv", a, s_in) + b, states[1]),
            (o_ref, s_ref, s_mid), a_reset)

  got, want, a_reset = check(q, k, v, g, beta, s_in)
  close(got, want, 1e-5)
  assert float(jnp.abs(a_reset).max()) == 0.0


@pytest.mark.parametrize("algorithm", ["heads", "gather"])
@pytest.mark.parametrize("implementation", ["xla", "cudnn"])
def test_attention_matches_unsharded(rng, monkeypatch, implementation, algorithm):
  """FA path alone: GQA causal attention with packed segments, sharded over context (and batch, heads), by both
  algorithms: 'heads' (all-to-all, whole-sequence attention on 1/n of the heads: one head of a group per device at
  CP 4, the group's two heads at CP 2, a tensor-split group at dp2 x cp2 x tp2) and 'gather'."""
  H, G, K = 4, 2, 8
  q = jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(B, T, G, K)), jnp.float32) for _ in range(2))
  ref = value_and_grads(lambda q, k, v, s: jax.nn.dot_product_attention(
      q, k, v, mask=(s[:, :, None] == s[:, None, :])[:, None], is_causal=True, scale=0.3), (0, 1, 2))(q, k, v, SEG)
  ref_unpacked = value_and_grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=0.3),
                                 (0, 1, 2))(q, k, v)
  calls = []
  if implementation == "cudnn":  # the cuDNN call structure, with XLA standing in for cuDNN on the CPU
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda q, *a, implementation, **kw: calls.append(
        (q.shape[1], q.shape[2], kw.get("is_causal"), implementation)) or real(q, *a, implementation="xla", **kw))
  attend = functools.partial(context_attention, scale=0.3, implementation=implementation, algorithm=algorithm)
  fn = value_and_grads(lambda q, k, v, s: attend(q, k, v, s), (0, 1, 2))
  for name in ("cp4", "dp2_cp2_tp2"):
    with jax.set_mesh(mesh(name)):
      close(fn(q, k, v, SEG), ref)
  if algorithm == "gather":
    with jax.set_mesh(mesh("cp8")):  # no segment ids
      close(fn(q, k, v, None), ref_unpacked)
  else:
    with jax.set_mesh(mesh("cp2")):
      close(fn(q, k, v, None), ref_unpacked)
    with jax.set_mesh(mesh("cp8")), pytest.raises(ValueError, match="do not split over 8 context devices"):
      fn(q, k, v, None)
  if implementation == "cudnn":
    if algorithm == "gather":  # branch c: queries zero-padded to (c+1) T/n, causal, all heads
      assert {(8, H, True, "cudnn"), (16, H, True, "cudnn"), (32, H, True, "cudnn")} <= set(calls), calls
    else:  # whole sequence, 1/n of the heads (cp4: 1, dp2 x cp2 x tp2: 1 of the device's 2, cp2: 2)
      assert set(calls) == {(T, 1, True, "cudnn"), (T, 2, True, "cudnn")}, set(calls)
    # packed rows through jax's Pallas flash attention with segment ids (interpret mode here; no T x T mask)
    fn_pallas = value_and_grads(lambda q, k, v, s: attend(q, k, v, s, packed_implementation="pallas"), (0, 1, 2))
    with jax.set_mesh(mesh("cp4")):
      close(fn_pallas(q, k, v, SEG), ref)
      one_doc = jnp.zeros_like(SEG)  # one document per row: the mask-free branch
      close(fn_pallas(q, k, v, one_doc), ref_unpacked)


def test_attention_algorithm_choice():
  """'heads' where the per-device query heads split in whole KV groups or inside one group, else 'gather'."""
  from hydrahead_jax.parallel.context import heads_split_fits

  assert heads_split_fits(16, 8, 2) and heads_split_fits(16, 8, 8) and heads_split_fits(16, 8, 16)
  assert heads_split_fits(2, 1, 2) and not heads_split_fits(2, 1, 4)  # a 7:1 layer's FA group: CP 2 at most
  assert not heads_split_fits(6, 2, 4)  # 6 heads do not divide over 4
  assert heads_split_fits(12, 4, 4)  # 3 heads per device: one whole group of 3 each
  assert not heads_split_fits(6, 3, 2)  # 3 heads per device straddle groups of 2


@pytest.mark.parametrize("implementation", ["chunked", "pallas"])
def test_gated_delta_rule_matches_unsharded(rng, implementation):
  """GDN path alone: the per-shard affine summaries and their prefix give the single-device outputs and gradients
  in q, k, v, g, beta ('pallas' runs its kernels in interpret mode on the CPU)."""
  H, K = 2, 8
  q, k = (l2_normalize(jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32)) for _ in range(2))
  v = jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32)
  g = -0.5 * jnp.asarray(rng.random((B, T, H)), jnp.float32)
  beta = jnp.asarray(rng.random((B, T, H)), jnp.float32)
  args = (q, k, v, g, beta, SEG)
  ref = value_and_grads(lambda *a: gated_delta_rule(*a[:5], segment_ids=a[5], chunk_size=8,
                                                    implementation="chunked")[0], tuple(range(5)))(*args)
  fn = value_and_grads(lambda *a: context_gated_delta_rule(*a, chunk_size=8, implementation=implementation),
                       tuple(range(5)))
  for name in (("cp2", "cp8", "dp2_cp2_tp2") if implementation == "chunked" else ("cp2",)):
    with jax.set_mesh(mesh(name)):
      close(fn(*args), ref)
  if implementation == "chunked":  # no segment ids
    ref = value_and_grads(lambda *a: gated_delta_rule(*a, chunk_size=8, implementation="chunked")[0],
                          tuple(range(5)))(*args[:5])
    with jax.set_mesh(mesh("cp8")):
      close(fn(*args[:5], None), ref)


def test_conv_halo_matches_unsharded(rng):
  """Short conv alone: each shard's halo of W-1 tokens from the previous one, segment-masked across the boundary."""
  H, K, W = 2, 4, 4
  x = jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(W, H, K)), jnp.float32)

  def conv(x, w, seg):
    b, t = x.shape[:2]
    return (jax.nn.silu(causal_depthwise_conv(x.reshape(b, t, -1), w.reshape(W, -1), seg)).reshape(x.shape),)

  ref = value_and_grads(lambda x, w, s: conv(x, w, s)[0], (0, 1))(x, w, SEG)
  fn = value_and_grads(lambda x, w, s: context_conv(conv, x, w, s), (0, 1))
  for name in ("cp8", "dp2_cp2_tp2"):
    with jax.set_mesh(mesh(name)):
      close(fn(x, w, SEG), ref)


def test_per_token_loss_on_local_tokens(rng):
  """A per-token loss of hidden states and a replicated weight: each device computes its own tokens (no all-gather
  of the hidden states), loss and the weight's gradient (summed over shards) equal the single-device ones."""
  h = jnp.asarray(rng.normal(size=(B, T, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 16, (B, T)), jnp.int32)

  def ce(h, w, t, *, scale):
    logp = jax.nn.log_softmax(scale * h @ w.T)
    return -jnp.take_along_axis(logp, t[..., None], -1)[..., 0], jnp.argmax(logp, -1) == t

  fn = lambda f: jax.jit(jax.value_and_grad(lambda h, w: f(h, w, t, scale=0.5)[0].sum(), argnums=(0, 1)))  # noqa
  ref = fn(ce)(h, w)
  with jax.set_mesh(mesh("dp2_cp2_tp2")):
    close(fn(per_token_shards(ce))(h, w), ref, 1e-5)
    hlo = jax.jit(lambda h: per_token_shards(ce)(h, w, t, scale=0.5)[0]).lower(h).compile().as_text()
  assert "all-gather" not in hlo


def test_per_token_shards_nested(rng):
  """per_token_shards inside a shard_map over 'context' (here: wrapped twice, as benchmarks/train_cp.py once did on
  top of the train step's own wrapping) runs the loss on the local tokens as they are. Splitting them again lowered
  the chunked CE's loop with the local [B, T/2, D] hidden states carried where the body expects [B, T/4, D] (MLIR
  verifier error on 2 x H200 at T = 512K); the mixers refuse such a second split."""
  from hydrahead_jax.losses import chunked_cross_entropy
  h = jnp.asarray(rng.normal(size=(1, T, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 16, (1, T)), jnp.int32)
  fn = lambda f: jax.jit(jax.value_and_grad(lambda h, w: f(h, w, t, chunk=4)[0].sum(), argnums=(0, 1)))  # noqa
  ref = chunked_cross_entropy(h, w, t, chunk=4), fn(chunked_cross_entropy)(h, w)
  nested = per_token_shards(per_token_shards(chunked_cross_entropy))
  with jax.set_mesh(mesh("cp2")):
    close((jax.jit(lambda h, w: nested(h, w, t, chunk=4))(h, w), fn(nested)(h, w)), ref, 1e-5)
    x = jnp.zeros((1, T, 1, 4))
    shard = jax.shard_map(lambda x: context_gated_delta_rule(x, x, x, x[..., 0], x[..., 0]),
                          in_specs=P(None, "context"), out_specs=P(None, "context"))
    with pytest.raises(ValueError, match="already inside a shard_map over 'context'"):
      jax.eval_shape(shard, x)


def test_make_mesh_context_axis():
  """train.context_parallel adds the 'context' axis; batch arrays split rows over data and positions over it."""
  from hydrahead_jax.train import config_lib
  from hydrahead_jax.train.loop import batch_pspec, make_mesh
  micro = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "micro.py")
  cfg = config_lib.load(micro, ["train.context_parallel=4", "train.data_parallel=2"])
  m = make_mesh(cfg)
  assert dict(zip(m.axis_names, m.axis_sizes)) == {"data": 2, "context": 4}
  assert batch_pspec(m) == P(("data",), "context")
  with pytest.raises(ValueError, match="not divisible by train.context_parallel=3"):
    make_mesh(config_lib.load(micro, ["train.context_parallel=3", "train.data_parallel=1"]))


def test_length_must_divide():
  x = jnp.zeros((1, 6, 1, 4))
  with jax.set_mesh(mesh("cp4")), pytest.raises(ValueError, match="multiple of the context-parallel size 4"):
    context_gated_delta_rule(x, x, x, x[..., 0], x[..., 0])


GROUPS = 4
# Layer 0 all FA, layer 1 all LA (the layers of all-FA, all-LA and layer-wise layouts), layer 2 head-level (FA group
# 1 of 4 beside 6 LA heads).
LAYOUT = HeadLayout(((0, 1, 2, 3), (), (1,)))
CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=3, num_heads=8, num_kv_heads=GROUPS, head_dim=8, mlp_dim=64,
                  dtype="float32", la_chunk_size=8, la_implementation="chunked", rope_theta=10_000.0, layout=LAYOUT)


@nnx.jit
def _model_value_and_grads(model, tok, seg):
  def loss(m):
    logits = m(tok, seg)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tok[:, 1:, None], axis=-1)), logits
  (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
  return logits, grads


def test_model_matches_unsharded(rng):
  """Whole hybrid model (embeddings, all-FA / all-LA / head-level layers, RoPE from global positions of packed
  segments, tied head): logits and every parameter gradient under CP 8 and under fsdp x context x tensor equal the
  single-device ones."""
  tok = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32)
  model = create_model(CFG, seed=1)
  ref = _model_value_and_grads(model, tok, SEG)
  graphdef, state = nnx.split(model)
  for name in ("cp8", "fsdp2_cp2_tp2"):
    m = mesh(name)
    with jax.set_mesh(m):
      sharded = nnx.merge(graphdef, jax.device_put(state, param_shardings(state, m)))
      rows = tuple(a for a in ("data", "fsdp") if a in m.axis_names)
      put = lambda x: jax.device_put(x, NamedSharding(m, P(rows, "context")))  # noqa: E731
      got = _model_value_and_grads(sharded, put(tok), put(SEG))
    close(got, ref, 5e-4)


def test_gpu_kernels_lower_for_cuda(monkeypatch):
  """The GPU path under CP 2, lowered for CUDA from the CPU (jit(value_and_grad) of a hybrid mixer): every Triton
  module (GDN at the widened value width V + K, short conv on T/n + W-1 rows; forward and backward) passes the MLIR
  verifier; FA 'heads' (the automatic choice here: 2 heads of one group over 2 devices) runs one cuDNN call on the
  whole sequence for one head, between two all-to-alls, and 'gather' one per switch branch (forward and backward)."""
  import jax._src.cudnn.fused_attention_stablehlo as cudnn_attention

  import pallas_kernels.gated_delta_rule.ops as gdn_ops
  import pallas_kernels.short_conv.ops as conv_ops
  from hydrahead_jax.nn.layers import rope_angles
  from hydrahead_jax.nn.mixer import HydraHeadMixer
  from pallas_kernels.lower_check import lower_for_cuda, verified_triton_modules

  monkeypatch.setattr(gdn_ops, "default_backend", lambda: ("triton", gdn_ops.gpu_triton.Config()))
  monkeypatch.setattr(conv_ops, "default_config", lambda: conv_ops.gpu_triton.Config())
  monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 91000)  # no cuDNN on the CPU: trace anyway
  Tg = 256

  def lowered(algorithm):
    cfg = ModelConfig(vocab_size=64, d_model=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=64,
                      dtype="bfloat16", param_dtype="bfloat16", layout=HeadLayout(((0,),)), la_implementation="pallas",
                      conv_implementation="pallas", fa_implementation="cudnn", fa_context_algorithm=algorithm)
    graphdef, params = nnx.split(HydraHeadMixer(cfg, 1, rngs=nnx.Rngs(0)))
    cos_sin = rope_angles(jnp.arange(Tg, dtype=jnp.int32)[None], cfg.head_dim, cfg.rope_theta)

    def loss(params, x):
      return jnp.mean(nnx.merge(graphdef, params)(x, cos_sin, None)[0].astype(jnp.float32) ** 2)

    with jax.set_mesh(mesh("cp2")), verified_triton_modules() as modules:
      text = lower_for_cuda(jax.value_and_grad(loss, argnums=(0, 1)), params,
                            jax.ShapeDtypeStruct((1, Tg, cfg.d_model), jnp.bfloat16)).as_text()
    return text, modules

  text, modules = lowered(None)
  assert {"gdn_state_fwd", "gdn_state_bwd", "short_conv_fwd", "short_conv_bwd_dx"} <= set(modules), modules
  assert "tensor<1x128x2x64xbf16>" in text  # the GDN's value width V + K = 64 per shard of 128 tokens
  assert text.count("cudnn$fmha") == 2 and text.count("stablehlo.case") == 0  # 'heads': one call each way
  assert "all_to_all" in text and "tensor<1x256x1x32xbf16>" in text  # the whole sequence, one head per device
  text, _ = lowered("gather")
  assert text.count("cudnn$fmha") == 4 and text.count("stablehlo.case") == 2
