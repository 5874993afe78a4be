"""``python -m ecif.cli``: the same as the ``ecif`` command."""

import sys

from ecif.cli import main

sys.exit(main())
