"""Errors that end a run on purpose, each with one line that says where and why.

User errors (a bad config value, a missing path) are `ValueError` /
`FileNotFoundError` and exit with code 2 before anything runs. A `RunAborted`
comes later, from a fault the run met and could not get past (gradients that
stay non-finite, a checkpoint that cannot be written, a rollout server that
never comes back): the command prints its message on one line and exits 1,
after saving what it could. The message names what was kept.
"""

from __future__ import annotations


class RunAborted(RuntimeError):
    """The run stopped on a fault; its message is one line: what happened, what was saved, what to do."""
