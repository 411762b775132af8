"""Prefect's run logs for expected outcomes: a failed gate or bad input is logged once, without a traceback.

Installed by every flow when it starts (`quiet_expected_failures`), so it holds however the run was started:
`kdflow run` and the stage commands, `kdflow serve`, a deployment on a process worker, "Run" in the UI
(each runs the flow in a process that imports this module).
"""

from __future__ import annotations

import logging
import re

from kdflow.errors import KdflowError

_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class ExpectedFailureFilter(logging.Filter):
    """Prefect logs an exception leaving a task four times (task failed, task state, flow failed, flow state),
    each with its repr and the first two with a traceback. A KdflowError is an expected outcome (a failed
    gate, bad input) whose message says it all: it is logged once, as its message without a traceback; the
    flow's repeat is dropped and the "Finished in state Failed(...)" lines only name the error."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, str] = {}  # first line of each logged message -> its exception type

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, KdflowError):
            record.exc_info, record.exc_text = None, None
            key = str(exc).split("\n", 1)[0]
            if any(key in seen for seen in self.seen):
                return False
            self.seen[key] = type(exc).__name__
            record.msg, record.args = "%s: %s", (type(exc).__name__, exc)
            return True
        message = record.getMessage()
        if message.startswith("Finished in state "):
            for key, name in self.seen.items():
                if key in message:
                    record.msg, record.args = "%s (%s, logged above)", (message.split("(", 1)[0], name)
                    return True
            # A task whose exception was not logged before its state (a task with retries, whose retry
            # condition declined): its state line is the first mention, so it says the message.
            found = _TASK_EXCEPTION.search(message)
            if found and found["name"] in _kdflow_error_names():
                text = found["text"]
                self.seen[text.split("\n", 1)[0]] = found["name"]
                record.msg, record.args = "%s: %s", (found["name"], text)
        return True


_TASK_EXCEPTION = re.compile(r"encountered an exception (?P<name>\w+): (?P<text>.*)(?:'|\")\)$", re.DOTALL)


def _kdflow_error_names() -> set[str]:
    names, todo = set(), [KdflowError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


_FILTER = ExpectedFailureFilter()


def quiet_expected_failures() -> None:
    """Install the filter on Prefect's flow and task run loggers (once per process) and forget the messages
    of earlier runs in this process (a served process runs many)."""
    _FILTER.seen.clear()
    for name in _RUN_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
