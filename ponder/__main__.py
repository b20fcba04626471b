"""``python -m ponder ...`` (and ``torchrun -m ponder train ...``): the same entry as the console script."""

import sys

from ponder.cli import main

sys.exit(main())
