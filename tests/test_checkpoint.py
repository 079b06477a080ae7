import pytest
import torch

from opdx.checkpoint import KEEP, CheckpointError, checkpoint_paths, has_checkpoint, load_checkpoint, save_checkpoint


def save(run_dir, step):
    return save_checkpoint(run_dir, {"step": step, "student": {"w": torch.full((1000,), float(step))}})


def test_the_last_two_verified_checkpoints_are_kept(tmp_path):
    assert load_checkpoint(tmp_path) is None and not has_checkpoint(tmp_path)
    for step in (2, 4, 6):
        save(tmp_path, step)
    assert KEEP == 2 and [p.name for p in checkpoint_paths(tmp_path)] == ["step_000006.pt", "step_000004.pt"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_000004.pt",
        "step_000004.pt.sha256",
        "step_000006.pt",
        "step_000006.pt.sha256",
    ]
    assert load_checkpoint(tmp_path)["step"] == 6


def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, capsys):
    save(tmp_path, 2)
    newest = save(tmp_path, 4)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit that torch.load itself would not notice
    newest.write_bytes(bytes(data))
    assert load_checkpoint(tmp_path)["step"] == 2
    assert "step_000004.pt is damaged (its bytes do not match its sha256); resuming from step_000002.pt" in (
        capsys.readouterr().out
    )


def test_a_checkpoint_killed_while_written_is_skipped(tmp_path, capsys):
    save(tmp_path, 2)
    unfinished = save(tmp_path, 4)
    unfinished.with_name(unfinished.name + ".sha256").unlink()  # killed between the file and its digest
    unfinished.write_bytes(unfinished.read_bytes()[:100])
    assert load_checkpoint(tmp_path)["step"] == 2
    assert "step_000004.pt is unfinished" in capsys.readouterr().out


def test_no_usable_checkpoint_is_an_error_naming_each(tmp_path):
    only = save(tmp_path, 2)
    only.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*step_000002.pt is damaged"):
        load_checkpoint(tmp_path)
