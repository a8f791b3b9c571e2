"""Checkpoint format conversion CLI (formats only: to make a student from a teacher, use
``python -m hydrahead_jax.select convert``, which calibrates the fusion scales).

  python -m hydrahead_jax.convert SRC DST [--to orbax|hf|safetensors] [--dtype float32]

SRC: anything ``hydrahead_jax.interop.load`` reads: a HF checkpoint directory (qwen3/llama), a .gguf file, an
Orbax checkpoint (``save_pretrained``), a HydraHead safetensors directory, or ``smollm2`` (the packaged
SmolLM2-135M-Instruct teacher).
--to orbax (default): -> Orbax; --to hf: an all-FA model -> transformers checkpoint;
--to safetensors: any model -> the portable HydraHead safetensors format (docs/checkpoint_format.md).

User errors (a missing, truncated or damaged SRC, a DST that exists, a hybrid model to --to hf, bad arguments) end
with one line ``error: ...`` on stderr and exit code 2; ``--debug`` shows the traceback (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from tqdm import tqdm

from hydrahead_jax.cli import ArgumentParser, UserError, cli_main


def _check_args(args) -> None:
  """What can be checked before the (long) load: dtypes, and that DST can be written."""
  from hydrahead_jax.interop.safetensors import to_np_dtype

  for flag in ("dtype", "out_dtype"):
    if getattr(args, flag) is not None:
      try:
        to_np_dtype(getattr(args, flag))
      except ValueError:
        raise UserError(f"--{flag.replace('_', '-')}: not a dtype: {getattr(args, flag)!r}") from None
  if os.path.exists(args.dst) and not os.path.isdir(args.dst):
    raise UserError(f"{args.dst}: exists and is not a directory; choose another DST")
  if os.path.isdir(args.dst) and os.listdir(args.dst) and not args.overwrite:
    raise UserError(f"{args.dst}: exists and is not empty (pass --overwrite to replace it)")


def _save(model, dst: str, args) -> None:
  from hydrahead_jax.interop.hf import hf_name_map, save_hf
  from hydrahead_jax.interop.names import flat_names
  from hydrahead_jax.interop.orbax import save_pretrained
  from hydrahead_jax.interop.safetensors import save_hybrid_safetensors

  total = {"orbax": 1, "hf": len(hf_name_map(model.cfg))}.get(args.to) or len(flat_names(model.cfg))
  with tqdm(total=total, unit="tensor", file=sys.stderr, desc=f"writing {args.to}") as bar:
    try:
      if args.to == "orbax":
        save_pretrained(model, dst, overwrite=args.overwrite)
        bar.update(1)
      elif args.to == "hf":
        save_hf(model, dst, dtype=args.out_dtype, progress=bar.update)
      else:
        save_hybrid_safetensors(model, dst, dtype=args.out_dtype, overwrite=args.overwrite, progress=bar.update)
    except BaseException:
      bar.leave = False  # erased: an error is one line
      raise


@cli_main
def main(argv: list[str] | None = None) -> int:
  p = ArgumentParser(prog="python -m hydrahead_jax.convert", description=__doc__.split("\n\n")[0],
              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("src")
  p.add_argument("dst")
  p.add_argument("--to", choices=("orbax", "hf", "safetensors"), default="orbax")
  p.add_argument("--dtype", default="float32", help="parameter dtype while loading (default float32)")
  p.add_argument("--out-dtype", default=None, help="dtype of written safetensors (default: parameter dtype)")
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)
  _check_args(args)
  t0 = time.time()
  from hydrahead_jax.interop.load import load

  cfg, model, _ = load(args.src, dtype=args.dtype, tokenizer=False, progress=True)  # its user errors: UserError
  _save(model, args.dst, args)
  print(f"{args.src} -> {args.dst} ({args.to}): {cfg.layout.describe(cfg.num_kv_heads)}, "
        f"{model.num_params():,} params, {time.time() - t0:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
