"""The build stage: NVIDIA kernel modules for a kernel, compiled, stripped, gated, cached, bundled.

Public API (the release stage calls these): `build_unit`, `build_all`, the driver sources
(`DebianSource`, `NvidiaRunSource`, `DirSource`) and kernel environments (`AptEnv`, `DirEnv`,
`KmodbuildEnv`), chosen by name from `modbuild.strategy`'s tables, and `check_bundle` for the ABI gate against another kernel.
"""

from gl_nvidia.modbuild.kenv import AptEnv, DirEnv, KernelEnv, KernelHeaders, KmodbuildEnv
from gl_nvidia.modbuild.sources import DebianSource, DirSource, DriverInputs, DriverSource
from gl_nvidia.modbuild.unit import Outcome, UnitResult, build_all, build_unit, bundle_name

__all__ = [
    "AptEnv", "DebianSource", "DirEnv", "DirSource", "DriverInputs", "DriverSource", "KernelEnv",
    "KernelHeaders", "KmodbuildEnv", "Outcome", "UnitResult", "build_all", "build_unit", "bundle_name",
]
