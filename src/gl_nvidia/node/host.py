"""The one seam between the node runtime and the host: commands, host paths, signals.

Every host effect goes through `Host`: tests point `root` at a fake host tree (sysfs, procfs,
/run/nvidia, /drivers fixtures) and give it a `Runner` that records commands, so the decision logic
runs without root. Nothing else in `gl_nvidia.node` calls subprocess or touches host paths directly.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str = ""
    stderr: str = ""


Runner = Callable[[Sequence[str]], Result]


def subprocess_runner(argv: Sequence[str]) -> Result:
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, errors="replace", check=False)
    except FileNotFoundError:
        return Result(127, "", f"{argv[0]}: command not found")
    return Result(p.returncode, p.stdout, p.stderr)


class Host:
    """Host paths are absolute ("/sys/bus/pci/devices") and resolve under `root`; commands go to `runner`.

    Commands receive resolved paths (`host.path(...)`), so a test runner sees the fake tree's paths.
    """

    def __init__(self, root: Path = Path("/"), runner: Runner = subprocess_runner) -> None:
        self.root = root
        self.runner = runner
        self._locks: list[int] = []

    def path(self, p: str | os.PathLike[str]) -> Path:
        return self.root / str(p).lstrip("/")

    def machine(self) -> str:
        """The running kernel's machine (x86_64, aarch64): its own sysctl (Linux >= 6.1), which binfmt
        emulation of this container does not change; else uname's."""
        return (self.read_opt("/proc/sys/kernel/arch") or os.uname().machine).strip()

    def run(self, *argv: str) -> Result:
        return self.runner(argv)

    def exists(self, p: str) -> bool:
        return self.path(p).exists()

    def read(self, p: str) -> str:
        return self.path(p).read_text(errors="replace")

    def read_opt(self, p: str) -> str | None:
        try:
            return self.read(p)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def listdir(self, p: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(p)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def readlink(self, p: str) -> str | None:
        try:
            return os.readlink(self.path(p))
        except OSError:
            return None

    def write(self, p: str, text: str) -> None:
        """Plain write: sysfs attributes cannot be replaced by rename."""
        self.path(p).write_text(text)

    def write_atomic(self, p: str, text: str) -> None:
        """Write through a fresh temporary file (never through a link planted at its name), then rename."""
        target = self.path(p)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)

    def makedirs(self, p: str) -> None:
        self.path(p).mkdir(parents=True, exist_ok=True)

    def remove(self, p: str) -> bool:
        try:
            self.path(p).unlink()
            return True
        except FileNotFoundError:
            return False

    def lock(self, p: str) -> bool:
        """Take an exclusive lock on a host file for the life of this process; False when another holds it.

        The file is opened without following a symlink and must be a regular file: a link planted at its
        name (the directory is the host's /run/nvidia) would have this process truncate and write its target."""
        target = self.path(p)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise OSError(exc.errno, "a symlink, not the lock file: refusing to write through it", p) from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file: refusing to use it as the lock file", p)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._locks.append(fd)  # kept open: the lock lasts until the process exits
        return True

    def is_mountpoint(self, p: str) -> bool:
        return self.run("mountpoint", "-q", str(self.path(p))).rc == 0

    def kill(self, pid: int, sig: int = signal.SIGTERM) -> bool:
        try:
            os.kill(pid, sig)
            return True
        except ProcessLookupError:
            return False

    def alive(self, pid: int) -> bool:
        return self.kill(pid, 0)

