"""Test setup: the tiny-model helpers in tests/ are importable as ``models``/``qdq_helpers``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
