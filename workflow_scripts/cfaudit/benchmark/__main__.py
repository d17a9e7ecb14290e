"""``python -m cfaudit.benchmark``: the performance figures (see :mod:`cfaudit.benchmark`)."""

import sys

from cfaudit.benchmark.suite import main

sys.exit(main() and 0)
