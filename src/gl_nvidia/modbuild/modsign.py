"""Kernel module signatures in the format of the kernel's own scripts/sign-file.

sign-file appends to a module a detached PKCS#7 (CMS) signature over the module's bytes, in DER, with
neither signed attributes nor certificates (`CMS_NOATTR | CMS_NOCERTS | CMS_BINARY`, the signer named
by its certificate's issuer and serial number); then `struct module_signature` (algo 0, hash 0, id_type
PKEY_ID_PKCS7, signer_len 0, key_id_len 0, three bytes of padding, sig_len as a big-endian u32) and the
magic "~Module signature appended~\\n". The kernel checks that signature against its keyrings (built-in,
secondary and, on UEFI machines, the platform keyring with the MOK keys); kmod's modinfo shows the
issuer's common name as `signer`, the serial as `sig_key` and the digest as `sig_hashalgo`.

`openssl cms` makes the CMS with the flags sign-file gives CMS_sign and CMS_add1_signer; with an RSA
key its bytes equal sign-file's (a test compares them with the kernel's real sign-file). The key is
only ever a path handed to openssl: it is never read into a bundle, an image or a log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from gl_nvidia.bundle import BundleManifest, ModuleSignature, modules_dir
from gl_nvidia.errors import UserError
from gl_nvidia.run import run

MAGIC = b"~Module signature appended~\n"
PKEY_ID_PKCS7 = 2
HASH_ALGO = "sha256"  # what the kernel's own build signs with (CONFIG_MODULE_SIG_SHA256) and MOK keys expect
_TRAILER = struct.Struct(">BBBBB3xI")  # struct module_signature
_HASHES = {"2.16.840.1.101.3.4.2.1": "sha256", "2.16.840.1.101.3.4.2.2": "sha384", "2.16.840.1.101.3.4.2.3": "sha512",
           "2.16.840.1.101.3.4.2.4": "sha224", "1.3.14.3.2.26": "sha1"}
_CN = "2.5.4.3"
_KEY_HINT = ("pass an unencrypted PEM RSA (or ECDSA) private key and its X.509 certificate, e.g. `openssl req -new "
             "-x509 -newkey rsa:4096 -nodes -days 3650 -subj '/CN=my module signing key/' -addext "
             "extendedKeyUsage=codeSigning -keyout signing.key -outform DER -out signing.der`")


@dataclass(frozen=True)
class ModuleSigner:
    """A checked key pair: the key's path (for openssl only), the certificate and what modinfo will show."""

    key: Path
    cert: Path
    signer: str  # the certificate issuer's common name
    key_id: str  # the certificate's serial number, as modinfo prints it
    cert_sha256: str  # sha256 of the certificate's DER

    def sign(self, module: Path) -> bytes:
        """What sign-file appends to `module`: the PKCS#7 signature, the trailer and the magic."""
        der = run(["openssl", "cms", "-sign", "-in", module, "-signer", self.cert, "-inkey", self.key, "-binary",
                   "-noattr", "-nocerts", "-outform", "DER", "-md", HASH_ALGO]).stdout
        return der + _TRAILER.pack(0, 0, PKEY_ID_PKCS7, 0, 0, len(der)) + MAGIC

    def signature(self, name: str, module: bytes, appended: bytes) -> ModuleSignature:
        """The manifest's record of `appended` (from `sign`) over `module`, the bytes of `<name>`."""
        return ModuleSignature(
            file=f"{name}.sig", sha256=hashlib.sha256(appended).hexdigest(), size=len(appended),
            signed_sha256=hashlib.sha256(module + appended).hexdigest(), signer=self.signer, key_id=self.key_id,
            hash_algo=HASH_ALGO, cert_sha256=self.cert_sha256)


def load_signer(key: Path, cert: Path) -> ModuleSigner:
    """Check that `key` is a usable unencrypted private key and `cert` its certificate; one error line if not,
    naming the file (never its content)."""
    certificate = _certificate(cert)
    try:
        private = serialization.load_pem_private_key(_read(key, "module signing key"), password=None)
    except TypeError as exc:
        raise UserError(f"module signing key {key} is encrypted", _KEY_HINT) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        # The library's message can quote the file; say only what kind of problem it is.
        raise UserError(f"module signing key {key} is not a PEM private key", _KEY_HINT) from exc
    if not isinstance(private, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise UserError(f"module signing key {key} is a {type(private).__name__.lstrip('_')}, which the kernel "
                        "does not verify modules with", _KEY_HINT)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(serialization.Encoding.DER, spki) != \
            certificate.public_key().public_bytes(serialization.Encoding.DER, spki):
        raise UserError(f"module signing certificate {cert} is not the certificate of the key {key}",
                        "pass the certificate made from that key")
    names = certificate.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    signer = str(names[0].value) if names else certificate.issuer.rfc4514_string()
    der = certificate.public_bytes(serialization.Encoding.DER)
    return ModuleSigner(key, cert, signer, _colon_hex(certificate.serial_number), hashlib.sha256(der).hexdigest())


def cert_fingerprint(cert: Path) -> str:
    """sha256 of a certificate's DER (what the manifest, the image and a release's inputs record)."""
    return hashlib.sha256(_certificate(cert).public_bytes(serialization.Encoding.DER)).hexdigest()


def _certificate(cert: Path) -> x509.Certificate:
    data = _read(cert, "module signing certificate")
    try:
        return (x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data))
    except ValueError as exc:
        raise UserError(f"module signing certificate {cert} is not a PEM or DER X.509 certificate", _KEY_HINT) from exc


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}", _KEY_HINT) from exc


