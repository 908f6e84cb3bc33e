"""``python -m savedir``: the command-line interface."""

import sys

from savedir.cli import main

sys.exit(main())
