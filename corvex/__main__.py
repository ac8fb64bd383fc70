"""`python -m corvex` is the `corvex` command."""

import sys

from corvex.cli import main

sys.exit(main())
