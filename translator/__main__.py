"""``python -m translator`` is the ``serval-translator`` console script."""

from __future__ import annotations

import sys

from translator.cli import main

sys.exit(main())
