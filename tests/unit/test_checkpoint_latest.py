"""Which checkpoint counts as the latest complete one (filesystem only, no megatron)."""

from __future__ import annotations

import pytest

from megatron_gppo.checkpoint.training import find_latest, list_checkpoints, resolve_checkpoint_dir


def _complete(root, step: int):
    path = root / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    (path / "trainer_state.json").write_text(f'{{"step": {step}}}')
    return path


def _marker(root, name: str) -> None:
    (root / "checkpoints" / "latest").write_text(name + "\n")


def test_no_checkpoints(tmp_path):
    assert find_latest(tmp_path) is None
    assert list_checkpoints(tmp_path) == []


def test_marker_names_the_latest(tmp_path):
    _complete(tmp_path, 10)
    second = _complete(tmp_path, 20)
    _marker(tmp_path, second.name)
    assert find_latest(tmp_path) == second


def test_incomplete_and_temporary_directories_are_ignored(tmp_path):
    first = _complete(tmp_path, 10)
    _marker(tmp_path, first.name)
    (tmp_path / "checkpoints" / ".tmp-step_00000020").mkdir()
    half = tmp_path / "checkpoints" / "step_00000030"
    half.mkdir()
    (half / "metadata.json").write_text("{}")  # no trainer_state.json
    assert find_latest(tmp_path) == first
    assert list_checkpoints(tmp_path) == [first]


def test_missing_or_stale_marker_falls_back_to_the_highest_complete_step(tmp_path):
    _complete(tmp_path, 10)
    newest = _complete(tmp_path, 20)
    assert find_latest(tmp_path) == newest  # no marker
    _marker(tmp_path, "step_00000010")  # crash between rename and marker update
    assert find_latest(tmp_path) == newest
    _marker(tmp_path, "step_00000099")  # names a deleted checkpoint
    assert find_latest(tmp_path) == newest


def test_resolve_checkpoint_dir(tmp_path):
    latest = _complete(tmp_path, 5)
    for given in (tmp_path, tmp_path / "checkpoints", latest):
        assert resolve_checkpoint_dir(given) == latest
    with pytest.raises(ValueError, match="is not a directory"):
        resolve_checkpoint_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a megatron checkpoint"):
        resolve_checkpoint_dir(tmp_path / "empty")
