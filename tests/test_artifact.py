"""Artifacts: exact reload, and every kind of damage ends in one clear ArtifactError — never a crash or a read outside."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowc.artifact import MANIFEST, open_artifact, sha256_file
from lowc.compress.pipeline import compress
from lowc.errors import ArtifactError, LowcError, UsageError


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory) -> Path:
    return compress(tiny_llama, tmp_path_factory.mktemp("art") / "a", vnm="16:2:5", wbits=6, group=32, progress=False)


def copy_of(artifact: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def rewrite_manifest(path: Path, edit) -> None:
    data = json.loads((path / MANIFEST).read_text())
    edit(data)
    (path / MANIFEST).write_text(json.dumps(data))


def test_reload_is_bit_identical(artifact, tmp_path):
    a = open_artifact(artifact)
    again = compress(a.source["path"], tmp_path / "b", a.recipe, progress=False)
    b = open_artifact(again)
    assert a.weight_map.keys() == b.weight_map.keys()
    for name in a.weight_map:
        assert torch.equal(a.get(name), b.get(name)), name
    for file in ("model.safetensors",) if "model.safetensors" in a.files else ():
        assert sha256_file(a.files[file]) == sha256_file(b.files[file])


def test_missing_path_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        open_artifact(tmp_path / "nope")


def test_not_an_artifact(tiny_llama):
    with pytest.raises(ArtifactError, match="not a lowc artifact"):
        open_artifact(tiny_llama)


def test_hash_mismatch_names_the_file(artifact, tmp_path):
    art = copy_of(artifact, tmp_path)
    shard = sorted(art.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{shard.name}: sha256 does not match"):
        open_artifact(art)


def test_truncated_file(artifact, tmp_path):
    art = copy_of(artifact, tmp_path)
    shard = sorted(art.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="truncated or replaced"):
        open_artifact(art)


def test_unsupported_version(artifact, tmp_path):
    art = copy_of(artifact, tmp_path)
    rewrite_manifest(art, lambda d: d.update(format_version="2.0"))
    with pytest.raises(ArtifactError, match="format version '2.0' is not supported"):
        open_artifact(art)


def test_shape_mismatch_with_manifest(artifact, tmp_path):
    art = copy_of(artifact, tmp_path)
    rewrite_manifest(art, lambda d: d["modules"]["model.layers.0.mlp.up_proj"].update(shape=[96, 65]))
    with pytest.raises(ArtifactError, match="model.layers.0.mlp.up_proj"):
        open_artifact(art)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ""])
def test_paths_outside_directory_rejected(artifact, tmp_path, name):
    art = copy_of(artifact, tmp_path)
    outside = tmp_path / "outside.safetensors"
    shard = sorted(art.glob("*.safetensors"))[0]
    shutil.copy(shard, outside)
    rewrite_manifest(art, lambda d: d["files"].update({name: {"sha256": sha256_file(outside), "bytes": outside.stat().st_size}}))
    with pytest.raises(ArtifactError, match="not a plain file name|outside"):
        open_artifact(art)


def test_symlink_escaping_directory_rejected(artifact, tmp_path):
    art = copy_of(artifact, tmp_path)
    shard = sorted(art.glob("*.safetensors"))[0]
    outside = tmp_path / "real.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(ArtifactError, match="outside"):
        open_artifact(art)


# ---- property-based: mutated manifests and truncated files ------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=12)
    | st.sampled_from(["../x", "/etc/passwd", "model.safetensors", "64:2:5", "1.0", "lowc", "uint8"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)


def _paths(obj, prefix=()):
    """Every (path, value) inside a JSON document."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_manifests_fail_cleanly(artifact, tmp_path_factory, data):
    art = copy_of(artifact, tmp_path_factory.mktemp("mut"))
    manifest = json.loads((art / MANIFEST).read_text())
    places = [p for p, _ in _paths(manifest) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(places))
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = data.draw(JSON_VALUES)
        places = [p for p, _ in _paths(manifest) if p]
        if not places:
            break
    (art / MANIFEST).write_text(json.dumps(manifest))
    _load_expecting_clean_outcome(art)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_or_garbled_files_fail_cleanly(artifact, tmp_path_factory, data):
    art = copy_of(artifact, tmp_path_factory.mktemp("trunc"))
    files = sorted(p for p in art.iterdir() if p.is_file())
    victim = data.draw(st.sampled_from(files))
    raw = victim.read_bytes()
    cut = data.draw(st.integers(0, max(0, len(raw) - 1)))
    if data.draw(st.booleans()):
        victim.write_bytes(raw[:cut])
    else:
        garbled = bytearray(raw)
        garbled[cut] ^= data.draw(st.integers(1, 255))
        victim.write_bytes(bytes(garbled))
    # every file but the manifest is hashed, so any change to one must be caught
    _load_expecting_clean_outcome(art, must_fail=victim.name != MANIFEST)


def _load_expecting_clean_outcome(art: Path, must_fail: bool = False) -> None:
    """Loading either succeeds or raises LowcError; it never opens anything outside `art`."""
    import builtins
    import io

    import lowc.artifact as artifact_module

    root = art.resolve()
    real_open, real_safe_open = builtins.open, artifact_module.safe_open

    def check(file):
        if isinstance(file, (str, Path)):
            resolved = Path(file).resolve()
            assert root in resolved.parents or resolved == root, f"read outside the artifact: {resolved}"

    def guarded_open(file, *args, **kwargs):
        check(file)
        return real_open(file, *args, **kwargs)

    def guarded_safe_open(file, *args, **kwargs):
        check(file)
        return real_safe_open(file, *args, **kwargs)

    builtins.open = io.open = guarded_open
    artifact_module.safe_open = guarded_safe_open
    try:
        open_artifact(art)
        assert not must_fail, "a damaged artifact loaded without error"
    except LowcError:
        pass
    finally:
        builtins.open = io.open = real_open
        artifact_module.safe_open = real_safe_open
