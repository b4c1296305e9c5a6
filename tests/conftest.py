"""Test setup: the tiny-model helpers in tests/ are importable as ``models``/``qdq_helpers``;
the files with the most slow tests start first.

The suite runs on every core (pytest-xdist, ``-n auto --dist loadfile`` in pyproject.toml):
a file runs whole on one worker, so its module-scoped fixtures (a ResNet-50 built once for
several tests) are built once. Workers take files in collection order, so the files that
take longest should come first: otherwise one worker starts a 5-minute file while the other
has nothing left. A file's count of ``slow`` tests is the cost estimate (real compilation,
CMake builds, tuning); ties keep pytest's order. ``-n 0`` runs serially, in the same order.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_collection_modifyitems(session, config, items):
    slow_per_file: dict[str, int] = {}
    for item in items:
        slow_per_file.setdefault(item.path, 0)
        slow_per_file[item.path] += item.get_closest_marker("slow") is not None
    first_seen = {path: index for index, path in enumerate(slow_per_file)}
    items.sort(key=lambda item: (-slow_per_file[item.path], first_seen[item.path]))
