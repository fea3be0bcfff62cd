"""release's skip decision: a unit's inputs against the annotations of what its tags hold in the registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gl_nvidia.cli import main
from gl_nvidia.release.inputs import (
    INPUTS,
    INPUTS_DIGEST,
    UnitInputs,
    annotations_from_text,
    decide,
)

INPUTS_A = UnitInputs({"kernel": "6.1.0-56-cloud-amd64", "driver_version": "535.309.01"},
                      {"nvidia-kernel-source_535.309.01-1_amd64.deb": "ab" * 32}, "base1", "0.1.0")
TAGS = ("535-6.1.0-56-cloud-amd64-debian12", "535.309.01-6.1.0-56-cloud-amd64-debian12")


def test_the_same_inputs_on_every_tag_skip_the_unit() -> None:
    d = decide(INPUTS_A, dict.fromkeys(TAGS, INPUTS_A.annotations()), force=False)
    assert (d.build, d.replace) == (False, False)
    assert d.reason == f"published with the same inputs ({INPUTS_A.digest[:19]})"


def test_a_missing_tag_a_changed_input_or_no_record_builds_and_says_why() -> None:
    same = INPUTS_A.annotations()
    d = decide(INPUTS_A, {TAGS[0]: same, TAGS[1]: None}, force=False)
    assert (d.build, d.replace, d.reason) == (True, False, f"not published: {TAGS[1]}")

    newer = UnitInputs(INPUTS_A.cell, {"nvidia-kernel-source_535.309.02-1_amd64.deb": "cd" * 32}, "base2", "0.1.0")
    d = decide(newer, dict.fromkeys(TAGS, same), force=False)
    assert (d.build, d.replace, d.reason) == (True, True, f"{TAGS[0]}: sources, base changed")

    d = decide(INPUTS_A, {tag: {"org.opencontainers.image.version": "535.309.01"} for tag in TAGS}, force=False)
    assert (d.build, d.replace, d.reason) == (True, True, f"{TAGS[0]}: no inputs recorded")


def test_a_module_signing_certificate_is_an_input_and_unsigned_digests_stay_as_they_were() -> None:
    assert "module-signing-cert" not in json.loads(INPUTS_A.text())  # units published unsigned are not rebuilt
    signed = UnitInputs(INPUTS_A.cell, INPUTS_A.sources, INPUTS_A.base, INPUTS_A.tool, "ef" * 32)
    d = decide(signed, dict.fromkeys(TAGS, INPUTS_A.annotations()), force=False)
    assert (d.build, d.replace, d.reason) == (True, True, f"{TAGS[0]}: module-signing-cert changed")
    assert annotations_from_text(signed.text()) == signed.annotations()


def test_force_builds_what_is_published() -> None:
    d = decide(INPUTS_A, dict.fromkeys(TAGS, INPUTS_A.annotations()), force=True)
    assert (d.build, d.replace, d.reason) == (True, True, "forced (--force)")


def test_the_annotation_is_the_canonical_inputs_and_their_digest() -> None:
    ann = INPUTS_A.annotations()
    assert json.loads(ann[INPUTS])["gl-nvidia"] == "0.1.0"
    assert ann[INPUTS_DIGEST].startswith("sha256:") and len(ann[INPUTS_DIGEST]) == 71
    assert annotations_from_text(ann[INPUTS]) == ann  # what the publish workflow hands to `gl-nvidia image`


def test_image_inputs_describe_one_unit_as_release_plan_prints_them(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["image", str(tmp_path), "--all", "--inputs", INPUTS_A.text()]) == 2
    assert "--inputs describes one build unit" in capsys.readouterr().err
    assert main(["image", str(tmp_path), "--kernel", "6.1.0-56-cloud-amd64", "--inputs", '{"cell": {}}']) == 2
    assert "--inputs is not what `release --plan` prints" in capsys.readouterr().err
