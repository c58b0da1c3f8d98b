"""``python -m excitation`` (and ``torchrun -m excitation extract ...``): the ``excitation`` command."""

import gc
import sys

from .cli import main

code = main()
# Interpreter shutdown would walk every object torch created in a last garbage collection
# (about a second, per process and so per torchrun rank); freezing them skips that walk.
# Nothing is lost: the command is done, and atexit handlers and file closing still run.
gc.freeze()
sys.exit(code)
