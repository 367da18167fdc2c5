"""``python -m jaxtrain.generate`` is ``jaxtrain generate``: sample a run's checkpoint (see :mod:`jaxtrain.app.generate`)."""

import sys

if __name__ == "__main__":
    from jaxtrain.app.generate import main

    sys.exit(main())
