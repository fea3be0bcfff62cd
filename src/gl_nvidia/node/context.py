"""What every part of the node runtime acts through: the host, the image, the environment, the log, the clock.

The parts (link.py, modules.py, driverroot.py, daemons.py, fabric.py) each take one Context and read its
fields at call time, so a part can be built and tested on its own and a test may swap a field later.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .decide import NodeError
from .host import Host
from .imagefiles import Image
from .log import Log

HOST_NS = ("nsenter", "-t", "1", "-m", "--")  # hostPID: PID 1 is the host's init, its mount ns the host's


def wait_for_signal(timeout: float | None = None) -> bool:
    """Block until SIGTERM/SIGINT (True) or `timeout` seconds (False). main() keeps both blocked, so a
    signal that arrives during setup waits here instead of killing the process half-way."""
    signals = {signal.SIGTERM, signal.SIGINT}
    if timeout is None:
        signal.sigwait(signals)
        return True
    return signal.sigtimedwait(signals, timeout) is not None


@dataclass
class Context:
    host: Host
    image: Image
    env: dict[str, str]
    log: Log = field(default_factory=Log)
    wait: Callable[[float | None], bool] = wait_for_signal
    sleep: Callable[[float], None] = time.sleep

    def cmd(self, *argv: str, what: str) -> None:
        res = self.host.run(*argv)
        if res.rc != 0:
            raise NodeError(f"could not {what}: `{' '.join(argv)}` failed: {reason(res.stderr or res.stdout)}")

    def kernel_log_lines(self) -> list[str]:
        return self.host.run("dmesg").stdout.splitlines()

    def kernel_log(self, before: list[str] | None = None) -> str:
        lines = self.kernel_log_lines()
        new = lines[len(before):] if before is not None and lines[: len(before)] == before else lines[-5:]
        return " | ".join(line.strip() for line in new[-5:]) or "nothing new"


def reason(stderr: str) -> str:
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"
