"""``python -m duallora`` (and so ``torchrun -m duallora``, ``accelerate launch -m duallora``)."""

import sys

from .cli import main

sys.exit(main())
