"""`nvidia-driver`: the entrypoint the GPU Operator runs in the driver container (contract 1)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from .decide import NodeError
from .host import Host
from .imagefiles import Image
from .log import Log
from .runtime import Runtime

DESCRIPTION = """\
Load the NVIDIA driver this image carries into the node's kernel and expose it to the GPU Operator.

commands:
  init                   pick the module set for the running kernel and the GPUs, load it, make the
                         driver root visible at /run/nvidia/driver (a bind mount), start the daemons,
                         then wait; SIGTERM/SIGINT undoes it (modules stay loaded while in use)
  init --dry-run         print the detection (kernel, GPUs, module type and why, module sets) and stop
  init -a, --accept-license, -m N, --max-threads N
                         NVIDIA's entrypoint's init options, which the GPU Operator passes from driver.args:
                         accepted; nothing to apply (the image's licence is accepted when it is built, and
                         nothing compiles on the node)
  check-load             insert nvidia.ko into the running kernel and report: loaded / ABI OK, no GPU /
                         rejected by the kernel (with the kernel's reason)
  reload_nvidia_peermem  sidecar: load nvidia-peermem once MOFED and the driver are ready, then wait
  probe_nvidia_peermem   exit 0 unless MOFED is loaded and nvidia-peermem is not

environment: KERNEL_MODULE_TYPE (auto|open|proprietary), GPU_DIRECT_RDMA_ENABLED, GDS_ENABLED, DRIVER_CONFIG_DIGEST,
  USE_HOST_MOFED, NODE_NAME, NVFM_CONFIG_<KEY> (fabric manager's fabricmanager.cfg KEY); module parameters
  from /drivers/<module>.conf
"""
# What each verb accepts, for the one line that refuses anything else.
SUPPORTED = ("commands: init [--dry-run] [-a|--accept-license] [-m|--max-threads N], check-load, "
             "reload_nvidia_peermem, probe_nvidia_peermem")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """A bad argument is one line naming what is supported, exit 2: the operator passes driver.args
    through, and a usage screen per restart of a crash-looping pod says less."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _threads(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive number of threads: {text[:20]!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nvidia-driver", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    init = sub.add_parser("init", help="load the driver and wait")
    init.add_argument("--dry-run", action="store_true", help="print the detection and what init would do")
    init.add_argument("-a", "--accept-license", action="store_true", help="NVIDIA's option: accepted, nothing to do")
    init.add_argument("-m", "--max-threads", type=_threads, metavar="N",
                      help="NVIDIA's option (compile threads): accepted, nothing compiles on the node")
    sub.add_parser("check-load", help="insert nvidia.ko and classify the kernel's answer")
    sub.add_parser("reload_nvidia_peermem", help="load nvidia-peermem when MOFED is ready, then wait")
    sub.add_parser("probe_nvidia_peermem", help="startup/liveness probe for nvidia-peermem")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except UsageError as exc:
        print(f"nvidia-driver: error: {exc}; {SUPPORTED}", file=sys.stderr)
        return 2
    log = Log()
    # Signals stay pending until init waits for them, so a SIGTERM mid-setup tears down a consistent state.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    if args.command == "init" and (args.accept_license or args.max_threads):
        log.info("NVIDIA's init options accepted, nothing to apply", accept_license=args.accept_license,
                 max_threads=args.max_threads or "unset", reason="the image is prebuilt")
    try:
        rt = Runtime(Host(), Image.load(Path("/")), dict(os.environ), log)
        if args.command == "init":
            if args.dry_run:
                return 0 if rt.dry_run() else 1
            rt.init()
        elif args.command == "check-load":
            return 0 if rt.check_load() else 1
        elif args.command == "reload_nvidia_peermem":
            rt.reload_peermem()
        elif args.command == "probe_nvidia_peermem":
            return 0 if rt.probe_peermem() else 1
    except NodeError as exc:
        return _fail(log, exc.message, exc.hint)
    except OSError as exc:  # the host refused a file operation: say which, without a traceback
        return _fail(log, f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), None)
    return 0


def _fail(log: Log, message: str, hint: str | None) -> int:
    log.error(message, **({"hint": hint} if hint else {}))
    print(f"nvidia-driver: error: {message}", file=sys.stderr)
    if hint:
        print(f"nvidia-driver: hint: {hint}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
