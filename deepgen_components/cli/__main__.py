"""``python -m deepgen_components.cli`` is the ``deepgen`` command (torchrun needs the module form)."""

import sys

from deepgen_components.cli import main

sys.exit(main())
