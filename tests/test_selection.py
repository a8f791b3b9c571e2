"""Head selection: a hand-wired copy head must be found first; policies, CKA, calibration, CLI round trip.

The tiny teacher (2 layers x 4 heads, 2 KV groups, no QK-norm) is random except one head, layer 1 head 2,
wired to retrieve: its query reads a "question marker" feature, its key a "value token" feature (in the RoPE
pair with ~0 frequency), its value/output copy the value token's code into the residual, which the tied
unembedding reads out. Other heads and MLPs write little. Probes: filler, one value token (the needle),
filler, the marker; the answer is the needle's token; the corrupted prompt has another value token.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hydrahead_jax.config import HeadLayout, ModelConfig
from hydrahead_jax.transfer.surgery import convert_flat, head_order, student_config
from hydrahead_jax.nn.layers import rope_angles
from hydrahead_jax.nn.model import HydraHeadLM
from hydrahead_jax.interop.names import model_from_flat, model_to_flat
from hydrahead_jax.selection import crosschecks, patching, policies, similarity
from hydrahead_jax.selection.analysis import AnalysisConfig, analyze, causal_test
from hydrahead_jax.selection.probes import ProbeSet, make_probes

V, D, L, H, G, K = 320, 32, 2, 4, 2, 8
COPY = (1, 2)  # (layer, head) wired to copy; its group is 1
VALUES = np.arange(100, 116)  # value tokens (byte ids, so the byte tokenizer's corpus fits the vocab)
MARKER = 259  # ByteTokenizer marker 0
CFG = ModelConfig(vocab_size=V, d_model=D, num_layers=L, num_heads=H, num_kv_heads=G, head_dim=K, mlp_dim=32,
                  qk_norm=False, rope_theta=1e8, dtype="float32", la_chunk_size=16, scan_layers=False)


def copy_teacher(seed=0) -> HydraHeadLM:
  rng = np.random.default_rng(seed)
  flat = {k: np.array(v) for k, v in model_to_flat(HydraHeadLM(CFG, rngs=nnx.Rngs(seed))).items()}
  emb = np.zeros((V, D), np.float32)
  emb[:, 10:] = rng.normal(size=(V, D - 10))  # filler identity in dims 10..
  hadamard = np.array([[1]], np.float32)
  for _ in range(3):
    hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
  codes = np.concatenate([hadamard, -hadamard])  # 16 codes in 8 dims: orthogonal or opposite
  emb[VALUES] = 0.0
  emb[VALUES, 0] = 1.0  # "is a value" feature
  emb[VALUES, 2:10] = codes
  emb[MARKER] = 0.0
  emb[MARKER, 1] = 3.0  # "question marker" feature
  flat["embed.embedding"] = emb
  l, h = COPY
  g = h // CFG.heads_per_group
  for i in range(L):
    flat[f"layers.{i}.mixer.wo"] *= 0.1
    flat[f"layers.{i}.mixer.fa.wq"][:, :, K // 2 - 1] = 0.0  # nobody else uses the position-free RoPE pair
    flat[f"layers.{i}.mixer.fa.wk"][:, :, K // 2 - 1] = 0.0
    flat[f"layers.{i}.mlp.w_down"] *= 0.1
  p = f"layers.{l}.mixer."
  flat[p + "fa.wq"][:, h] = 0.0
  flat[p + "fa.wq"][1, h, K // 2 - 1] = 2.0
  flat[p + "fa.wk"][:, g] = 0.0
  flat[p + "fa.wk"][0, g, K // 2 - 1] = 2.0
  flat[p + "fa.wv"][:, g] = 0.0
  flat[p + "fa.wv"][2:10, g] = np.eye(8)
  flat[p + "wo"][h] = 0.0
  flat[p + "wo"][h, :, 2:10] = 4.0 * np.eye(8)
  return model_from_flat(CFG, flat)


def copy_probes(n, T=24, seed=0) -> ProbeSet:
  rng = np.random.default_rng(seed)
  filler = np.setdiff1d(np.arange(10, 256), VALUES)
  clean = rng.choice(filler, size=(n, T)).astype(np.int32)
  clean[:, 0], clean[:, -1] = 257, MARKER
  pos = rng.integers(1, T - 1, n)
  val = rng.choice(VALUES, n)
  other = np.array([rng.choice(VALUES[VALUES != v]) for v in val])
  corrupt = clean.copy()
  clean[np.arange(n), pos], corrupt[np.arange(n), pos] = val, other
  targets = np.zeros_like(clean)
  targets[:, -1] = val
  weights = np.zeros(clean.shape, np.float32)
  weights[:, -1] = 1.0
  needle = np.zeros(clean.shape, bool)
  needle[np.arange(n), pos] = True
  return ProbeSet(clean, corrupt, targets, weights, needle, np.asarray(["copy"] * n), T, seed)


@pytest.fixture(scope="module")
def teacher():
  return copy_teacher()


@pytest.fixture(scope="module")
def analysis(teacher):
  acfg = AnalysisConfig(batch_size=4, chunk=4, cka_tokens=64)
  return analyze(teacher, [copy_probes(8)], acfg, name="copy")


def test_copy_head_found_first_by_every_method(analysis):
  pr = analysis["probes"][0]
  assert pr["kept"] == 8 and pr["clean_accuracy"] == 1.0 and pr["corrupt_accuracy"] == 0.0
  for name in ("exact", "attribution", "retrieval", "mean_ablation"):
    s = np.nan_to_num(analysis["scores"][name], nan=-1)
    assert np.unravel_index(np.argmax(s), s.shape) == COPY, (name, s)
  exact = analysis["scores"]["exact"]
  assert exact[COPY] > 0.9
  assert np.max(np.abs(np.delete(exact.ravel(), COPY[0] * H + COPY[1]))) < 0.2
  assert analysis["scores"]["retrieval"][COPY] == 1.0
  assert analysis["agreement"]["attribution"]["top1_overlap"] == 1.0  # k = round(8 / 8) = 1
  assert analysis["cka"].shape == (L, L) and np.allclose(np.diag(analysis["cka"]), 1.0, atol=1e-5)
  lay, info = policies.make_layout("global", analysis["selection_score"], 1, num_groups=G, heads_per_group=2)
  assert lay.fa_groups == ((), (1,))


def test_exact_patching_matches_a_plain_patched_forward(teacher, rng):
  probes = copy_probes(4, seed=int(rng.integers(1 << 20)))
  pt = patching.HeadPatcher(teacher, batch_size=4, chunk=4)
  base = pt.base(probes)
  grid = patching.exact_scores(pt, probes, base, min_delta=-np.inf)["per_probe"]
  l, h = int(rng.integers(L)), int(rng.integers(H))
  clean, corrupt = jnp.asarray(probes.clean), jnp.asarray(probes.corrupt)
  _, inter = teacher.intermediates(corrupt, ("heads",))
  mask = jnp.zeros((L, H)).at[l, h].set(1.0)
  logp = jax.nn.log_softmax(teacher(clean, head_patch=(mask, inter["heads"]))[:, -1])
  m = np.asarray(logp[np.arange(4), probes.targets[:, -1]])
  np.testing.assert_allclose(grid[:, l, h], (base.m_clean - m) / base.delta, rtol=1e-4, atol=1e-4)


def test_causal_test_top_vs_random(teacher, analysis):
  ct = causal_test(teacher, copy_probes(8, seed=7), analysis["selection_score"], draws=3, batch_size=4, chunk=4)
  assert ct["k"] == 1 and ct["top_heads"] == [COPY]
  assert ct["baseline_accuracy"] == 1.0 and ct["top_accuracy"] == 0.0
  assert ct["random_accuracy_mean"] >= ct["top_accuracy"]


def test_retrieval_attention_matches_model_attention(teacher):
  """The attention recomputed outside the model reproduces the model's head output at the answer step."""
  probes = copy_probes(2)
  tok = jnp.asarray(probes.clean)
  _, inter = teacher.intermediates(tok, ("mixer_in", "heads"))
  flat = model_to_flat(teacher)
  wq, wk, qs, ks = crosschecks.layer_fa_params(flat, CFG, 1)
  probs = crosschecks.attention_at_answers(inter["mixer_in"][1], wq, wk, qs, ks, start=probes.start,
                                           heads_per_group=2, qk_norm=False, theta=CFG.rope_theta, eps=CFG.rms_eps)
  v = jnp.einsum("bsd,dgk->bsgk", inter["mixer_in"][1], flat["layers.1.mixer.fa.wv"])
  out = jnp.einsum("bhas,bshk->bahk", probs, jnp.repeat(v, 2, axis=2))
  np.testing.assert_allclose(out[:, 0], inter["heads"][1][:, -1], rtol=1e-4, atol=1e-5)


