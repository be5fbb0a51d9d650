"""``python -m scripts.bench``: see :mod:`scripts.bench.run`."""

from __future__ import annotations

import sys

from .run import main

sys.exit(main())
