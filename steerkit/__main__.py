"""``python -m steerkit ...`` is the ``steerkit`` command."""

import sys

from .cli import main

sys.exit(main())