def test_probes_from_the_synthetic_generators():
  from hydrahead_jax.data import ByteTokenizer

  tok = ByteTokenizer()
  ps = make_probes(tok, 300, tasks=("niah_single", "niah_multivalue", "mqar"), per_task=2, seed=3)
  assert ps.clean.shape == ps.corrupt.shape and ps.prompt_len == 300 and ps.num == 6
  for n in range(ps.num):
    w = ps.weights[n] > 0
    assert w.sum() >= 3 and not w[: ps.start].any()
    ans = ps.targets[n][w]
    assert tok.decode(ans.tolist()).isdigit()  # scored tokens are the value digits
    # teacher forcing: the input after the prompt is the clean answer shifted by one
    span = np.nonzero(ps.targets[n])[0]
    np.testing.assert_array_equal(ps.clean[n, span[1:]], ps.targets[n, span[:-1]])
    np.testing.assert_array_equal(ps.clean[n, ps.prompt_len:], ps.corrupt[n, ps.prompt_len:])
    diff = ps.clean[n, : ps.prompt_len] != ps.corrupt[n, : ps.prompt_len]
    assert diff.any() and ps.needle[n, : ps.prompt_len][diff].all()
    first_value = tok.decode(ps.targets[n][w][:3].tolist())
    assert first_value in tok.decode(ps.clean[n][ps.needle[n]].tolist())


