"""``python -m batchfit``: the command-line interface."""

from __future__ import annotations

if __name__ == "__main__":
    from batchfit.cli import main

    raise SystemExit(main())
