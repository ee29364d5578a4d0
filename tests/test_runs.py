"""Artefact cache: stable keys, atomic writes, loud errors on missing/corrupt/mismatched artefacts."""
import pytest
import torch

from gex.runs import (
    ArtifactCache,
    ArtifactError,
    ArtifactMismatchError,
    atomic_save,
    atomic_write_text,
    config_key,
    load_artifact,
)


def test_config_key_is_stable_under_ordering_and_int_float():
    assert config_key({"a": 1, "b": [1.0, 2]}) == config_key({"b": [1, 2.0], "a": 1.0})
    assert config_key({"a": 1}) != config_key({"a": 2})
    assert len(config_key({})) == 16


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom")


def test_atomic_save_leaves_nothing_when_the_write_fails(tmp_path):
    target = tmp_path / "x.pt"
    atomic_save({"w": torch.ones(2)}, target)
    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"w": _Unpicklable()}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]  # no temp file, old file intact
    assert torch.equal(load_artifact(target)["w"], torch.ones(2))
    atomic_write_text("hello", tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_text() == "hello"


def test_missing_and_truncated_artefacts_are_one_line_errors(tmp_path):
    with pytest.raises(ArtifactError, match=r"missing checkpoint: .*nope.pt does not exist"):
        load_artifact(tmp_path / "nope.pt", "checkpoint")
    path = tmp_path / "t.pt"
    atomic_save({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"unreadable checkpoint: .*t.pt") as err:
        load_artifact(path, "checkpoint")
    assert "\n" not in str(err.value)


def test_weights_only_loading_refuses_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"f": print}, path)
    with pytest.raises(ArtifactError, match="unreadable"):
        load_artifact(path)


def test_cache_roundtrip_and_mismatch(tmp_path):
    cache = ArtifactCache(tmp_path)
    spec = {"model": "mlp", "seed": 0}
    assert cache.load("pretrain", spec, "checkpoint") is None
    cache.save("pretrain", spec, "checkpoint", {"w": torch.arange(3)})
    assert torch.equal(cache.load("pretrain", spec, "checkpoint")["w"], torch.arange(3))
    folder = cache.directory("pretrain", spec)
    (folder / "spec.json").write_text('{"model": "vgg", "seed": 0}')  # a stale/colliding folder
    with pytest.raises(ArtifactMismatchError, match="holds a different config"):
        cache.load("pretrain", spec, "checkpoint")
