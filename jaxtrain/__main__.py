"""``python -m jaxtrain`` is the ``jaxtrain`` command (``run`` / ``generate``)."""

import sys

from jaxtrain.app.cli import main

sys.exit(main())
