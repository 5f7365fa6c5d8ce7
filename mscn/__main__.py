"""``python -m mscn`` is the ``mscn`` command."""
import sys

from mscn.cli import main

sys.exit(main())
