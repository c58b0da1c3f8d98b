"""``python -m excitation`` (and ``torchrun -m excitation extract ...``): the ``excitation`` command."""

import sys

from .cli import main

sys.exit(main())
