"""Image signatures in cosign's key-based format, so cosign-compatible admission controllers
(sigstore policy-controller, Kyverno, Connaisseur) verify them with the public key.

What cosign writes for `cosign sign --key`, and so what this writes: the simple-signing payload
(`critical.image.docker-manifest-digest` names the image), signed with ECDSA P-256 over SHA-256
(ASN.1 DER, base64 in the layer annotation `dev.cosignproject.cosign/signature`), one layer per
signature in the image manifest tagged `sha256-<hex>.sig` beside the image. Signing again with a
key that already signed the digest adds nothing (cosign's duplicate check).

Keys: an unencrypted PKCS#8 (or SEC1) PEM ECDSA P-256 private key, and its PEM public key, which is
also the format of cosign's `cosign.pub`. cosign's own encrypted private keys are not read.
A key is read from its file and held in memory only: it is never logged, and never written anywhere.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gl_nvidia import oci
from gl_nvidia.errors import CheckFailed, UserError
from gl_nvidia.oci import Descriptor, Manifest
from gl_nvidia.reference import Reference, check_digest
from gl_nvidia.registry.client import RegistryClient

PAYLOAD_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGNATURE_TYPE = "cosign container image signature"
_ECDSA = ec.ECDSA(hashes.SHA256())
_KEY_HINT = ("use an unencrypted ECDSA P-256 PEM key, e.g. `openssl genpkey -algorithm EC "
             "-pkeyopt ec_paramgen_curve:P-256 -out key.pem`; its public key: `openssl pkey -in key.pem -pubout`")


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The signing key, or one error line naming the file (never its content)."""
    key = _load(path, "signing key", private=True)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    key = _load(path, "public key", private=False)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def _read_key(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}", _KEY_HINT) from exc


def _load(path: Path, what: str, *, private: bool) -> object:
    data = _read_key(path, what)
    try:
        key: object = (serialization.load_pem_private_key(data, password=None) if private
                       else serialization.load_pem_public_key(data))
    except TypeError as exc:  # encrypted, the form cosign writes its own keys in
        raise UserError(f"{what} {path} is encrypted", _KEY_HINT) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        # The library's message can quote the file; say only what kind of problem it is.
        raise UserError(f"{what} {path} is not a PEM {'private' if private else 'public'} key", _KEY_HINT) from exc
    curve = getattr(key, "curve", None)
    if not isinstance(curve, ec.SECP256R1):
        kind = f"an EC key on {curve.name}" if curve is not None else f"a {type(key).__name__.lstrip('_')}"
        raise UserError(f"{what} {path} is {kind}, not ECDSA P-256", _KEY_HINT)
    return key


def payload(repository: str, digest: str) -> bytes:
    """cosign's payload, byte for byte as its Go encoder writes it (field order, no spaces)."""
    body = {"critical": {"identity": {"docker-reference": repository},
                         "image": {"docker-manifest-digest": check_digest(digest)},
                         "type": SIGNATURE_TYPE},
            "optional": None}
    return json.dumps(body, separators=(",", ":")).encode()


