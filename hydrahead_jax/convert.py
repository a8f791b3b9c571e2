"""Checkpoint conversion CLI.

  python -m hydrahead_jax.convert SRC DST [--to orbax|hf|safetensors] [--dtype float32] [--layout layout.json]

SRC: a HF checkpoint directory (qwen3/llama), a .gguf file, an Orbax checkpoint (``save_pretrained``), a
HydraHead safetensors directory, or ``smollm2`` (the packaged SmolLM2-135M-Instruct teacher).
--to orbax (default): HF/GGUF -> Orbax; --to hf: an all-FA model -> transformers checkpoint;
--to safetensors: any model -> the portable HydraHead safetensors format (docs/checkpoint_format.md).
--layout: a HeadLayout JSON ({"fa_groups": [[...], ...]}): convert the teacher into that hybrid on import.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from tqdm import tqdm


def _load(src: str, args, bar: tqdm):
  from hydrahead_jax import checkpoint_io
  from hydrahead_jax.config import HeadLayout

  layout = None
  if args.layout:
    with open(args.layout) as f:
      layout = HeadLayout.from_json(f.read())
  if src == "smollm2":
    from hydrahead_jax.teacher import smollm2_gguf_path

    src = smollm2_gguf_path()
  fmt = checkpoint_io.detect_format(src)
  if fmt in ("orbax", "hydrahead-safetensors"):
    if layout is not None:
      raise ValueError(f"--layout converts a teacher on import; {src} is already a HydraHead checkpoint")
    bar.set_description(f"restoring {fmt}")
    return checkpoint_io.load_pretrained(src, dtype=args.dtype)
  if fmt == "hf":
    from hydrahead_jax.hf import SafetensorsCheckpoint, config_from_hf, read_hf_config

    cfg = config_from_hf(read_hf_config(src), dtype=args.dtype)
    ckpt = SafetensorsCheckpoint(src)
  else:
    from hydrahead_jax.gguf_io import GGUFCheckpoint

    if os.path.isdir(src):
      src = os.path.join(src, next(f for f in os.listdir(src) if f.endswith(".gguf")))
    bar.set_description("reading GGUF metadata")
    ckpt = GGUFCheckpoint(src)
    cfg = ckpt.config(dtype=args.dtype)
  from hydrahead_jax.hf import check_extra_tensors, hf_name_map, model_from_hf_tensors

  names = ckpt.hf_names() if fmt == "gguf" else ckpt.keys()
  check_extra_tensors(cfg, names, source=src)
  bar.reset(total=len(hf_name_map(cfg)))
  bar.set_description(f"loading {fmt} tensors")

  def get(name):
    bar.update(1)
    return ckpt.get(name)

  return model_from_hf_tensors(cfg, get, layout=layout, source=src)


def _save(model, dst: str, args, bar: tqdm) -> None:
  from hydrahead_jax import checkpoint_io
  from hydrahead_jax.hf import save_hf

  from hydrahead_jax.params import flat_names

  from hydrahead_jax.hf import hf_name_map

  total = {"orbax": 1, "hf": len(hf_name_map(model.cfg))}.get(args.to) or len(flat_names(model.cfg))
  bar.reset(total=total)
  bar.set_description(f"writing {args.to}")
  tick = lambda n: bar.update(n)
  if args.to == "orbax":
    checkpoint_io.save_pretrained(model, dst, overwrite=args.overwrite)
    bar.update(1)
  elif args.to == "hf":
    if os.path.exists(dst) and os.listdir(dst) and not args.overwrite:
      raise FileExistsError(f"{dst} exists and is not empty (pass --overwrite)")
    save_hf(model, dst, dtype=args.out_dtype, progress=tick)
  else:
    checkpoint_io.save_hybrid_safetensors(model, dst, dtype=args.out_dtype, overwrite=args.overwrite, progress=tick)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m hydrahead_jax.convert", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("src")
  p.add_argument("dst")
  p.add_argument("--to", choices=("orbax", "hf", "safetensors"), default="orbax")
  p.add_argument("--dtype", default="float32", help="parameter dtype while loading (default float32)")
  p.add_argument("--out-dtype", default=None, help="dtype of written safetensors (default: parameter dtype)")
  p.add_argument("--layout", default=None, help="HeadLayout JSON file: convert the teacher to this hybrid")
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)
  t0 = time.time()
  with tqdm(total=1, unit="tensor", file=sys.stderr) as bar:
    try:
      cfg, model = _load(args.src, args, bar)
      _save(model, args.dst, args, bar)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
      bar.close()
      print(f"error: {e}", file=sys.stderr)
      return 2
  print(f"{args.src} -> {args.dst} ({args.to}): {cfg.layout.describe(cfg.num_kv_heads)}, "
        f"{model.num_params():,} params, {time.time() - t0:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
