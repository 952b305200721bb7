"""What every fault-table row checks about how a verb answers, shared by the tables
(tests/test_faults_*.py): it returns within a time limit instead of hanging, and
answers with an exit code rather than an exception."""

from __future__ import annotations

import threading
from typing import Callable

TIMEOUT_S = 120
"""A row that takes longer has hung (every row finishes in seconds)."""


def answer(call: Callable[[], int], what: str) -> int:
    """The exit code of ``call()``, run in a thread: a hang fails the row, not the suite."""
    result: dict = {}

    def target():
        try:
            result["code"] = call()
        except BaseException as error:  # noqa: BLE001 - reported below as the row's failure
            result["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive(), f"{what} hung for {TIMEOUT_S} s"
    if "error" in result:
        raise AssertionError(f"{what} raised instead of answering in one line: {result['error']!r}") from result["error"]
    return result["code"]
