"""Data parallelism with PyTorch's own engine: ranks under ``torchrun``, the process group, and
the global sums every normaliser and metric uses.

    torchrun --nproc_per_node=2 -m opdx train trainer.strategy=ddp     # or trainer.strategy=fsdp2
    opdx train                                                          # one process: trainer.strategy=none

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; ``init`` creates the
default process group from them, with gloo for CPU tensors and NCCL for CUDA ones (one group,
``"cpu:gloo,cuda:nccl"``). Outside torchrun everything here is the identity on one rank.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

Item = TypeVar("Item")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone writes metrics, summaries, the final student and prints progress."""
        return self.rank == 0

    def share(self, items: Sequence[Item]) -> list[Item]:
        """This rank's share of a global list: items rank, rank + world, ... (nanochat's split)."""
        return list(items[self.rank :: self.world])


ONE_RANK = Ranks()


def launched() -> Ranks:
    """The ranks torchrun launched this process with (one rank without torchrun). A task of a
    multi-task Slurm job started by Hydra's submitit launcher gets torchrun's variables from
    submitit (``TorchDistributedEnvironment``: the first node as master, a port from the job id)."""
    if "WORLD_SIZE" not in os.environ and "SUBMITIT_EXECUTOR" in os.environ:
        from submitit.helpers import TorchDistributedEnvironment  # only inside a submitit task

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return ONE_RANK
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init() -> Ranks:
    """The default process group of a torchrun launch (created once), or one rank without torchrun."""
    ranks = launched()
    if ranks.world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", ranks.local_rank) if cuda else None  # NCCL bound to this rank's GPU
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", device_id=device)
    return ranks


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_sum(x: Tensor) -> Tensor:
    """The sum of ``x`` over the ranks (``x`` itself on one rank)."""
    if not active():
        return x
    total = x.detach().clone()
    dist.all_reduce(total)
    return total


def global_max(x: Tensor) -> Tensor:
    if not active():
        return x
    top = x.detach().clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return top


def global_min(x: Tensor) -> Tensor:
    return -global_max(-x)


def whole(tensor: Tensor) -> Tensor:
    """A tensor as one piece: an FSDP2 shard gathered (a collective every rank joins), else itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(value: object) -> object:
    """Rank 0's ``value`` on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Item) -> list[Item]:
    """Every rank's ``value``, by rank, on every rank (``all_gather_object``; ``[value]`` on one rank)."""
    if not active():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def gather_dicts(share: dict[str, Any]) -> dict[str, Any]:
    """The union of every rank's ``share`` on every rank (``gather``), keys sorted."""
    return dict(sorted(item for part in gather(share) for item in part.items()))


def wrap(
    module: nn.Module,
    strategy: str,
    layers: Iterable[nn.Module],
    device: torch.device,
    forward_methods: Sequence[str],
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """The module a data-parallel step backpropagates through: ``module`` itself on one rank; in
    DDP (``strategy="ddp"``) with gradients summed, not averaged, over the ranks; or sharded with
    FSDP2 (``"fsdp2"``: each of ``layers``, then ``module`` as the root), its reduce-scatter summing
    too, and ``forward_methods`` (``generate``) registered so they gather the root's parameters.
    With ``param_dtype`` (bfloat16 under ``trainer.precision=bf16-mixed``) FSDP2 gathers the
    float32 master shards cast to it and reduces the gradients in float32 (``MixedPrecisionPolicy``),
    so its all-gathers move half the bytes; the optimizer keeps the float32 shards.

    Summing (rather than averaging, whose divisor differs between DDP, FSDP2 on NCCL and FSDP2 on
    gloo, pytorch#162338) with global normalisers in the loss (``opdx.objective``) gives exactly
    the one-process gradient of the whole batch."""
    if not active():
        return module
    if strategy == "ddp":
        wrapped = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        wrapped.register_comm_hook(None, _sum_hook)
        return wrapped
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    for sharded in module.modules():
        if isinstance(sharded, FSDPModule):
            sharded.set_force_sum_reduction_for_comms(True)
            sharded.set_gradient_divide_factor(1.0)
    for name in forward_methods:
        register_fsdp_forward_method(module, name)
    return module


def _sum_hook(state, bucket):  # noqa: ANN001 (DDP checks the annotations, which postponed evaluation makes strings)
    """DDP communication hook: all-reduce a gradient bucket (a ``dist.GradBucket``) with SUM, where
    DDP's default averages; returns the future of the reduced ``Tensor``."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda future: future.value()[0])


def micro_batches(rows: int, size: int | None) -> list[Tensor]:
    """This rank's ``rows`` split into micro-batches of at most ``size`` sequences (None: one),
    consecutive and as even as can be, the same number on every rank (the most any rank needs):
    each micro-batch is a forward every rank runs (FSDP2 gathers its parameters in it)."""
    needed = -(-rows // size) if size else 1
    count, minus_fewest = global_max(torch.tensor([needed, -rows])).tolist()  # one collective for both
    if count > -minus_fewest:  # decided on every rank alike: none waits in a collective for another
        raise ValueError(f"a rank with {-minus_fewest} sequences cannot fill the {count} micro-batches another needs")
    return list(torch.arange(rows).tensor_split(count))


@contextmanager
def accumulating(module: nn.Module, last: bool) -> Iterator[None]:
    """A micro-batch's forward and backward whose gradients are reduced over the ranks only when
    ``last`` (DDP's ``no_sync``; FSDP2's ``set_requires_gradient_sync``), so a step reduces the
    summed gradients of its micro-batches once; on one rank nothing changes."""
    if last or not active():
        yield
    elif isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def drop_unsynced_gradients(module: nn.Module) -> None:
    """Forget the gradients FSDP2 accumulated on its unsharded parameters during micro-batches
    run without gradient sync (``accumulating``), which an optimizer's ``zero_grad`` does not
    reach: a skipped step must leave none for the next. FSDP2 keeps them on each ``FSDPParam``
    (``_unsharded_param.grad``, ``unsharded_accumulated_grad``: torch/distributed/fsdp/
    _fully_shard/_fsdp_param.py); DDP's ``no_sync`` accumulates in ``param.grad`` itself."""
    for sharded in module.modules():
        group = sharded._get_fsdp_state()._fsdp_param_group if isinstance(sharded, FSDPModule) else None
        for param in group.fsdp_params if group else []:
            unsharded = getattr(param, "_unsharded_param", None)
            if unsharded is not None:
                unsharded.grad = None
            param.unsharded_accumulated_grad = None


@contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """FSDP2 ``module``'s sharded layers kept gathered from their first forward to the end of the
    block, then resharded: ``generate`` all-gathers each layer once per rollout instead of once per
    layer and token (pytorch#125394: keep parameters unsharded for generation). The root keeps its
    own setting. Nothing changes for a module that is not sharded."""
    layers = [m for m in module.modules() if isinstance(m, FSDPModule) and m is not module]
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_reshard_after_forward(True, recurse=False)  # as wrap's fully_shard left it
            layer.reshard()
