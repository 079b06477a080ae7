import pytest
import torch

from opdx.checkpoint import (
    KEEP,
    CheckpointError,
    checkpoint_dirs,
    has_checkpoint,
    load_checkpoint,
    read_extra,
    save_checkpoint,
    usable_checkpoint,
)
from opdx.dist import ONE_RANK


def module_and_optimizer(value: float):
    module = torch.nn.Linear(100, 10)
    torch.nn.init.constant_(module.weight, value)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    module(torch.ones(1, 100)).sum().backward()
    optimizer.step()
    return module, optimizer


def save(run_dir, step):
    module, optimizer = module_and_optimizer(float(step))
    return save_checkpoint(run_dir, step, module, optimizer, {"state": {"note": step}}, ONE_RANK)


def test_the_last_two_verified_checkpoints_are_kept_and_load_exactly(tmp_path):
    assert usable_checkpoint(tmp_path) is None and not has_checkpoint(tmp_path)
    for step in (2, 4, 6):
        save(tmp_path, step)
    assert KEEP == 2 and [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000006", "step_000004"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_000004",
        "step_000004.sha256",
        "step_000006",
        "step_000006.sha256",
    ]
    newest = usable_checkpoint(tmp_path)
    assert newest.name == "step_000006" and read_extra(newest) == {"state": {"note": 6}, "step": 6}
    saved, saved_optimizer = module_and_optimizer(6.0)
    module, optimizer = module_and_optimizer(0.0)
    assert load_checkpoint(newest, module, optimizer)["step"] == 6
    assert torch.equal(module.weight, saved.weight)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(optimizer.state[module.weight][key], saved_optimizer.state[saved.weight][key])


def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, capsys):
    save(tmp_path, 2)
    newest = save(tmp_path, 4)
    shard = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit that the loaders would not notice
    shard.write_bytes(bytes(data))
    assert usable_checkpoint(tmp_path).name == "step_000002"
    assert "step_000004 is damaged (its files do not match their sha256); resuming from step_000002" in (
        capsys.readouterr().out
    )


def test_a_checkpoint_killed_while_written_is_skipped(tmp_path, capsys):
    save(tmp_path, 2)
    unfinished = save(tmp_path, 4)
    unfinished.with_name(unfinished.name + ".sha256").unlink()  # killed between its files and its digest
    assert usable_checkpoint(tmp_path).name == "step_000002"
    assert "step_000004 is unfinished" in capsys.readouterr().out


def test_no_usable_checkpoint_is_an_error_naming_each(tmp_path):
    only = save(tmp_path, 2)
    (only / "extra.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*step_000002 is damaged"):
        usable_checkpoint(tmp_path)


def test_each_rank_hashes_its_share_of_a_checkpoints_files(tmp_path, monkeypatch):
    """Rank r of w hashes files r, r + w, ... of the sorted names (the others' hashes arrive by
    all_gather_object, which one process without a process group leaves out)."""
    import opdx.checkpoint
    from opdx.dist import Ranks

    path = save(tmp_path, 2)
    names = sorted(p.name for p in path.iterdir())
    assert len(names) >= 2  # DCP's shard and .metadata, extra.pt
    hashed = []
    monkeypatch.setattr(opdx.checkpoint, "sha256_of", lambda file: hashed.append(file.name) or file.name)
    for rank in (0, 1):
        assert list(opdx.checkpoint._digests(path, Ranks(rank, 2))) == names[rank::2]
    assert hashed == names[0::2] + names[1::2]
