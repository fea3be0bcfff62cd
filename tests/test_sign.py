"""Image signatures in cosign's key-based format, against Debian's real docker-registry; the signature is
checked independently of our code with skopeo and openssl."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path

import pytest

from gl_nvidia.cli import main
from gl_nvidia.oci import Descriptor, Manifest, canonical_json, digest_bytes
from gl_nvidia.registry.client import RegistryClient
from gl_nvidia.registry.sign import PAYLOAD_TYPE, SIGNATURE_ANNOTATION
from gl_nvidia.registry.transfer import push
from tests.fixtures.layouts import make_layout
from tests.fixtures.registry import Registry


def sh(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two ECDSA P-256 key pairs made by openssl, as an operator makes them, plus keys we must refuse."""
    d = tmp_path_factory.mktemp("keys")
    for name in ("a", "b"):
        sh("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", d / f"{name}.key")
        sh("openssl", "pkey", "-in", d / f"{name}.key", "-pubout", "-out", d / f"{name}.pub")
    sh("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384", "-out", d / "p384.key")
    sh("openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", d / "rsa.key")
    sh("openssl", "pkcs8", "-topk8", "-in", d / "a.key", "-passout", "pass:secret", "-out", d / "encrypted.key")
    (d / "garbage.key").write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    return {p.name: p for p in d.iterdir()}


@pytest.fixture
def image(registry: Registry, tmp_path: Path) -> tuple[str, str]:
    """A pushed image: (repository, digest)."""
    make_layout(tmp_path / "l", {"535-a": b"a", "535-b": b"b"})
    results = push(tmp_path / "l", f"{registry.host}/driver")
    return f"{registry.host}/driver", results[0].digest


def _sig_manifest(repo: str, digest: str) -> Manifest:
    host, _, path = repo.partition("/")
    with RegistryClient(host) as c:
        m = c.get_manifest(path, f"sha256-{digest.removeprefix('sha256:')}.sig")
    assert m is not None
    return m


