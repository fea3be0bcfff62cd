"""The driver root: this container's root at /run/nvidia/driver on the host, where the GPU Operator's toolkit
and validator find the userspace, the device nodes and the loader cache."""

from __future__ import annotations

from .context import Context, reason

DRIVER_ROOT = "/run/nvidia/driver"


class DriverRoot:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.mounted = False  # this run mounted it: teardown after a failed init unmounts only then

    def expose(self) -> None:
        """The container's root at /run/nvidia/driver on the host, as NVIDIA's entrypoint mounts it: a
        recursive bind (no copy of the userspace), so the driver root's /dev is this container's, where the
        validator and the toolkit look for the device nodes once the driver root has a /dev. /sys first has
        its submounts made unbindable (the cgroup mounts are left out) and itself private (no mount event
        under it reaches the host through the shared /run/nvidia)."""
        ctx = self.ctx
        self._ensure_ld_cache()
        if ctx.host.is_mountpoint(DRIVER_ROOT):
            ctx.log.info("driver root still mounted from an earlier run, replacing it", path=DRIVER_ROOT)
            self.umount()
        sys_dir = str(ctx.image.at("/sys"))
        if ctx.host.run("mountpoint", "-q", sys_dir).rc == 0:
            ctx.cmd("mount", "--make-runbindable", sys_dir, what="keep the mounts under /sys out of the driver root")
            ctx.cmd("mount", "--make-private", sys_dir, what="make /sys private")
        ctx.host.makedirs(DRIVER_ROOT)
        ctx.cmd("mount", "--rbind", str(ctx.image.root), str(ctx.host.path(DRIVER_ROOT)), what="bind-mount the driver root")
        self.mounted = True
        ctx.log.info("driver root visible", path=DRIVER_ROOT, source=str(ctx.image.root))

    def _ensure_ld_cache(self) -> None:
        """The container toolkit finds the libraries through the driver root's etc/ld.so.cache."""
        cache = self.ctx.image.at("/etc/ld.so.cache")
        if cache.is_file() and b"libnvidia-ml.so.1" in cache.read_bytes():
            return
        self.ctx.log.info("etc/ld.so.cache does not list libnvidia-ml.so.1, running ldconfig")
        self.ctx.cmd("ldconfig", what="rebuild the driver root's loader cache")

    def umount_if_mounted(self) -> None:
        if self.mounted or self.ctx.host.is_mountpoint(DRIVER_ROOT):
            self.umount()

    def umount(self) -> None:
        host, log = self.ctx.host, self.ctx.log
        res = host.run("umount", "--lazy", "--recursive", str(host.path(DRIVER_ROOT)))
        if res.rc != 0:
            log.warn("could not unmount the driver root", path=DRIVER_ROOT, error=reason(res.stderr))
        else:
            log.info("driver root unmounted", path=DRIVER_ROOT)
        self.mounted = False
