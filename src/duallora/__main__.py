"""``python -m duallora`` (and so ``torchrun -m duallora``, ``accelerate launch -m duallora``)."""

import sys

from .app.cli import main

sys.exit(main())
