import sys

from hydrahead_jax.eval.cli import main

sys.exit(main())