def _colon_hex(serial: int) -> str:
    """A serial number as kmod's modinfo prints `sig_key`: the number's own bytes (OpenSSL's BN_bn2bin, so
    without DER's leading zero when the top bit is set), upper-case hex, colons."""
    return ":".join(f"{b:02X}" for b in serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big"))


# --- reading a signature back (check-modules) ---------------------------------------------------

@dataclass(frozen=True)
class SignatureInfo:
    """What modinfo shows of a module's appended signature."""

    signer: str
    key_id: str
    hash_algo: str

    def text(self) -> str:
        return f"signed by {self.signer!r} ({self.hash_algo}, key {self.key_id})"

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def bundle_signatures(bundle: Path) -> dict[tuple[str, str], dict[str, SignatureInfo | None]]:
    """(kernel, module type) -> module -> the signature its .ko in the bundle carries (None: unsigned)."""
    manifest = BundleManifest.load(bundle)
    return {(kernel, mtype): {m.name: read_signature(_tail(modules_dir(bundle, kernel, mtype) / m.name))
                              for m in ms.modules}
            for kernel, kb in sorted(manifest.kernels.items())
            for mtype, ms in sorted(kb.module_sets.items()) if ms.status == "ok"}


def _tail(ko: Path, size: int = 64 << 10) -> bytes:
    """The end of a module, where a signature is (a PKCS#7 signature of one signer is well under 64 KiB)."""
    with ko.open("rb") as f:
        f.seek(max(0, ko.stat().st_size - size))
        return f.read()


def read_signature(data: bytes) -> SignatureInfo | None:
    """The signature sign-file appended to a module's bytes (None: unsigned); UserError when it is malformed."""
    if not data.endswith(MAGIC):
        return None
    end = len(data) - len(MAGIC)
    try:
        _algo, _hash, id_type, _signer_len, _key_id_len, sig_len = _TRAILER.unpack_from(data, end - _TRAILER.size)
        if id_type != PKEY_ID_PKCS7 or sig_len > end - _TRAILER.size:
            raise ValueError(f"id_type {id_type}, sig_len {sig_len}")
        return _pkcs7_signer(data[end - _TRAILER.size - sig_len: end - _TRAILER.size])
    except (ValueError, IndexError, struct.error) as exc:
        raise UserError(f"malformed module signature ({exc})", "sign the module again") from exc


def _pkcs7_signer(der: bytes) -> SignatureInfo:
    """The first SignerInfo of a PKCS#7 SignedData: the issuer's CN, the serial number and the digest."""
    content_info = _children(der, *_tlv(der, 0)[1:])
    signed_data = _children(der, *_tlv(der, content_info[1][1])[1:])  # in [0] EXPLICIT
    signer_infos = signed_data[-1]  # SET OF SignerInfo, after the optional certificates and CRLs
    first = _children(der, signer_infos[1], signer_infos[2])[0]
    _version, sid, digest_alg = _children(der, first[1], first[2])[:3]
    if sid[0] != 0x30:
        raise ValueError("the signer is named by subject key identifier, not issuer and serial number")
    issuer, serial = _children(der, sid[1], sid[2])[:2]
    cn = ""
    for rdn in _children(der, issuer[1], issuer[2]):
        for attr in _children(der, rdn[1], rdn[2]):
            oid, value = _children(der, attr[1], attr[2])[:2]
            if _oid(der[oid[1]:oid[2]]) == _CN:
                cn = der[value[1]:value[2]].decode(errors="replace")
    alg = _children(der, digest_alg[1], digest_alg[2])[0]
    hash_oid = _oid(der[alg[1]:alg[2]])
    key_id = _colon_hex(int.from_bytes(der[serial[1]:serial[2]], "big"))
    return SignatureInfo(cn, key_id, _HASHES.get(hash_oid, hash_oid))


def _tlv(der: bytes, off: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at `off`."""
    tag, length = der[off], der[off + 1]
    start = off + 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(der[start:start + n], "big")
        start += n
    if start + length > len(der):
        raise ValueError("truncated DER")
    return tag, start, start + length


def _children(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        tlv = _tlv(der, start)
        out.append(tlv)
        start = tlv[2]
    return out


def _oid(raw: bytes) -> str:
    parts, value = [], 0
    for byte in raw:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    first = min(parts[0] // 40, 2)
    return ".".join(map(str, [first, parts[0] - 40 * first, *parts[1:]]))
