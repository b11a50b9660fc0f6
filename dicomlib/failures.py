"""What fails one item, and what fails the whole run.

Every per-item step (parse, store, convert, read a row) turns whatever it raises into that item's
dead letter with `item_failure`, so one hostile file can never stop a run or vanish: a file that
crashes a parser or a native codec in an unforeseen way still ends counted, with the exception's
type and message as its detail. Only two kinds of error pass through: `RunFailed` (the store or a
destination is unusable for every item alike: exit 1) and interrupts (Ctrl-C, exit).
"""

from __future__ import annotations

import logging

from dicomlib import NAMESPACE

LOGGER = logging.getLogger(NAMESPACE)
INTERRUPTS = (KeyboardInterrupt, SystemExit, GeneratorExit)
MAX_DETAIL = 500


class ItemFailed(Exception):
    """One item cannot be processed; `reason` is its dead letter's reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # it crosses process boundaries
        return ItemFailed, (self.reason, self.detail)


class RunFailed(RuntimeError):
    """The run as a whole cannot go on (a store unreachable, a destination refused): exit 1.

    Raised rather than dead-lettered: every other item would fail the same way. The message names
    the store or destination, never a secret.
    """


def describe(error: BaseException) -> str:
    """An exception as one line: its type and message, whitespace collapsed, bounded in length."""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}"[:MAX_DETAIL] if message else type(error).__name__


def item_failure(error: BaseException, reason: str) -> ItemFailed:
    """`error`, raised while processing one item, as that item's failure.

    An ItemFailed keeps its own reason; anything else gets `reason` (what the step was doing, e.g.
    read_error or cannot_convert), BaseExceptions included: native codecs raise some (pyo3's
    PanicException). Run failures and interrupts are re-raised, as they are not one item's.
    """
    if isinstance(error, (*INTERRUPTS, RunFailed)):
        raise error
    if isinstance(error, ItemFailed):
        return error
    LOGGER.debug("item failed with %s", type(error).__name__, exc_info=error)
    return ItemFailed(reason, describe(error))


class SourceReadError(OSError):
    """Reading a source file or object failed (not its content): the item's read_error, never a
    verdict on the file, even when the failure surfaces inside a parser."""
