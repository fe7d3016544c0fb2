"""``python -m reft_rs``: the ``reft-rs`` command."""

import sys

from .cli import main

sys.exit(main())
