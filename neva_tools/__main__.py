"""``python -m neva_tools`` runs the ``neva`` command.

Processes that ``multiprocessing`` spawns (our worker pools, megatron-core's checkpoint Manager) import their
parent's main module, except a package's ``__main__`` (Python skips those). This module therefore names
``neva_tools.cli.main`` as the main module's spec: a spawned worker imports it, as it does under the ``neva``
console script, and so gets the command's Ctrl-C handling (it exits quietly; its parent tells the user).
"""

import importlib.util
import sys

from neva_tools.cli.main import main

if __name__ == "__main__":
    sys.modules["__main__"].__spec__ = importlib.util.find_spec("neva_tools.cli.main")
    sys.exit(main())
