"""The study on CPU: the transfer's tiny demo teacher (a 2-layer byte-level model trained in seconds on MQAR; its
window is 42 tokens) and every arm of the SmolLM2 study, each a handful of steps. Exercises the whole harness; its
numbers say nothing about the claims.

  python -m hydrahead_jax.study --config configs/study/tiny.py --arms all --report     # a few minutes on 2 cores

2 layers x 2 KV groups = 4 groups: "7:1" rounds half-up to 1 FA group, layer-wise "3:1" to 1 whole layer (2
groups). Evaluation: MQAR at 32 tokens (inside the window) and 128 (3x beyond), perplexity at 128.
"""

import os

from hydrahead_jax.study.config import ArmConfig, LayoutSpec, StudyConfig, StudyEval, Thresholds

HERE = os.path.dirname(os.path.abspath(__file__))

# fusion='none' has no fusion scales: stage 1 trains the LA parameters only (the recipe's other patterns, unchanged)
NO_FUSION_ALIGN = ("stages.align.optim.trainable=('*.mixer.la.*',)",)


def get_config() -> StudyConfig:
  head = "7:1"
  arms = (
      ArmConfig("1", "teacher", role="teacher", kind="teacher"),
      ArmConfig("2", "head-level 7:1, exact patching", role="head_exact",
                layout=LayoutSpec(policy="global", budget=head, score="exact")),
      ArmConfig("3", "head-level 7:1, retrieval score", role="head_retrieval",
                layout=LayoutSpec(policy="global", budget=head, score="retrieval")),
      ArmConfig("4", "head-level 7:1, random (seed 0)", role="random",
                layout=LayoutSpec(policy="random", budget=head, seed=0)),
      ArmConfig("5", "layer-wise, arm 2's FA budget", role="layerwise_budget",
                layout=LayoutSpec(policy="layerwise_score", budget=head, score="exact")),
      ArmConfig("6", "layer-wise 3:1", role="layerwise_3to1", layout=LayoutSpec(policy="layerwise_even", budget="3:1")),
      ArmConfig("7", "all LA", role="all_la", layout=LayoutSpec(policy="all_la")),
      ArmConfig("8", "arm 2, fusion none", role="no_fusion", fusion="none", overrides=NO_FUSION_ALIGN,
                layout=LayoutSpec(policy="global", budget=head, score="exact")),
      ArmConfig("9", "arm 2, LA k/v shared per group", role="kv_sharing", student={"la_sharing": "kv"},
                layout=LayoutSpec(policy="global", budget=head, score="exact")),
  )
  return StudyConfig(
      name="tiny", transfer=os.path.join(HERE, "tiny_transfer.py"), arms=arms,
      budgets={"demo": ()}, budget="demo", minutes_per_arm=1.0, teacher_window=42,
      eval=StudyEval(tasks=("mqar", "ppl"), retrieval_tasks=("mqar",), lengths=(32, 128), examples=16, seed=0,
                     chat="off", ppl_docs=2, batch_size=16, chunk_size=32, max_new_tokens=8, proxy_length=64,
                     proxy_docs=4, proxy_batch=4),
      thresholds=Thresholds(), workroot="runs/study/tiny", out_dir="runs/study/tiny/results",
      report="runs/study/tiny/results.md")
