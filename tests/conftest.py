"""Test setup: the tiny-model helpers in tests/ are importable as ``models``/``qdq_helpers``.

The suite runs on every core (pytest-xdist, ``-n auto --dist loadfile`` in pyproject.toml):
a file runs whole on one worker, so its module-scoped fixtures (a ResNet-50 built once for
several tests) are built once. xdist hands out files with the most tests first; ordering
them by measured time instead would save ~20 s of 17 minutes (simulated from a serial run's
per-file times), so it is left at that. ``-n 0`` runs serially (for ``pdb`` or ``-s``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
