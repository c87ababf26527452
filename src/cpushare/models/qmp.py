"""A small QMP client: qemu's control protocol over its unix socket
(JSON objects, one a line; events between answers are skipped)."""

from __future__ import annotations

import json
import socket
import threading

_MiB = 1 << 20


class QmpError(RuntimeError):
    """A QMP command failed, or qemu stopped answering on its QMP socket."""


class Qmp:
    """QMP over the run's unix socket: JSON objects one a line; events,
    which come between answers, are skipped."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lines = sock.makefile("rb")
        self.lock = threading.Lock()
        self.ids = 0

    def _next(self) -> dict:
        line = self.lines.readline(_MiB)
        if not line:
            raise QmpError("qemu closed its QMP socket")
        try:
            return json.loads(line)
        except ValueError:
            raise QmpError(f"qemu sent a QMP line that is not JSON: {line[:200]!r}") from None

    def handshake(self) -> None:
        greeting = self._next()
        if "QMP" not in greeting:
            raise QmpError(f"no QMP greeting: {greeting!r}")
        self.execute("qmp_capabilities")

    def execute(self, name: str, **arguments) -> object:
        """Run one command; its "return", or QmpError with qemu's "error"."""
        with self.lock:
            self.ids += 1
            request = {"execute": name, "id": self.ids}
            if arguments:
                request["arguments"] = arguments
            try:
                self.sock.sendall(json.dumps(request).encode() + b"\n")
                while True:
                    answer = self._next()
                    if answer.get("id") != self.ids:
                        continue  # an event, or an answer to a command given up on
                    if "error" in answer:
                        err = answer["error"]
                        raise QmpError(f"QMP {name}: {err.get('class')}: {err.get('desc')}")
                    return answer.get("return")
            except OSError as e:
                raise QmpError(f"QMP {name}: {e}") from None

    def close(self) -> None:
        self.lines.close()
        self.sock.close()
