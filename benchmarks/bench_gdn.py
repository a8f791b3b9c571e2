"""Gated delta rule on one GPU: correctness of the Pallas kernels and timings side by side.

Parts (each a separate process so torch and JAX do not share the GPU allocator):
  check    Pallas vs the float32 recurrent reference on the GPU (o, final state, all gradients), bf16 and f32,
           ragged T, segment resets, initial state; a few inverse-precision variants.
  headdims the same check at head dims that are not powers of two (HEAD_DIM_PAIRS; zero-padded by the op).
  bench    B=1, H=16, K=V=128, bf16: our Pallas GDN (tiling variants at 32K, the best at every T), the pure-JAX
           chunked GDN, cuDNN causal attention; forward and forward+backward medians (ms).
  fla      fla-core's chunk_gated_delta_rule, same shapes (its Hopper/Triton<3.7.1 guard bypassed for timing).
  big      indexing past 2^31 elements: forward at B*T*H*K > 2^31, checked on the first and last segment.
  bigbwd   the same with the backward (all gradients checked on the first and last segment; ~100 GB: H200).
  report   merge the JSON files into a table (also written as report.md).

  python benchmarks/bench_gdn.py check bench big --out $OUT; python benchmarks/bench_gdn.py fla --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPE = dict(B=1, H=16, K=128, V=128)  # --interpret: H=2, K=V=32
TS = (8192, 32768, 131072)


def _save(out: str, name: str, res: dict) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"{name}.json"), "w") as fh:
    json.dump(res, fh, indent=1)


def _versions() -> dict:
  import jax
  info = {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind)}
  try:
    import jaxlib
    info["jaxlib"] = jaxlib.__version__
  except ImportError:
    pass
  try:
    import triton
    info["triton"] = triton.__version__
  except ImportError:
    pass
  return info


CHECK_VARIANTS = ("bv16", "bv16_fsplit_save")
BASELINES = True  # bench: also time the pure-JAX chunked GDN and cuDNN attention
INTERPRET = False  # --interpret: dry run of the script on CPU (Pallas interpret mode, tiny T)


def _config(cfg):
  from pallas_kernels.gated_delta_rule import gpu_triton
  return gpu_triton.INTERPRET if INTERPRET else cfg


def _variants():
  from pallas_kernels.gated_delta_rule import gpu_triton
  C = gpu_triton.Config
  return {
      "bv16": _config(C()),
      "bv32": _config(C(block_v=32)),
      "bv64": _config(C(block_v=64)),
      "bv16_ss4": _config(C(stages_seq=4)),
      "bv16_ss5": _config(C(stages_seq=5)),
      "bv32_ss4": _config(C(block_v=32, stages_seq=4)),
      "bv16_dqk64": _config(C(dqk_block=64)),
      "bv16_wyb0": _config(C(wyb_block=0)),
      "bv16_cpp2": _config(C(chunks_per_program=2)),
      "bv16_cpp4s3": _config(C(chunks_per_program=4, stages=3)),
      "bv16_wp8": _config(C(warps_par=8)),
      "bv16_nosave": _config(C(save_inverse=False)),
      "bv16_tf32x3": _config(C(inv_precision="tf32x3")),
      "bv16_ib16": _config(C(inv_block=16)),  # the inverse's substitution blocks before 2026-11-30 (19 matmuls)
      "bv16_fsplit": _config(C(fwd_split=True)),
      "bv16_fsplit_ss5": _config(C(fwd_split=True, stages_seq=5)),
      "bv16_fsplit_save": _config(C(fwd_split=True, save_states=True)),
      "bv16_dqkw4": _config(C(warps_dqk=4)),
      "bv16_s3": _config(C(stages=3)),
      "bv16_wyb32": _config(C(wyb_block=32)),
      "bv16_wybw8": _config(C(warps_wyb=8)),
      "bv16_lean": _config(C(save_states=False, save_wp=False)),  # the backward recomputes states, W, U, P
      "bv16_states": _config(C(save_wp=False)),
  }


def part_check(out: str) -> dict:
  import jax
  import jax.numpy as jnp
  from pallas_kernels.gated_delta_rule import bench

  res = {"versions": _versions()}
  B, T, H, K, V = (2, 1000, 4, 128, 128) if not INTERPRET else (1, 200, 2, 32, 32)
  names = ("q", "k", "v", "g", "beta", "h0")
  for dtype in (jnp.bfloat16, jnp.float32):
    q, k, v, g, beta, h0, seg = bench.make_inputs(jax.random.PRNGKey(1), B, T, H, K, V, dtype, segments=0.004)
    do = jax.random.normal(jax.random.PRNGKey(2), (B, T, H, V), jnp.float32)
    dht = jax.random.normal(jax.random.PRNGKey(3), (B, H, K, V), jnp.float32)
    up = [x.astype(jnp.float32) for x in (q, k, v, g, beta)]
    rf, rg = bench.fwd_and_grad(bench.gdn_fn("recurrent"), with_state=True)
    ro, rht = rf(*up, h0, seg)
    rgrads = rg(*up, h0, seg, do, dht)[1]
    for vname in CHECK_VARIANTS:
      cfg = _variants()[vname]
      name = f"{jnp.dtype(dtype).name}.{vname}"
      try:
        pf, pg = bench.fwd_and_grad(bench.gdn_fn("pallas", backend="triton", config=cfg), with_state=True)
        o, ht = pf(q, k, v, g, beta, h0, seg)
        grads = pg(q, k, v, g, beta, h0, seg, do, dht)[1]
        errs = {"o": bench.rel_rmse(o, ro), "ht": bench.rel_rmse(ht, rht)}
        errs.update({n: bench.rel_rmse(a, b) for n, a, b in zip(names, grads, rgrads)})
        res[name] = {n: round(e, 6) for n, e in errs.items()}
      except Exception as ex:  # noqa: BLE001
        res[name] = {"error": f"{type(ex).__name__}: {str(ex)[:1500]}"}
        traceback.print_exc()
      print(name, res[name], flush=True)
      if dtype == jnp.float32:
        break
  _save(out, "check", res)
  return res


HEAD_DIM_PAIRS = ((24, 40), (80, 72), (16, 8))  # (K, V); ~40 s each on the H200 (compiles of both dtypes)


def part_headdims(out: str) -> dict:
  """Default Config vs the float32 recurrent reference at head dims that are not powers of two, bf16 and f32:
  o, final state and all gradients (relative RMSE), B=2, T=300 (ragged), H=2, segment resets, initial state."""
  import jax
  import jax.numpy as jnp
  from pallas_kernels.gated_delta_rule import bench

  res = {"versions": _versions()}
  B, T, H = (2, 300, 2) if not INTERPRET else (1, 70, 1)
  names = ("q", "k", "v", "g", "beta", "h0")
  pairs = HEAD_DIM_PAIRS if not INTERPRET else HEAD_DIM_PAIRS[:1]
  for K, V in pairs:
    for dtype in (jnp.bfloat16, jnp.float32):
      name = f"K{K}.V{V}.{jnp.dtype(dtype).name}"
      try:
        q, k, v, g, beta, h0, seg = bench.make_inputs(jax.random.PRNGKey(K * 1000 + V), B, T, H, K, V, dtype,
                                                      segments=0.01)
        do = jax.random.normal(jax.random.PRNGKey(2), (B, T, H, V), jnp.float32)
        dht = jax.random.normal(jax.random.PRNGKey(3), (B, H, K, V), jnp.float32)
        up = [x.astype(jnp.float32) for x in (q, k, v, g, beta)]
        rf, rg = bench.fwd_and_grad(bench.gdn_fn("recurrent"), with_state=True)
        ro, rht = rf(*up, h0, seg)
        rgrads = rg(*up, h0, seg, do, dht)[1]
        cfg = _config(None)  # None: the default GPU Config
        pf, pg = bench.fwd_and_grad(bench.gdn_fn("pallas", backend="triton", config=cfg), with_state=True)
        o, ht = pf(q, k, v, g, beta, h0, seg)
        grads = pg(q, k, v, g, beta, h0, seg, do, dht)[1]
        errs = {"o": bench.rel_rmse(o, ro), "ht": bench.rel_rmse(ht, rht)}
        errs.update({n: bench.rel_rmse(a, b) for n, a, b in zip(names, grads, rgrads)})
        res[name] = {n: round(e, 6) for n, e in errs.items()}
      except Exception as ex:  # noqa: BLE001
        res[name] = {"error": f"{type(ex).__name__}: {str(ex)[:1500]}"}
        traceback.print_exc()
      print(name, res[name], flush=True)
  _save(out, "headdims", res)
  return res


def _time_gdn(res: dict, key: str, fn, T: int, reps: int = 10) -> None:
  import jax
  import jax.numpy as jnp
  from pallas_kernels.gated_delta_rule import bench

  B, H, K, V = SHAPE["B"], SHAPE["H"], SHAPE["K"], SHAPE["V"]
  q, k, v, g, beta, _, _ = bench.make_inputs(jax.random.PRNGKey(T), B, T, H, K, V, jnp.bfloat16)
  do = jax.random.normal(jax.random.PRNGKey(7), (B, T, H, V), jnp.bfloat16)
  f, gr = bench.fwd_and_grad(fn)
  try:
    res[f"{key}.T{T}.fwd_ms"] = round(bench.median_ms(lambda *a: f(*a)[0], q, k, v, g, beta, reps=reps), 3)
    res[f"{key}.T{T}.fwdbwd_ms"] = round(
        bench.median_ms(gr, q, k, v, g, beta, None, None, do, None, reps=reps), 3)
    mem = gr.lower(q, k, v, g, beta, None, None, do, None).compile().memory_analysis()
    if mem is not None:  # XLA's buffers of the fwd+bwd program beyond its inputs and outputs
      res[f"{key}.T{T}.fwdbwd_temp_GiB"] = round(mem.temp_size_in_bytes / 2**30, 3)
  except Exception as ex:  # noqa: BLE001
    res[f"{key}.T{T}.error"] = f"{type(ex).__name__}: {str(ex)[:800]}"
    traceback.print_exc()
  print({n: x for n, x in res.items() if n.startswith(f"{key}.T{T}.")}, flush=True)


def _time_cudnn(res: dict, T: int) -> None:
  import jax
  import jax.numpy as jnp
  from pallas_kernels.gated_delta_rule import bench

  B, H, D = SHAPE["B"], SHAPE["H"], SHAPE["K"]
  ks = jax.random.split(jax.random.PRNGKey(T), 4)
  q, k, v, do = (jax.random.normal(kk, (B, T, H, D), jnp.bfloat16) for kk in ks)

  def attn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

  fwd = jax.jit(attn)
  grad = jax.jit(jax.value_and_grad(lambda q, k, v, do: jnp.sum(attn(q, k, v).astype(jnp.float32) * do),
                                    argnums=(0, 1, 2)))
  reps = 10 if T <= 32768 else 3
  try:
    res[f"cudnn_fa.T{T}.fwd_ms"] = round(bench.median_ms(fwd, q, k, v, reps=reps), 3)
    res[f"cudnn_fa.T{T}.fwdbwd_ms"] = round(bench.median_ms(grad, q, k, v, do, reps=reps), 3)
  except Exception as ex:  # noqa: BLE001
    res[f"cudnn_fa.T{T}.error"] = f"{type(ex).__name__}: {str(ex)[:800]}"
  print({n: x for n, x in res.items() if n.startswith(f"cudnn_fa.T{T}.")}, flush=True)


def part_bench(out: str, ts=TS, variants: str = "") -> dict:
  from pallas_kernels.gated_delta_rule import bench

  res = {"versions": _versions(), "shape": SHAPE}
  all_variants = _variants()
  chosen = [v for v in variants.split(",") if v] or list(all_variants)
  t_var = 32768 if 32768 in ts else ts[-1]
  for name in chosen:  # tiling variants at 32K
    _time_gdn(res, f"pallas.{name}", bench.gdn_fn("pallas", backend="triton", config=all_variants[name]), t_var)
    _save(out, "bench", res)
  timed = {n: res.get(f"pallas.{n}.T{t_var}.fwdbwd_ms", 1e9) for n in chosen}
  best = min(timed, key=timed.get)
  res["pallas_best_variant"] = best
  for T in ts:
    if T != t_var:
      _time_gdn(res, f"pallas.{best}", bench.gdn_fn("pallas", backend="triton", config=all_variants[best]), T)
    if BASELINES:
      _time_gdn(res, "jnp_chunked", bench.gdn_fn("chunked"), T, reps=10 if T <= 32768 else 3)
      _time_cudnn(res, T)
    _save(out, "bench", res)
  return res


def part_fla(out: str, ts=TS) -> dict:
  import torch
  import torch.nn.functional as F
  import fla.ops.common.chunk_o as co
  co.TRITON_ABOVE_3_7_1 = True  # timing only (fla issue #640 guard)
  from fla.ops.gated_delta_rule import chunk_gated_delta_rule

  def median(fn, warm=3, rep=10):
    for _ in range(warm):
      fn()
    torch.cuda.synchronize()
    ts_ = []
    for _ in range(rep):
      s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      s.record()
      fn()
      e.record()
      torch.cuda.synchronize()
      ts_.append(s.elapsed_time(e))
    return sorted(ts_)[len(ts_) // 2]

  import fla
  import triton
  res = {"versions": {"torch": torch.__version__, "fla": getattr(fla, "__version__", "?"),
                      "triton": triton.__version__, "device": torch.cuda.get_device_name()}}
  B, H, K, V = SHAPE["B"], SHAPE["H"], SHAPE["K"], SHAPE["V"]
  for T in ts:
    q = F.normalize(torch.randn(B, T, H, K, device="cuda"), dim=-1).to(torch.bfloat16).requires_grad_()
    k = F.normalize(torch.randn(B, T, H, K, device="cuda"), dim=-1).to(torch.bfloat16).requires_grad_()
    v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16).requires_grad_()
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda")).requires_grad_()
    beta = torch.rand(B, T, H, device="cuda", dtype=torch.bfloat16).requires_grad_()
    do = torch.randn_like(v)

    def f():
      return chunk_gated_delta_rule(q, k, v, g=g, beta=beta, scale=K**-0.5)[0]

    try:
      res[f"fla.T{T}.fwd_ms"] = round(median(f), 3)
      res[f"fla.T{T}.fwdbwd_ms"] = round(median(lambda: f().backward(do)), 3)
    except Exception as ex:  # noqa: BLE001
      res[f"fla.T{T}.error"] = f"{type(ex).__name__}: {str(ex)[:800]}"
    print({n: x for n, x in res.items() if f".T{T}." in n}, flush=True)
    del q, k, v, g, beta, do
    torch.cuda.empty_cache()
  _save(out, "fla", res)
  return res


def part_big(out: str) -> dict:
  """Forward past 2^31 elements per tensor; first and last segments checked against the f32 reference."""
  import jax
  import jax.numpy as jnp
  from pallas_kernels.gated_delta_rule import bench, gpu_triton

  B, H, K, V = 1, 16, 128, 128
  T = 2**20 + 4096 if not INTERPRET else 300
  seg_len = 2048 if not INTERPRET else 64
  res = {"T": T, "elements_per_tensor": B * T * H * K, "over_2^31": B * T * H * K > 2**31}
  key = jax.random.PRNGKey(11)
  q, k, v, g, beta, _, _ = bench.make_inputs(key, B, T, H, K, V, jnp.bfloat16)
  tt = jnp.arange(T)
  seg = ((tt >= seg_len).astype(jnp.int32) + (tt >= T - seg_len).astype(jnp.int32))[None]
  fn = jax.jit(lambda *a, seg: bench.gdn_fn("pallas", backend="triton", config=_config(gpu_triton.Config()))(
      *a, segment_ids=seg, output_final_state=True))
  t0 = time.perf_counter()
  o, ht = jax.block_until_ready(fn(q, k, v, g, beta, seg=seg))
  res["fwd_s_incl_compile"] = round(time.perf_counter() - t0, 2)
  ref = bench.gdn_fn("recurrent")
  for name, sl in (("first", slice(0, seg_len)), ("last", slice(T - seg_len, T))):
    args = [x[:, sl].astype(jnp.float32) for x in (q, k, v, g, beta)]
    ro, rht = ref(*args, output_final_state=True)
    res[f"{name}_segment_o_rel_err"] = round(bench.rel_rmse(o[:, sl], ro), 6)
    if name == "last":
      res["final_state_rel_err"] = round(bench.rel_rmse(ht, rht), 6)
  res["o_finite"] = bool(jnp.all(jnp.isfinite(o.astype(jnp.float32))))
  print(res, flush=True)
  _save(out, "big", res)
  return res


def part_bigbwd(out: str) -> dict:
  """Forward + backward past 2^31 elements per tensor (q, k, v, do and every gradient); the gradients of the first
  and last segments are checked against the f32 recurrent reference run on those segments alone (segments
  reset the state, so they are independent). Needs ~100 GB: an H200."""
  import jax
  import jax.numpy as jnp
  from pallas_kernels.gated_delta_rule import bench, gpu_triton

  B, H, K, V = 1, 16, 128, 128
  T = 2**20 + 4096 if not INTERPRET else 300
  seg_len = 2048 if not INTERPRET else 64
  res = {"T": T, "elements_per_tensor": B * T * H * K, "over_2^31": B * T * H * K > 2**31}
  q, k, v, g, beta, _, _ = bench.make_inputs(jax.random.PRNGKey(12), B, T, H, K, V, jnp.bfloat16)
  do = jax.random.normal(jax.random.PRNGKey(13), (B, T, H, V), jnp.bfloat16)
  tt = jnp.arange(T)
  seg = ((tt >= seg_len).astype(jnp.int32) + (tt >= T - seg_len).astype(jnp.int32))[None]
  _, grad = bench.fwd_and_grad(bench.gdn_fn("pallas", backend="triton", config=_config(gpu_triton.Config())))
  t0 = time.perf_counter()
  _, grads = jax.block_until_ready(grad(q, k, v, g, beta, None, seg, do, None))
  res["fwdbwd_s_incl_compile"] = round(time.perf_counter() - t0, 2)
  _, ref_grad = bench.fwd_and_grad(bench.gdn_fn("recurrent"))
  for name, sl in (("first", slice(0, seg_len)), ("last", slice(T - seg_len, T))):
    args = [x[:, sl].astype(jnp.float32) for x in (q, k, v, g, beta)]
    _, rgrads = ref_grad(*args, None, None, do[:, sl].astype(jnp.float32), None)
    for n, a, b in zip(("dq", "dk", "dv", "dg", "dbeta"), grads, rgrads):
      res[f"{name}_segment_{n}_rel_err"] = round(bench.rel_rmse(a[:, sl], b), 6)
  res["grads_finite"] = all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in grads)
  print(res, flush=True)
  _save(out, "bigbwd", res)
  return res


def part_kernels(out: str, ts=(32768, 131072), variant: str = "bv16", seq_only: bool = False) -> dict:
  """Per-kernel medians (ms) of one variant: where the forward and backward time goes."""
  import jax
  import jax.numpy as jnp
  from pallas_kernels.gated_delta_rule import bench, gpu_triton, ops

  cfg = _variants()[variant]
  path = os.path.join(out, "kernels.json")
  res = json.load(open(path)) if os.path.exists(path) else {"versions": _versions()}
  B, H, K, V = SHAPE["B"], SHAPE["H"], SHAPE["K"], SHAPE["V"]
  for T in ts:
    q, k, v, g, beta, h0, _ = bench.make_inputs(jax.random.PRNGKey(T), B, T, H, K, V, jnp.bfloat16)
    C, scale = 64, K**-0.5
    gc = ops._chunk_cumsum(g, C)
    beta_t = beta.astype(jnp.float32).transpose(0, 2, 1)
    do = jax.random.normal(jax.random.PRNGKey(5), (B, T, H, V), jnp.bfloat16)
    kw = dict(C=C, scale=scale, cfg=cfg)
    wy = jax.jit(lambda q, k, v, gc, b: gpu_triton.wy_fwd(q, k, v, gc, b, None, emit_t=True, **kw))
    w, u, p, t = wy(q, k, v, gc, beta_t)
    wy_t = jax.jit(lambda q, k, v, gc, b, t: gpu_triton.wy_fwd(q, k, v, gc, b, None, t, **kw))
    sf = jax.jit(lambda *a: gpu_triton.state_fwd(*a, out_dtype=jnp.bfloat16, store=False, **kw))
    ss = jax.jit(lambda *a: gpu_triton.state_fwd(*a, out_dtype=jnp.bfloat16, store=True, **kw))
    _, hs, vn = ss(q, k, w, u, p, gc, None, h0)
    sb = jax.jit(lambda *a: gpu_triton.state_bwd(*a, **kw))
    dvn, dhs, _ = sb(q, k, w, p, gc, None, do, h0)
    dq = jax.jit(lambda *a: gpu_triton.dqk(*a, dq_dtype=jnp.bfloat16, **kw))
    _, dkp, dw, dgcp = dq(q, k, gc, None, hs, dhs, vn, dvn, do)
    wb = jax.jit(lambda *a: gpu_triton.wy_bwd(*a, dk_dtype=jnp.bfloat16, dv_dtype=jnp.bfloat16, C=C, cfg=cfg))
    timed = {
        "wy_fwd_emit_t": (wy, (q, k, v, gc, beta_t)),
        "wy_fwd_from_t": (wy_t, (q, k, v, gc, beta_t, t)),
        "state_fwd_o": (sf, (q, k, w, u, p, gc, None, h0)),
        "state_fwd_store": (ss, (q, k, w, u, p, gc, None, h0)),
        "state_bwd": (sb, (q, k, w, p, gc, None, do, h0)),
        "output": (jax.jit(lambda *a: gpu_triton.output(*a, out_dtype=jnp.bfloat16, **kw)),
                   (q, p, gc, None, hs, vn)),
        "dqk": (dq, (q, k, gc, None, hs, dhs, vn, dvn, do)),
        "wy_bwd": (wb, (k, v, gc, beta_t, None, t, dw, dvn, dkp, dgcp)),
    }
    for name, (fn, args) in timed.items():
      if seq_only and not name.startswith("state_"):
        continue
      try:
        res[f"{variant}.T{T}.{name}"] = round(bench.median_ms(fn, *args), 3)
      except Exception as ex:  # noqa: BLE001
        res[f"{variant}.T{T}.{name}.error"] = f"{type(ex).__name__}: {str(ex)[:500]}"
    print({n: x for n, x in res.items() if n.startswith(f"{variant}.T{T}.")}, flush=True)
    _save(out, "kernels", res)
  return res


def part_report(out: str) -> str:
  def load(name):
    path = os.path.join(out, f"{name}.json")
    return json.load(open(path)) if os.path.exists(path) else {}

  bench, fla = load("bench"), load("fla")
  best = bench.get("pallas_best_variant", "bv32")
  lines = ["| T | ours fwd | ours fwd+bwd | fla fwd | fla fwd+bwd | fla/ours fwd+bwd | jnp chunked fwd / fwd+bwd "
           "| cuDNN FA fwd / fwd+bwd |", "|---|---|---|---|---|---|---|---|"]
  for T in TS:
    ours_f, ours_b = bench.get(f"pallas.{best}.T{T}.fwd_ms"), bench.get(f"pallas.{best}.T{T}.fwdbwd_ms")
    fla_f, fla_b = fla.get(f"fla.T{T}.fwd_ms"), fla.get(f"fla.T{T}.fwdbwd_ms")
    ratio = f"{fla_b / ours_b:.2f}" if ours_b and fla_b else "-"
    lines.append(f"| {T // 1024}K | {ours_f} | {ours_b} | {fla_f} | {fla_b} | {ratio} | "
                 f"{bench.get(f'jnp_chunked.T{T}.fwd_ms')} / {bench.get(f'jnp_chunked.T{T}.fwdbwd_ms')} | "
                 f"{bench.get(f'cudnn_fa.T{T}.fwd_ms')} / {bench.get(f'cudnn_fa.T{T}.fwdbwd_ms')} |")
  text = "\n".join(lines)
  text += f"\n\nbest tiling: {best}; versions: {bench.get('versions')} {fla.get('versions')}\n"
  with open(os.path.join(out, "report.md"), "w") as fh:
    fh.write(text)
  print(text)
  return text


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("parts", nargs="+", choices=["check", "headdims", "bench", "kernels", "fla", "big", "bigbwd",
                                                      "report"])
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  parser.add_argument("--variants", default="", help="comma-separated tiling variants timed at 32K")
  parser.add_argument("--ts", default="", help="comma-separated sequence lengths")
  parser.add_argument("--seq-only", action="store_true", help="kernels: time only the sequential state passes")
  parser.add_argument("--no-baselines", action="store_true", help="bench: skip jnp chunked and cuDNN")
  parser.add_argument("--check-variants", default="", help="comma-separated variants checked on the GPU")
  parser.add_argument("--interpret", action="store_true", help="CPU dry run in Pallas interpret mode")
  args = parser.parse_args()
  global INTERPRET, BASELINES, CHECK_VARIANTS
  INTERPRET = args.interpret
  BASELINES = not args.no_baselines
  if args.check_variants:
    CHECK_VARIANTS = tuple(args.check_variants.split(","))
  if INTERPRET:
    SHAPE.update(H=2, K=32, V=32)
  ts = tuple(int(t) for t in args.ts.split(",")) if args.ts else TS
  for part in args.parts:
    t0 = time.perf_counter()
    try:
      if part == "bench":
        part_bench(args.out, ts, args.variants)
      elif part == "kernels":
        for variant in (args.variants or "bv16").split(","):
          part_kernels(args.out, ts if args.ts else (32768, 131072), variant, seq_only=args.seq_only)
      elif part == "fla":
        part_fla(args.out, ts)
      else:
        globals()[f"part_{part}"](args.out)
    except Exception:  # noqa: BLE001
      traceback.print_exc()
    print(f"== {part} done in {time.perf_counter() - t0:.1f}s", flush=True)


if __name__ == "__main__":
  main()
