"""`python -m reldl`: the same as the `reldl` command."""

import sys

from reldl.cli import main

sys.exit(main())
