"""``python -m jaxtrain`` is ``python -m jaxtrain.run``."""

import sys

from jaxtrain.run import main

sys.exit(main())