def test_probe_file_round_trip(tmp_path):
  ps = copy_probes(3)
  ps.save(str(tmp_path / "p.npz"))
  back = ProbeSet.load(str(tmp_path / "p.npz"))
  for f in ("clean", "corrupt", "targets", "weights", "needle", "tasks"):
    np.testing.assert_array_equal(getattr(back, f), getattr(ps, f))
  assert back.prompt_len == ps.prompt_len


def test_budget_rounding_and_policies():
  n, note = policies.parse_budget("7:1", 30, 3)  # SmolLM2: 90 groups / 8 = 11.25
  assert n == 11 and "11.2" in note and "7.18:1" in note
  assert policies.parse_budget("3:1", 28, 8)[0] == 56 and policies.parse_budget(5, 4, 2)[0] == 5
  with pytest.raises(ValueError, match="budget"):
    policies.parse_budget(99, 4, 2)
  rng = np.random.default_rng(0)
  scores = rng.random((6, 8))  # 6 layers x 8 heads, 4 groups of 2
  gs = policies.group_scores(scores, 2)
  for name in policies.POLICIES:
    lay, info = policies.make_layout(name, scores, "3:1", num_groups=4, heads_per_group=2, seed=1)
    assert HeadLayout.from_json(policies.layout_json(lay, info)) == lay
    if name in ("global", "per_layer", "random"):
      assert lay.total_fa_groups() == 6
  glob = policies.make_layout("global", scores, 6, num_groups=4, heads_per_group=2)[0]
  assert sum(gs[l, g] for l, grp in enumerate(glob.fa_groups) for g in grp) == pytest.approx(np.sort(gs.ravel())[-6:].sum())
  per = policies.make_layout("per_layer", scores, 6, num_groups=4, heads_per_group=2)[0]
  assert all(grp == (int(np.argmax(gs[l])),) for l, grp in enumerate(per.fa_groups))
  with pytest.raises(ValueError, match="needs head scores"):
    policies.make_layout("global", None, "3:1", num_groups=4, heads_per_group=2, num_layers=6)
  lw, info = policies.make_layout("layerwise_even", None, "3:1", num_groups=4, heads_per_group=2, num_layers=6)
  assert [len(x) for x in lw.fa_groups] == [0, 0, 4, 0, 0, 4]  # 6 groups / 4 = 1.5 -> 2 whole layers
  assert "rounded half-up to 2 whole layers" in info["selection"]
  ls = policies.make_layout("layerwise_score", scores, "3:1", num_groups=4, heads_per_group=2)[0]
  assert [l for l, x in enumerate(ls.fa_groups) if x] == sorted(np.argsort(-gs.sum(1))[:2].tolist())
  r1 = policies.make_layout("random", None, 6, num_groups=4, heads_per_group=2, num_layers=6, seed=5)[0]
  assert r1 == policies.make_layout("random", None, 6, num_groups=4, heads_per_group=2, num_layers=6, seed=5)[0]


def test_linear_cka_properties(rng):
  x = rng.normal(size=(200, 16))
  q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
  feats = np.stack([x, 3.0 * x @ q, rng.normal(size=(200, 16))])
  cka = np.asarray(similarity.linear_cka(jnp.asarray(feats)))
  assert cka[0, 1] == pytest.approx(1.0, abs=1e-4)  # invariant to rotation and scale
  assert cka[0, 2] < 0.3 and np.allclose(cka, cka.T, atol=1e-6)
  assert similarity.block_structure(cka) == [[0, 1], [2]]


