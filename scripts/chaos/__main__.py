"""``python -m scripts.chaos``: the chaos run's command line (:func:`scripts.chaos.run.main`)."""

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
