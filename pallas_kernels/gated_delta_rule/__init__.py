"""Chunked gated delta rule in Pallas: forward and backward kernels under ``jax.custom_vjp``.

  reference.py          the pure-JAX recurrent op (the oracle every form and backend must match)
  reference_chunked.py  the pure-JAX chunked (WY) op with an analytic custom_vjp (XLA; the non-Pallas default)
  chunk_math.py         in-kernel math of one chunk, shared by the backends
  gpu_triton.py         Pallas Triton kernels (GPU; also Pallas interpret mode on CPU)
  tpu.py                Pallas Mosaic TPU kernels (checked in TPU interpret mode on CPU)
  ops.py                head-dim and T padding, gate/segment preparation, custom_vjp, backend choice
  bench.py              GPU timing helpers (used by benchmarks/bench_gdn.py)

The references use only JAX; importing this package (or a reference) loads no Pallas module. The public entry
point of the kernels is ``ops.gated_delta_rule_pallas``; the library's op registry registers both references and
the kernels under its implementation names ('recurrent', 'chunked', 'pallas').
"""
