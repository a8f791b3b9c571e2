import sys

from hydrahead_jax.study.cli import main

sys.exit(main())