def test_spearman():
  a = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
  assert crosschecks.spearman(a, a * 10) == pytest.approx(1.0)
  assert crosschecks.spearman(a, -a) == pytest.approx(-1.0)
  ties = np.array([3.0, 1.0, 3.0, 2.0])
  assert crosschecks.spearman(ties, np.array([2.5, 1.0, 2.5, 2.0])) == pytest.approx(1.0)  # ties share a rank


def test_conversion_fa_heads_exact(teacher, rng):
  layout = HeadLayout(((0,), (1,)))
  scfg = student_config(CFG, layout, la_implementation="recurrent")  # cheapest eager LA for T=16
  student = model_from_flat(scfg, convert_flat(model_to_flat(teacher), scfg))
  tok = jnp.asarray(rng.integers(0, V, (2, 16)), jnp.int32)
  _, t_int = teacher.intermediates(tok)
  cos_sin = rope_angles(jnp.broadcast_to(jnp.arange(16), (2, 16)), K, CFG.rope_theta)
  for l in range(L):  # with the teacher's layer input, the student's FA heads are the teacher's heads exactly
    fa_heads, _ = head_order(layout, l, G, 2)
    _, raw = student.segments[l].mixer(t_int["mixer_in"][l], cos_sin, None)
    np.testing.assert_allclose(raw[:, :, : len(fa_heads)], t_int["heads"][l][:, :, fa_heads], atol=1e-5)


def test_cli_analyze_layout_convert_round_trip(teacher, tmp_path):
  from hydrahead_jax import select
  from hydrahead_jax.interop.load import load_pretrained
  from hydrahead_jax.interop.orbax import read_manifest, save_pretrained

  tdir = save_pretrained(teacher, str(tmp_path / "teacher"))
  copy_probes(8).save(str(tmp_path / "p.npz"))
  copy_probes(8, seed=9).save(str(tmp_path / "h.npz"))
  out = str(tmp_path / "sel")
  select.main(["analyze", "--teacher", tdir, "--probes", str(tmp_path / "p.npz"), "--heldout-probes",
               str(tmp_path / "h.npz"), "--methods", "exact,retrieval", "--budget", "1", "--batch-size", "4",
               "--chunk", "4", "--cka-tokens", "32", "--random-draws", "2", "--out", out, "--quiet"])
  for f in ("head_scores.json", "heatmap.png", "cka.png", "report.txt", "layout_global.json", "layout_random.json"):
    assert os.path.getsize(os.path.join(out, f)) > 0
  with open(os.path.join(out, "head_scores.json")) as f:
    data = json.load(f)
  assert data["causal_test"][0]["top_heads"] == [list(COPY)]
  assert json.load(open(os.path.join(out, "layout_global.json")))["fa_groups"] == [[], [1]]
  select.main(["layout", "--scores", os.path.join(out, "head_scores.json"), "--policy", "per_layer", "--budget",
               "1:1", "--out", str(tmp_path / "pl.json")])
  assert policies.read_layout(str(tmp_path / "pl.json")).fa_groups == ((0,), (1,))
  sdir = str(tmp_path / "student")
  select.main(["convert", "--teacher", tdir, "--layout", os.path.join(out, "layout_global.json"), "--calib-num",
               "128", "--calib-length", "32", "--calib-batch", "64", "--heldout-num", "128", "--out", sdir, "--quiet"])
  scfg, student = load_pretrained(sdir)
  assert scfg.layout.fa_groups == ((), (1,))
  flat = model_to_flat(student)
  assert not np.allclose(flat["layers.0.mixer.fusion.la_norm_scale"], 1.0)  # calibrated
  rep = read_manifest(sdir)["metadata"]["conversion"]
  assert rep["calibration"]["inputs"] == "teacher"
  assert rep["calibration"]["max_abs_log_rms_ratio_before_each_pass"][0] > 0.5  # far off before
  assert rep["heldout"]["max_head_rms_dev"] < 0.05  # LA head output RMS within 5% on held-out text
  assert rep["heldout_free_running"]["max_head_rms_dev"] < 0.05  # also in the student's own forward
  # the iterated free-running variant converges on the calibration data
  from hydrahead_jax.transfer.convert import calibration_batches, convert_teacher
  from hydrahead_jax.data import ByteTokenizer

  calib = calibration_batches(ByteTokenizer(), num=128, length=32, batch_size=64, seed=0)
  _, rep2 = convert_teacher(teacher, scfg.layout, calib, inputs="student", iterations=3)
  assert rep2["calibration"]["max_abs_log_rms_ratio_before_each_pass"][-1] < 0.01
  np.testing.assert_array_equal(flat["layers.1.mixer.fa.wq"], model_to_flat(teacher)["layers.1.mixer.fa.wq"][:, 2:])
