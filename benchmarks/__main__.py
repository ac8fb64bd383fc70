"""`python -m benchmarks`: the whole suite, or a subcommand (see `benchmarks.cli`)."""

import sys

from benchmarks.cli import main

sys.exit(main(sys.argv[1:]))
