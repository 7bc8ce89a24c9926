"""``python -m tokensieve.eval.refbench --out DIR``: write the benchmark shards."""

import sys

from tokensieve.eval.refbench.generator import main

sys.exit(main())