def test_signature_verifies_with_openssl_independently_of_our_code(
        image: tuple[str, str], keys: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo, digest = image
    assert main(["sign", f"{repo}:535-a", "--key", str(keys["a.key"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["added"] is True

    # skopeo fetches the .sig manifest and its payload blob; openssl checks the signature over the payload.
    sig_tag = f"sha256-{digest.removeprefix('sha256:')}.sig"
    sh("skopeo", "copy", "--src-tls-verify=false", f"docker://{repo}:{sig_tag}", f"dir:{tmp_path / 'sig'}")
    manifest = json.loads((tmp_path / "sig" / "manifest.json").read_text())
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.dev.cosign.simplesigning.v1+json"
    payload = tmp_path / "sig" / layer["digest"].removeprefix("sha256:")
    (tmp_path / "sig.der").write_bytes(base64.b64decode(layer["annotations"]["dev.cosignproject.cosign/signature"]))
    assert "Verified OK" in sh("openssl", "dgst", "-sha256", "-verify", keys["a.pub"],
                               "-signature", tmp_path / "sig.der", payload)
    body = json.loads(payload.read_bytes())
    assert body == {"critical": {"identity": {"docker-reference": repo},
                                 "image": {"docker-manifest-digest": digest},
                                 "type": "cosign container image signature"},
                    "optional": None}
    with pytest.raises(subprocess.CalledProcessError):  # and openssl says no for another key
        sh("openssl", "dgst", "-sha256", "-verify", keys["b.pub"], "-signature", tmp_path / "sig.der", payload)

    assert main(["verify-image", f"{repo}:535-a", "--key", str(keys["a.pub"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"reference": f"{repo}@{digest}", "signatures": 1,
                                                   "identity": repo}
    assert main(["verify-image", f"{repo}@{digest}", "--key", str(keys["a.pub"])]) == 0
    capsys.readouterr()


def test_signing_again_adds_nothing_and_another_key_adds_its_own(image: tuple[str, str], keys: dict[str, Path],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    repo, digest = image
    for key in ("a.key", "a.key", "b.key"):
        assert main(["sign", f"{repo}@{digest}", "--key", str(keys[key])]) == 0
    assert "already signed by this key" in capsys.readouterr().out
    assert len(_sig_manifest(repo, digest).layers) == 2  # cosign's duplicate check: one per key
    for pub in ("a.pub", "b.pub"):
        assert main(["verify-image", f"{repo}:535-a", "--key", str(keys[pub])]) == 0


def test_another_key_a_tampered_payload_or_another_images_signature_fail(
        image: tuple[str, str], registry: Registry, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    repo, digest = image
    assert main(["verify-image", f"{repo}:535-a", "--key", str(keys["a.pub"])]) == 1
    assert "has no signature" in capsys.readouterr().err
    assert main(["sign", f"{repo}:535-a", "--key", str(keys["a.key"])]) == 0
    assert main(["verify-image", f"{repo}:535-a", "--key", str(keys["b.pub"])]) == 1
    assert "none of its 1 signature(s) verifies with this public key" in capsys.readouterr().err

    sig = _sig_manifest(repo, digest)
    (layer,) = sig.layers
    sig_tag = f"sha256-{digest.removeprefix('sha256:')}.sig"
    with RegistryClient(registry.host) as c:
        payload_path = Path(registry.root, "payload")
        c.download_blob("driver", layer, payload_path)
        # The same signature over a changed payload (one more space): the digest check passes, the signature not.
        tampered = payload_path.read_bytes().replace(b'{"critical"', b'{ "critical"')
        _put_sig(c, registry, sig, tampered, layer.annotations[SIGNATURE_ANNOTATION], sig_tag)
        assert main(["verify-image", f"{repo}:535-a", "--key", str(keys["a.pub"])]) == 1
        assert "none of its 1 signature(s) verifies" in capsys.readouterr().err

        # A valid signature by the right key, but of the other image: moved onto this one's .sig tag.
        other = c.manifest_digest("driver", "535-b")
        assert other is not None and other != digest
        assert main(["sign", f"{repo}:535-b", "--key", str(keys["a.key"])]) == 0
        other_sig = c.get_manifest("driver", f"sha256-{other.removeprefix('sha256:')}.sig")
        assert other_sig is not None
        c.put_manifest("driver", sig_tag, other_sig)
    assert main(["verify-image", f"{repo}:535-a", "--key", str(keys["a.pub"])]) == 1
    assert "the signature by this key is for another image" in capsys.readouterr().err
    assert main(["verify-image", f"{repo}:535-b", "--key", str(keys["a.pub"])]) == 0


def _put_sig(c: RegistryClient, registry: Registry, sig: Manifest, payload: bytes, signature: str, tag: str) -> None:
    path = Path(registry.root, "tampered")
    path.write_bytes(payload)
    desc = Descriptor(PAYLOAD_TYPE, digest_bytes(payload), len(payload), {SIGNATURE_ANNOTATION: signature})
    c.upload_blob("driver", path, desc)
    config = canonical_json({"rootfs": {"type": "layers", "diff_ids": [desc.digest]}})
    path.write_bytes(config)
    config_desc = Descriptor(sig.config.media_type, digest_bytes(config), len(config))
    c.upload_blob("driver", path, config_desc)
    c.put_manifest("driver", tag, Manifest.build(config_desc, [desc], {}))


@pytest.mark.parametrize(("key", "why"), [
    ("missing.key", "cannot read signing key .*missing.key: No such file or directory"),
    ("garbage.key", "signing key .*garbage.key is not a PEM private key"),
    ("encrypted.key", "signing key .*encrypted.key is encrypted"),
    ("p384.key", "signing key .*p384.key is an EC key on secp384r1, not ECDSA P-256"),
    ("rsa.key", "signing key .*rsa.key is a RSAPrivateKey, not ECDSA P-256"),
    ("a.pub", "signing key .*a.pub is not a PEM private key"),
])
def test_a_missing_or_unusable_key_is_one_error_line(key: str, why: str, image: tuple[str, str],
                                                     keys: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    repo, digest = image
    path = keys.get(key, keys["a.key"].parent / key)
    assert main(["-v", "sign", f"{repo}:535-a", "--key", str(path)]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("gl-nvidia: error: ") and lines[1].startswith("gl-nvidia: hint:")
    assert re.search(why, lines[0]), lines[0]
    if path.exists():  # nothing of the key's content is echoed
        body = "".join(x for x in path.read_text().splitlines() if not x.startswith("-----"))
        assert body[:24] not in err
    with RegistryClient(repo.partition("/")[0]) as c:
        assert c.get_manifest("driver", f"sha256-{digest.removeprefix('sha256:')}.sig") is None
    assert main(["verify-image", f"{repo}:535-a", "--key", str(keys["a.key"])]) == 2  # a private key is not a public one


def test_verbose_signing_logs_no_key_material(image: tuple[str, str], keys: dict[str, Path],
                                              capsys: pytest.CaptureFixture[str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    repo, _ = image
    caplog.set_level("DEBUG")
    assert main(["-v", "sign", f"{repo}:535-a", "--key", str(keys["a.key"])]) == 0
    captured = capsys.readouterr()
    seen = captured.out + captured.err + caplog.text
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(keys["a.key"].read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    forms = [f"{key.private_numbers().private_value:064x}", str(key.private_numbers().private_value)]
    forms += [line for line in keys["a.key"].read_text().splitlines() if not line.startswith("-----")]
    assert not [f for f in forms if f in seen]
