"""`python -m ddpm_hub`: the command line (see ddpm_hub.cli)."""

import sys

from .cli import main

sys.exit(main())
