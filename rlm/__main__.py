"""``python -m rlm``: the same command as the ``rlm`` console script."""

import sys

from rlm.cli import main

if __name__ == "__main__":
    sys.exit(main())
