"""``python -m jaxtrain.run`` is ``jaxtrain run``: train from a config (see :mod:`jaxtrain.app.cli`)."""

import sys

from jaxtrain.app.cli import run as main

if __name__ == "__main__":
    sys.exit(main())
