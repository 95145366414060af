"""CLI entry point (`python -m pipeline ...`), not built yet."""

import sys

if __name__ == "__main__":
    sys.exit("pipeline CLI: not implemented yet")
