"""``python -m sage_zmq``: the ``sage-zmq`` command."""

import sys

from sage_zmq.cli import main

if __name__ == "__main__":
    sys.exit(main())
