"""``python -m quotopia``: the same as the ``quotopia`` console script."""

from __future__ import annotations

from quotopia.cli import main

if __name__ == "__main__":
    main()
