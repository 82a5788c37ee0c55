"""``python -m sslbench.sweep``: the same command as ``sslbench sweep``."""
import sys

from .cli import main

sys.exit(main())
