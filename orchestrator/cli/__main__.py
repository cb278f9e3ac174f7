"""`python -m orchestrator.cli`: the `tickweave` command."""

import sys

from orchestrator.cli import main

sys.exit(main())
