"""The driver's daemons, run from the image's own files: started once, watched through their pid files,
stopped on teardown. Which daemons a node needs is init's and fabric.py's to say."""

from __future__ import annotations

from .context import Context
from .decide import NodeError

MONITOR_PERIOD = 10.0  # seconds between checks that the daemons still run (the probe's period)
DAEMON_START_TRIES = 50  # a started daemon's pid file names it within 5 s (0.1 s apart)
# Daemons write their own pid files; teardown stops what these name, once the process they name is the
# image's binary in this container (a stale file may name any process: hostPID shows the host's).
DAEMONS = {
    "nvidia-persistenced": "/var/run/nvidia-persistenced/nvidia-persistenced.pid",
    "nv-fabricmanager": "/var/run/nvidia-fabricmanager/nv-fabricmanager.pid",
    "nvlsm": "/var/run/nvidia-fabricmanager/nvlsm.pid",
}
DAEMON_BINARY = {"nvidia-persistenced": "/usr/bin/nvidia-persistenced", "nv-fabricmanager": "/usr/bin/nv-fabricmanager",
                 "nvlsm": "/opt/nvidia/nvlsm/sbin/nvlsm"}


def daemon_log(name: str) -> str:
    return {"nvidia-persistenced": "syslog of the node", "nv-fabricmanager": "/var/log/fabricmanager.log",
            "nvlsm": "/var/log/nvlsm.log"}[name]


class Daemons:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.names: list[str] = []  # this run's daemons, in start order (stopped in reverse)

    def start(self, name: str, *args: str) -> None:
        """Start the image's /usr/bin/`name` unless it already runs, and wait until its pid file names it."""
        pid = self.running(name)
        if pid is not None:
            self.ctx.log.info("daemon already running", daemon=name, pid=pid)
        else:
            self.ctx.cmd(str(self.ctx.image.at(f"/usr/bin/{name}")), *args, what=f"start {name}")
            self.ctx.log.info("daemon started", daemon=name, pid=self.started(name))
        self.names.append(name)

    def started(self, name: str) -> int:
        """The pid of a daemon just started, or the one line saying it is not running: readiness waits on it.
        A daemon writes its pid file after it forks, maybe after the command that started it returned."""
        for _ in range(DAEMON_START_TRIES):
            if self.running(name, quiet=True) is not None:
                break
            self.ctx.sleep(0.1)
        pid = self.running(name)
        if pid is None:
            raise NodeError(f"{name} started but is not running (no live {name} of this image in {DAEMONS[name]})",
                            f"see its log ({daemon_log(name)})")
        return pid

    def down(self) -> list[str]:
        """This run's daemons that no longer run."""
        return [d for d in self.names if self.running(d) is None]

    def _pid(self, daemon: str) -> int | None:
        text = self.ctx.host.read_opt(DAEMONS[daemon])
        return int(text.strip()) if text and text.strip().isdigit() else None

    def running(self, name: str, quiet: bool = False) -> int | None:
        """The pid in `name`'s pid file when it is a live process of this image's binary in this container's
        mount namespace (where init starts its daemons); None otherwise, a stale file named in the log
        unless `quiet`."""
        host = self.ctx.host
        pid = self._pid(name)
        if pid is None or not host.alive(pid):
            return None
        exe = (host.readlink(f"/proc/{pid}/exe") or "").removesuffix(" (deleted)")
        ns = host.readlink(f"/proc/{pid}/ns/mnt")
        if exe == str(self.ctx.image.at(DAEMON_BINARY[name])) and ns is not None and ns == host.readlink("/proc/self/ns/mnt"):
            return pid
        if not quiet:
            self.ctx.log.warn("pid file names a process that is not this image's daemon, leaving it alone",
                              daemon=name, pid=pid, pid_file=DAEMONS[name], exe=exe or "unreadable")
        return None

    def stop(self) -> None:
        host = self.ctx.host
        for name in reversed(self.names):
            pid = self.running(name)
            if pid is None:
                continue
            host.kill(pid)
            for _ in range(50):
                if not host.alive(pid):
                    break
                self.ctx.sleep(0.1)
            self.ctx.log.info("daemon stopped", daemon=name, pid=pid, stopped=not host.alive(pid))
        self.names.clear()
