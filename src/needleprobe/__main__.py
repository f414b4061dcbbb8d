"""``python -m needleprobe`` (also what ``torchrun -m needleprobe`` runs)."""

from .cli import entry

entry()
