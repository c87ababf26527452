"""What a cluster's agent says: lines and errors for the buyer, and, when
detached, the reports the `cpushare cluster up` that started it relays
until every node runs."""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import suppress

log = logging.getLogger("cpushare.cluster")


class Report:
    """In the foreground: lines on stdout, errors on stderr."""

    waiting = False  # a detached `up` waits for every node to run

    def line(self, text: str) -> None:
        with suppress(OSError):  # (a closed stdout does not stop the agent)
            print(text, flush=True)

    def error(self, text: str) -> None:
        with suppress(OSError):
            print(f"cpushare cluster: {text}", file=sys.stderr, flush=True)

    def ready(self, text: str) -> None:
        self.line(text)

    def done(self, status: int) -> None:
        pass


class PipeReport(Report):
    """Detached: to the `up` that started it, on a pipe (JSON lines), until
    every node runs; always to the log (stderr, agent.log)."""

    def __init__(self, fd: int):
        self._f = os.fdopen(fd, "w")

    @property
    def waiting(self) -> bool:
        return self._f is not None

    def _send(self, **msg) -> None:
        if self._f is None:
            return
        try:
            self._f.write(json.dumps(msg) + "\n")
            self._f.flush()
        except OSError:  # (the `up` that waited is gone)
            self._close()

    def _close(self) -> None:
        if self._f is not None:
            with suppress(OSError):
                self._f.close()
            self._f = None

    def line(self, text: str) -> None:
        log.info("%s", text)
        self._send(line=text)

    def error(self, text: str) -> None:
        log.error("%s", text)
        self._send(error=text)

    def ready(self, text: str) -> None:
        log.info("%s", text)
        self._send(ready=text)
        self._close()

    def done(self, status: int) -> None:
        self._send(exit=status)
        self._close()