def signs(public: ec.EllipticCurvePublicKey, data: bytes, signature_b64: str) -> bool:
    try:
        public.verify(base64.b64decode(signature_b64, validate=True), data, _ECDSA)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class SignResult:
    reference: str  # REPO@DIGEST that was signed
    signature_tag: str
    added: bool  # False: this key had signed this digest already

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sign_digest(client: RegistryClient, repo: str, digest: str, key: ec.EllipticCurvePrivateKey) -> SignResult:
    """Add this key's signature of `repo@digest` to its `.sig` manifest (the image must be in `repo`)."""
    repository = f"{client.host}/{repo}"
    tag = oci.attachment_tag(digest, "sig")
    existing = client.get_manifest(repo, tag)
    layers = list(existing.layers) if existing else []
    data = payload(repository, digest)
    public = key.public_key()
    with tempfile.TemporaryDirectory(prefix="gl-nvidia-sig-") as tmp:
        for layer in layers:
            if layer.digest == oci.digest_bytes(data) and signs(public, data,
                                                               layer.annotations.get(SIGNATURE_ANNOTATION, "")):
                return SignResult(f"{repository}@{digest}", tag, added=False)
        signature = base64.b64encode(key.sign(data, _ECDSA)).decode()
        layers.append(Descriptor(PAYLOAD_TYPE, oci.digest_bytes(data), len(data), {SIGNATURE_ANNOTATION: signature}))
        config = oci.canonical_json({  # what cosign's signature images carry: the layers, nothing else
            "architecture": "", "os": "", "created": "0001-01-01T00:00:00Z", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [x.digest for x in layers]},
            "history": [{"created": "0001-01-01T00:00:00Z"} for _ in layers],
        })
        config_desc = Descriptor(oci.CONFIG, oci.digest_bytes(config), len(config))
        for blob, desc in ((data, layers[-1]), (config, config_desc)):
            if not client.has_blob(repo, desc.digest):
                path = Path(tmp, desc.digest.removeprefix("sha256:"))
                path.write_bytes(blob)
                client.upload_blob(repo, path, desc)
    client.put_manifest(repo, tag, Manifest.build(config_desc, layers, {}))
    return SignResult(f"{repository}@{digest}", tag, added=True)


@dataclass(frozen=True)
class Verified:
    reference: str  # REPO@DIGEST
    signatures: int  # by this key, for this digest
    identity: str  # the docker-reference the signer named (cosign does not hold it to the repository)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def verify_image(client: RegistryClient, ref: Reference, public: ec.EllipticCurvePublicKey) -> Verified:
    """The image's `.sig` manifest holds a signature by `public` of a payload naming this exact
    digest, as `cosign verify --key` checks; otherwise CheckFailed saying what was found instead."""
    want = ref.digest or ref.tag or "latest"
    image = client.get_manifest(ref.repo, want)  # by content: a tag's digest is computed, not taken on trust
    if image is None:
        raise UserError(f"image {ref} not found", "check the reference (repository and tag)")
    digest, where = image.digest, f"{ref.repository}@{image.digest}"
    sig = client.get_manifest(ref.repo, oci.attachment_tag(digest, "sig"))
    if sig is None:
        raise CheckFailed(f"{where} has no signature", f"sign it with `gl-nvidia sign {where} --key KEY`")
    good, other_image, identity = 0, 0, ""
    with tempfile.TemporaryDirectory(prefix="gl-nvidia-sig-") as tmp:
        for layer in sig.layers:
            signature = layer.annotations.get(SIGNATURE_ANNOTATION)
            if layer.media_type != PAYLOAD_TYPE or signature is None or layer.size > 1 << 20:
                continue
            path = Path(tmp, layer.digest.removeprefix("sha256:"))
            client.download_blob(ref.repo, layer, path)  # checked against its digest
            data = path.read_bytes()
            if not signs(public, data, signature):
                continue
            critical = _critical(data)
            if critical.get("type") == SIGNATURE_TYPE and \
                    (critical.get("image") or {}).get("docker-manifest-digest") == digest:
                good += 1
                identity = str((critical.get("identity") or {}).get("docker-reference", ""))
            else:
                other_image += 1
    if good:
        return Verified(where, good, identity)
    if other_image:
        raise CheckFailed(f"{where}: the signature by this key is for another image, not this digest",
                          "the .sig tag was copied from or replaced by another image's; sign this image")
    raise CheckFailed(f"{where}: none of its {len(sig.layers)} signature(s) verifies with this public key",
                      "it was signed with another key, or its signed payload was changed")


def _critical(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
        critical = body.get("critical") if isinstance(body, dict) else None
    except ValueError:
        return {}
    return critical if isinstance(critical, dict) else {}
