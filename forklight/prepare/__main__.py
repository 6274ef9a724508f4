"""``python -m forklight.prepare ...``: the same as ``forklight prepare ...``."""

import sys

from forklight.cli import main

if __name__ == "__main__":
    main(["prepare", *sys.argv[1:]], exit_on_error=True)
