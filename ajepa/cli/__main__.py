"""`python -m ajepa.cli ...`: the same as the `ajepa` command."""

import sys

from ajepa.cli import main

sys.exit(main())
