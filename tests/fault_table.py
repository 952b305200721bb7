"""What every fault-table row checks about how a verb answers, shared by the tables
(tests/test_faults_*.py): it returns within a time limit instead of hanging, answers
with an exit code rather than an exception, and prints no traceback."""

from __future__ import annotations

import re
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


def answered(output, code: int, expected_code: int, says: str, verb: str) -> list[str]:
    """What every row asserts of an answer (captured ``output``, exit ``code``): no traceback,
    the expected exit code, a line matching ``says``; returns the ``pixart-tune VERB: error:`` lines."""
    text = output.out + output.err
    assert "Traceback" not in text
    assert code == expected_code, text
    assert re.search(says, text, re.MULTILINE), text
    return [line for line in output.err.splitlines() if f"pixart-tune {verb}: error:" in line]
