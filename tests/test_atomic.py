"""atomic.py: a file or a directory appears whole or not at all, whatever stops the write."""

import os

import pytest

from grpo_cli import atomic


class Interrupted(BaseException):  # as a Ctrl-C or SIGTERM arrives: not an Exception
    pass


def test_a_file_is_replaced_whole(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomic.write_file(target, "old")
    atomic.write_file(target, b"new")
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


@pytest.mark.parametrize("stage", ["write", "fsync", "replace"])
def test_an_interrupted_file_write_leaves_the_old_file_and_nothing_hidden(tmp_path, monkeypatch, stage):
    target = tmp_path / "state.json"
    atomic.write_file(target, "old")

    def interrupted(*args, **kwargs):
        raise Interrupted

    if stage == "write":
        real_open = open
        monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(Interrupted)
                            if str(a[0]).endswith(".partial") else real_open(*a, **k))
    else:
        monkeypatch.setattr(os, stage, interrupted)
    with pytest.raises(Interrupted):
        atomic.write_file(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_directory_appears_whole_and_replaces_an_earlier_one(tmp_path):
    target = tmp_path / "model"
    with atomic.write_directory(target) as partial:
        (partial / "a.txt").write_text("1")
    with atomic.write_directory(target) as partial:
        assert partial != target and not (partial / "a.txt").exists()  # built apart, from empty
        (partial / "nested").mkdir()
        (partial / "nested" / "b.txt").write_text("2")
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["nested", "nested/b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_failed_directory_write_leaves_the_earlier_one_and_nothing_hidden(tmp_path):
    target = tmp_path / "model"
    with atomic.write_directory(target) as partial:
        (partial / "a.txt").write_text("1")
    with pytest.raises(Interrupted):
        with atomic.write_directory(target) as partial:
            (partial / "a.txt").write_text("half")
            raise Interrupted
    assert (target / "a.txt").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_named_partial_directory_is_used_and_cleared(tmp_path):
    """A cache shared by several processes builds in a directory named per process; a crashed attempt's
    leftover there is cleared before the build."""
    target, partial = tmp_path / "model", tmp_path / ".model.partial-123"
    partial.mkdir()
    (partial / "leftover").write_text("x")
    with atomic.write_directory(target, partial) as building:
        assert building == partial and not (partial / "leftover").exists()
        (building / "a.txt").write_text("1")
    assert not partial.exists() and (target / "a.txt").read_text() == "1"
