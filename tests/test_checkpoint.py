"""Checkpoint selection: only complete checkpoints are ever resumed from."""

import json

import pytest

from disco_dist.core.errors import UserError
from disco_dist.train.checkpoint import complete_checkpoints, latest_checkpoint, resolve_resume


def fake_checkpoint(run, step, complete=True, partial=False):
    name = f".step-{step:08d}.partial" if partial else f"step-{step:08d}"
    folder = run / "checkpoints" / name
    (folder / "engine").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    if complete:
        (folder / "COMPLETE").write_text(json.dumps({"step": step, "world_size": 2}))
    return folder


def test_partial_and_unmarked_checkpoints_are_never_chosen(tmp_path):
    good = fake_checkpoint(tmp_path, 100)
    fake_checkpoint(tmp_path, 200, complete=False)  # killed between files: no COMPLETE marker
    fake_checkpoint(tmp_path, 300, partial=True)  # killed before the rename
    assert latest_checkpoint(tmp_path) == good
    assert resolve_resume("auto", tmp_path) == good
    assert complete_checkpoints(tmp_path) == [good]
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoints" / "step-00000200"), tmp_path)


def test_auto_resume_with_nothing_to_resume_starts_fresh(tmp_path):
    assert resolve_resume("auto", tmp_path) is None
    assert resolve_resume(None, tmp_path) is None
