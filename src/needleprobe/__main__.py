"""``python -m needleprobe`` (also what ``torchrun -m needleprobe`` runs)."""

import sys

from .cli import main

sys.exit(main())
