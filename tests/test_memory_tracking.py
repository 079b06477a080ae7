"""Peak tensor memory on a CPU: exact byte counts of what an operation makes and frees."""

import torch

from opdx.memory_tracking import LiveTensorBytes
from opdx.metrics import timed, track_cpu_memory


def test_a_blocks_peak_counts_what_it_made_and_frees_what_python_let_go():
    a, b = torch.ones(1000, 250, dtype=torch.float32), torch.ones(250, 1000, dtype=torch.float32)  # 1 MB each
    with LiveTensorBytes() as live:
        start = live.current
        product = a @ b  # 4 MB
        product.view(-1)[:10].add_(1)  # a view: the same storage, counted once
        total = product.sum()  # 4 bytes
        del product
        after = live.current
    assert live.peak - start == 4_000_000 + 4
    assert after - start == 4 and total.item() > 0


def test_timed_records_each_blocks_peak_only_when_tracking_is_on():
    metrics: dict[str, float] = {}
    with timed(metrics, "update"):
        torch.ones(2**20, dtype=torch.float32)
    assert "memory/update_gib" not in metrics
    track_cpu_memory(True)
    try:
        for size in (2**20, 2**18):  # the most over the step's blocks of one key
            with timed(metrics, "update"):
                torch.ones(size, dtype=torch.float32)
    finally:
        track_cpu_memory(False)
    assert metrics["memory/update_gib"] * 2**30 >= 4 * 2**20
    assert "time/update" in metrics
