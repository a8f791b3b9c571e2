"""The replication study (issue #16): arms (teacher, head-level layouts by several selections, random, layer-wise,
all-LA, ablations) trained by the same transfer recipe and evaluated on the same inputs, one result JSON per arm,
and a report with the verdicts on four claims computed from the numbers. CLI: ``python -m hydrahead_jax.study``;
docs/study.md."""
