"""Entry point: python -m experiments train|eval|generate|bench|list (see experiments/cli.py)."""

import sys

from experiments.cli import main

sys.exit(main())
