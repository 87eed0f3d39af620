"""``python -m server``: the same as ``fusion-server``."""

import sys

from server.cli import main

# The guard matters: vLLM starts engine processes with "spawn", which imports __main__.
if __name__ == "__main__":
    sys.exit(main())
