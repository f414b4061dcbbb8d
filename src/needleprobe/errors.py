"""The one exception type users see.

Every problem a user can fix (bad config, bad dataset line, stale cache, busy
lock) is raised as :class:`NeedleprobeError`; the command-line layer prints it
as a single line and exits with status 2.  Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class NeedleprobeError(Exception):
    """A user-fixable problem, reported as one line (file, line and field where known)."""

    exit_code = 2
