"""``python -m chatledger``: the same as the ``chatledger`` console script."""

import sys

from chatledger.server.cli import main

if __name__ == "__main__":
    sys.exit(main())
