"""``python -m neva_tools`` runs the ``neva`` command."""

import sys

from neva_tools.cli.main import main

sys.exit(main())
