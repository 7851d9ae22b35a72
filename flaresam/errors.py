"""Errors that the CLI turns into one clear line and an exit code.

Library code raises these instead of printing; ``flaresam.cli`` catches them.
Exit codes follow the project convention: 2 for usage errors, 1 for data and
runtime errors.
"""

from __future__ import annotations


class FlaresamError(Exception):
    """Base class: a message meant for the user, and the process exit code."""

    exit_code: int = 1


class DataError(FlaresamError):
    """The input data is missing, unreadable or inconsistent."""

    exit_code = 1


class UsageError(FlaresamError):
    """The command was called with arguments that cannot work together."""

    exit_code = 2


class NotImplementedYet(UsageError):
    """A subcommand whose issue is still open."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is not implemented yet")


class ArgumentError(UsageError, ValueError, TypeError):
    """A Python API call's argument that cannot work: names the argument, what it got and what it takes.

    A :class:`UsageError` (the command line's exit 2), and a ``ValueError`` and a
    ``TypeError``, so that a caller's ``except ValueError`` or ``except TypeError``
    around a call still catches it.
    """
