"""The ``opdx_shm`` weight-transfer engine: a vLLM server's workers load the trainer's weights from
a safetensors file in shared memory (``/dev/shm``), through vLLM's RL serving API.

vLLM 0.32's own engines (``vllm/distributed/weight_transfer/``: nccl, ipc, ...) all need CUDA, so a
CPU server needs another. vLLM lets one register (``WeightTransferEngineFactory.register_engine``),
but the registry is per process and the engine is built in the worker process; a server started
with ``--worker-extension-cls opdx.backends.shm_transfer.ShmTransfer`` imports this module in each
worker before its model loads (``vllm/v1/worker/worker_base.py``), which registers the engine, and
``--weight-transfer-config '{"backend": "opdx_shm"}'`` selects it.

The worker side loads checkpoint-format tensors the way vLLM's nccl engine does: vLLM's layerwise
reload (``initialize_layerwise_reload`` at ``/start_weight_update``, ``model.load_weights`` per
``/update_weights {"update_info": {"path": ...}}``, ``finalize_layerwise_reload`` at
``/finish_weight_update``), which copies into the existing tensors (CUDA graphs stay valid). The
trainer side (``opdx.backends.student_server``) writes the file, sends the calls and deletes it.
This module runs inside vLLM's worker: it imports vLLM, torch and safetensors only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from safetensors import safe_open
from vllm.distributed.weight_transfer.base import WeightTransferEngine
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

BACKEND = "opdx_shm"


@dataclass
class ShmInitInfo:
    """Nothing to set up: the file names come with each update."""


@dataclass
class ShmUpdateInfo:
    """``path``: a safetensors file of checkpoint-named tensors, readable by the server's workers."""

    path: str


class ShmWeightTransferEngine(WeightTransferEngine[ShmInitInfo, ShmUpdateInfo]):
    """Loads each update's safetensors file into the served model (vLLM's layerwise reload)."""

    init_info_cls = ShmInitInfo
    update_info_cls = ShmUpdateInfo

    def init_transfer_engine(self, init_info: ShmInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: ShmUpdateInfo) -> None:
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        with safe_open(update_info.path, framework="pt", device="cpu") as file, disable_mtp_completeness_check():
            self.model.load_weights((name, file.get_tensor(name)) for name in file.keys())  # noqa: SIM118

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        pass


class ShmTransfer:
    """The ``--worker-extension-cls`` whose import registers ``opdx_shm`` in a vLLM worker. It adds
    nothing to the worker (vLLM checks each attribute of an extension against the worker's)."""


with contextlib.suppress(ValueError):  # imported twice in one process
    WeightTransferEngineFactory.register_engine(BACKEND, ShmWeightTransferEngine)
