"""``python -m rlm.testing``: the fake model server's command line (see ``rlm.testing.cli``)."""

import sys

from rlm.testing.cli import main

sys.exit(main())
