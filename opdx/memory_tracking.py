"""Peak tensor memory on a CPU, where no allocator keeps the statistics CUDA's does.

    with LiveTensorBytes() as live:
        train_step(...)
    live.peak          # bytes

For checking the memory planner (``opdx.plan``) against what a step holds: ``runtime.track_memory``.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# plain tensors only: fake and functional ones a compiler left behind (sizes may be symbolic) hold no memory
PLAIN = (torch.Tensor, torch.nn.Parameter)


class LiveTensorBytes(TorchDispatchMode):
    """The bytes of the tensor storages alive, and their peak, while the mode is on: every storage
    alive when it starts (found through ``gc``) and every one an operator makes inside it (a
    ``TorchDispatchMode``: forward, backward on this thread, optimizer steps), each counted once
    (views share theirs) and let go when Python frees it (``weakref.finalize``). Storages made where
    dispatch is skipped (inside C++ without the dispatcher) are not seen; the figure is the
    tensors' bytes, not the process's RSS."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __enter__(self) -> LiveTensorBytes:
        for obj in gc.get_objects():
            if type(obj) in PLAIN:  # type(): no attribute lookup on proxies
                self._add(obj)
        self.peak = self.current
        return super().__enter__()

    def _add(self, tensor: torch.Tensor) -> None:
        if type(tensor) not in PLAIN or tensor.is_meta or tensor.device.type != "cpu" or tensor.layout != torch.strided:
            return
        storage = tensor.untyped_storage()
        key, size = id(storage), storage.nbytes()
        if key in self._sizes or not isinstance(size, int):
            return
        self._sizes[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._add(item)
        return out
