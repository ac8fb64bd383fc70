"""`python -m corvex_cli` is the `corvex` command."""

import sys

from corvex_cli.main import main

sys.exit(main())
