"""``python -m server``: the same as ``fusion-server``."""

import sys

from server.cli import main

sys.exit(main())
