"""Put the repository root first on sys.path (a script's own folder, launch/, is first by
default, so `import train` would import launch/train.py)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if sys.path[0] != str(ROOT):
    sys.path.insert(0, str(ROOT))
