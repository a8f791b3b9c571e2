"""Pallas kernels of HydraHead-JAX, one package per op (reference + one module per backend + glue + bench).

A standalone package: it depends on JAX only and imports nothing from the model library (the library imports the
kernels, never the reverse). Importing it loads no kernels; each op package is imported on its own.
"""
