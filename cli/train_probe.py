#!/usr/bin/env python
"""A script entry point: ``python cli/train_probe.py --config ... [--doc-batch-size N]``.

Same as ``needleprobe train``: extract (or reuse the cache), then fit.
"""

import sys
from pathlib import Path

try:
    from needleprobe.cli import main
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from needleprobe.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
