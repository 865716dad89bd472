"""``python -m training``: the command line of Realm of Training (see training/cli.py)."""

import os
import sys

from training.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], os.environ))
