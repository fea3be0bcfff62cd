"""Module signing for the kernel's module signature check: the kernel's own sign-file and kmod's modinfo
check our signatures independently of our code; the real bundle is signed from the build cache."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gl_nvidia import bundle as b
from gl_nvidia.cli import main
from gl_nvidia.modbuild import KernelHeaders
from gl_nvidia.modbuild.modsign import bundle_signatures, load_signer, read_signature

from .fixtures.bundle import (
    DEBIAN_KERNEL,
    HIGH_BIT_SERIAL,
    MODULE_SIGNER,
    ModuleKey,
    TinyModules,
    make_module_key,
)

PROPRIETARY = ("proprietary",)


def modinfo(ko: Path, field: str) -> str:
    """kmod's own reading of a module (the tool an operator runs)."""
    return subprocess.run(["modinfo", "-F", field, str(ko)], check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.parametrize("serial", [HIGH_BIT_SERIAL, 0x1B7F972E84E8AB5E50995BB29F61ADAE9BDD00])
def test_the_signature_is_byte_for_byte_the_kernels_sign_file(tiny_module: TinyModules, debian_headers: KernelHeaders,
                                                              serial: int, tmp_path: Path) -> None:
    module_key = make_module_key(tmp_path, serial)
    signer = load_signer(module_key.key, module_key.cert)
    theirs = tmp_path / "theirs.ko"
    shutil.copyfile(tiny_module.hello, theirs)
    sign_file = debian_headers.sysout / "scripts" / "sign-file"  # the kernel's, from its kbuild package
    subprocess.run([sign_file, "sha256", module_key.key, module_key.cert, theirs], check=True)
    ours = tiny_module.hello.read_bytes() + signer.sign(tiny_module.hello)
    assert ours == theirs.read_bytes()  # RSA PKCS#1 v1.5 signatures are deterministic
    info = read_signature(ours)
    assert info is not None
    assert (info.signer, info.hash_algo, info.key_id) == (
        modinfo(theirs, "signer"), modinfo(theirs, "sig_hashalgo"), modinfo(theirs, "sig_key"))
    assert (info.signer, info.hash_algo) == (MODULE_SIGNER, "sha256")
    assert read_signature(tiny_module.hello.read_bytes()) is None


@pytest.mark.slow
def test_build_signs_every_module_from_the_cache(debian_bundle: Path, signed_debian_bundle: Path,
                                                 module_key: ModuleKey) -> None:
    plain = b.BundleManifest.load(debian_bundle).kernels[DEBIAN_KERNEL].module_sets["proprietary"]
    signed = b.BundleManifest.load(signed_debian_bundle).kernels[DEBIAN_KERNEL].module_sets["proprietary"]
    assert [(m.name, m.sha256, m.signature) for m in plain.modules] == [(m.name, m.sha256, None) for m in signed.modules]
    kos = b.modules_dir(signed_debian_bundle, DEBIAN_KERNEL, "proprietary")
    ifaces = b.interfaces_dir(signed_debian_bundle, DEBIAN_KERNEL, "proprietary")
    assert {m.parts is None for m in signed.modules} == {True, False}  # whole and split modules alike
    for m in signed.modules:
        sig = m.signature
        assert sig is not None
        assert (sig.signer, sig.hash_algo, sig.cert_sha256) == (MODULE_SIGNER, "sha256", module_key.fingerprint)
        ko = kos / m.name
        gated = (b.modules_dir(debian_bundle, DEBIAN_KERNEL, "proprietary") / m.name).read_bytes()
        data = ko.read_bytes()
        assert data[:len(gated)] == gated and hashlib.sha256(data).hexdigest() == sig.signed_sha256
        assert (modinfo(ko, "signer"), modinfo(ko, "sig_hashalgo"), modinfo(ko, "sig_key")) == (
            MODULE_SIGNER, "sha256", sig.key_id)
        if m.parts is not None:  # what the node appends to the module it links
            assert (ifaces / sig.file).read_bytes() == data[len(gated):]
            assert hashlib.sha256(data[len(gated):]).hexdigest() == sig.sha256
    for path in signed_debian_bundle.rglob("*"):  # the key itself is nowhere in the bundle
        if path.is_file() and path.stat().st_size < 1 << 20:
            assert not [line for line in module_key.body if line.encode() in path.read_bytes()], path


@pytest.mark.slow
def test_check_modules_names_signer_and_hash(debian_bundle: Path, signed_debian_bundle: Path,
                                             debian_headers: KernelHeaders, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-modules", str(signed_debian_bundle), "--kernel-headers", str(debian_headers.sysout)]) == 0
    out = capsys.readouterr().out
    names = [m.name for m in b.BundleManifest.load(signed_debian_bundle).kernels[DEBIAN_KERNEL]
             .module_sets["proprietary"].modules]
    for name in names:
        assert re.search(rf"{DEBIAN_KERNEL} proprietary: {re.escape(name)}: signed by '{MODULE_SIGNER}' \(sha256, "
                         r"key [0-9A-F:]+\)", out), out
    assert bundle_signatures(debian_bundle) == {(DEBIAN_KERNEL, "proprietary"): dict.fromkeys(names)}  # unsigned


@pytest.mark.parametrize(("case", "why"), [
    ("missing-key", r"cannot read module signing key .*nope\.key: No such file or directory"),
    ("key-only", r"--sign-key and --sign-cert go together"),
    ("other-cert", r"module signing certificate .*other\.der is not the certificate of the key .*signing\.key"),
    ("encrypted", r"module signing key .*encrypted\.key is encrypted"),
    ("not-a-cert", r"module signing certificate .*signing\.key is not a PEM or DER X\.509 certificate"),
])
def test_a_missing_or_unusable_key_is_one_error_line_before_any_build(
        case: str, why: str, module_key: ModuleKey, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key, cert = module_key.key, module_key.cert
    args: list[str] = []
    if case == "missing-key":
        key = tmp_path / "nope.key"
    elif case == "other-cert":
        cert = tmp_path / "other.der"
        subprocess.run(["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=other",
                        "-keyout", tmp_path / "other.key", "-outform", "DER", "-out", cert], check=True,
                       capture_output=True)
    elif case == "encrypted":
        key = tmp_path / "encrypted.key"
        subprocess.run(["openssl", "pkcs8", "-topk8", "-in", module_key.key, "-passout", "pass:secret", "-out", key],
                       check=True)
    elif case == "not-a-cert":
        cert = module_key.key
    args = ["--sign-key", str(key)] + ([] if case == "key-only" else ["--sign-cert", str(cert)])
    out = tmp_path / "out"
    # An unknown kernel: any build step that ran would fail differently.
    assert main(["build", "--kernel", "6.1.0-999-cloud-amd64", "--driver", "535.309.01", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("gl-nvidia: error: ") and lines[1].startswith("gl-nvidia: hint:")
    assert re.search(why, lines[0]), lines[0]
    assert not [line for line in module_key.body if line in err]
    assert not out.exists()
