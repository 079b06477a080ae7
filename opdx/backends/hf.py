"""Hugging Face backends: ``generate`` sampling and one-forward scoring of a local transformers model.

    opdx train rollout=hf teacher=hf     # conf/rollout/hf.yaml, conf/teacher/hf.yaml (the default)

Scoring goes through ``opdx.policy.TokenScores``, the module the trainer's with-grad forward
uses too; sampling uses ``generate`` of the same module (under FSDP2 its parameters are
gathered there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from opdx.backends import teacher_prompt_tokenizer
from opdx.benchmarks import Benchmark, Problem, privileged
from opdx.compat import PairError
from opdx.config import ConfigError, ModelConfig, check
from opdx.dist import gathered
from opdx.logits import HeadLogits, TopKOfLogits
from opdx.lora import has_adapters
from opdx.models import load_model
from opdx.policy import TokenScores, cache_argument, shared_prompt_cache, upcast
from opdx.prompts import encode_prompts
from opdx.rollout import PLAIN_SAMPLING, Rollout, SamplingParams, pad, response_mask


class SampledLogprobRecorder(LogitsProcessor):
    """Records log p of each sampled token under the final processed scores.

    Runs last in the processor list; at step t+1 the token sampled at step t is the last of
    ``input_ids``, so only one [B, V] log-softmax is alive at a time.
    """

    def __init__(self) -> None:
        self.previous_logp_B_V: Tensor | None = None
        self.logps: list[Tensor] = []

    def _gather_previous(self, sampled_B: Tensor) -> None:
        if self.previous_logp_B_V is not None:
            self.logps.append(self.previous_logp_B_V.gather(-1, sampled_B[:, None]).squeeze(-1))

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self._gather_previous(input_ids[:, -1])
        self.previous_logp_B_V = torch.log_softmax(upcast(scores), dim=-1)
        return scores

    def finish(self, last_sampled_B: Tensor) -> Tensor:
        self._gather_previous(last_sampled_B)
        self.previous_logp_B_V = None
        return torch.stack(self.logps, dim=1)


class DecodingProgress(LogitsProcessor):
    """Calls ``on_step()`` once per decoding step (a progress bar's update); scores pass unchanged."""

    def __init__(self, on_step: Callable[[], object]) -> None:
        self.on_step = on_step

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.on_step()
        return scores


class PaddingRowsOff(LogitsProcessor):
    """Scores of ids at or beyond the tokenizer's size set to -inf: padding rows are never sampled."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        return scores.index_fill(-1, torch.arange(self.vocab_size, scores.shape[-1], device=scores.device), -torch.inf)


class FiniteLogits(LogitsProcessor):
    """Raises PairError naming the model when its raw next-token scores hold a NaN or +inf (a
    float16 model that overflows, broken weights): sampling from them would fail inside ``generate``
    with "probability tensor contains either inf, nan or element < 0". Runs first; scores pass."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if torch.isnan(scores).any() or torch.isposinf(scores).any():
            rows = int((torch.isnan(scores) | torch.isposinf(scores)).any(-1).sum())
            raise PairError(
                f"{self.name} gives non-finite next-token scores (NaN or +inf) in {rows} of {len(scores)} sequences "
                "while sampling: its weights or dtype do not work (a float16 model that overflows: try bfloat16 or "
                "float32 through model.dtype / model.teacher_dtype)"
            )
        return scores


CACHES = ("dynamic", "static")


class HFModel:
    """A local transformers model as a sampler (``generate``) and a scorer (``TokenScores``).

    As the ``rollout=hf`` backend it samples from the training student itself, so a weight update
    has nothing to copy; as ``teacher=hf`` (``load_teacher``) it holds the frozen teacher.
    ``prompt_tokenizer`` renders its prompts when its chat template is not the one of ``tokenizer``
    (the pair's shared tokenizer, whose ids the responses use); ``stop_ids`` end a response (the
    pair's, ``opdx.models.stop_ids``; default the tokenizer's EOS); ``context`` is the number of
    positions the model has. ``cache`` is the KV cache ``generate`` decodes with: ``dynamic``
    (grows per token; rows that share a prompt share its prefill) or ``static`` (preallocated to
    prompt + max new tokens, which transformers compiles on GPUs: its first call compiles).
    """

    supports = ("sampled", "topk", "full")

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        logprob_chunk: int = 8192,
        prompt_tokenizer: PreTrainedTokenizerBase | None = None,
        cache: str = "dynamic",
        stop_ids: Sequence[int] | None = None,
    ) -> None:
        check(cache in CACHES, f"rollout.cache={cache!r} is invalid; valid: {', '.join(CACHES)}")
        self.cache = cache
        self.stop_ids = list(stop_ids or [tokenizer.eos_token_id])
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_tokenizer = prompt_tokenizer or tokenizer
        self.scores = TokenScores(model, logprob_chunk, len(tokenizer))
        self.generator = self.scores  # what generates: the trainer's (wrapped) student module, once handed over
        self.context = model.config.max_position_embeddings

    def prompt_ids(self, problems: Sequence[Problem | str]) -> list[list[int]]:
        """Each problem's prompt as this model sees it."""
        return encode_prompts(self.prompt_tokenizer, problems)

    @torch.no_grad()
    def sample(
        self,
        problems: Sequence[Problem | str],
        samples_per_prompt: int,
        max_new_tokens: int,
        params: SamplingParams = PLAIN_SAMPLING,
        greedy: bool = False,
        on_step: Callable[[], object] | None = None,
    ) -> Rollout:
        """``samples_per_prompt`` responses per problem (grouped: B = P * G, prompt-major); ``on_step``
        is called after every decoding step. With the dynamic cache, a prompt's prefill runs once
        for its group (``shared_prompt_cache``), not once per sample."""
        model, tokenizer = self.model, self.tokenizer
        problems_B = [problem for problem in problems for _ in range(samples_per_prompt)]
        prompt_tokens_B_L, prompt_mask_B_L = pad(self.prompt_ids(problems_B), tokenizer.pad_token_id, left=True)
        recorder = SampledLogprobRecorder()
        # Built-in warpers off (the model's own generation_config may set top_k / top_p): ours
        # run as processors so the recorder sees the scores actually sampled from.
        built_in_warpers_off = {} if greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
        config = GenerationConfig(
            do_sample=not greedy,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=self.stop_ids,
            bos_token_id=tokenizer.bos_token_id,
            cache_implementation=None if self.cache == "dynamic" else self.cache,
            **built_in_warpers_off,
        )
        padding_rows = model.get_output_embeddings().weight.shape[0] > len(tokenizer)
        processors = LogitsProcessorList([FiniteLogits(model.name_or_path)])
        processors += [PaddingRowsOff(len(tokenizer))] if padding_rows else []
        processors += ([] if greedy else list(params.warpers())) + [recorder]
        if on_step is not None:
            processors.append(DecodingProgress(on_step))
        sharded = isinstance(self.generator, FSDPModule)  # its parameters are gathered inside generate only
        prompt_tokens, prompt_mask = prompt_tokens_B_L.to(model.device), prompt_mask_B_L.to(model.device)
        shares = not sharded and self.cache == "dynamic"
        with self.weights(), gathered(self.generator):  # FSDP2: each layer gathered once, not per token
            cache = shared_prompt_cache(model, prompt_tokens, prompt_mask) if shares else None
            sequences_B_N = self.generator.generate(
                input_ids=prompt_tokens,
                attention_mask=prompt_mask,
                generation_config=config,
                **cache_argument(model, cache),
                logits_processor=processors,
                synced_gpus=sharded,  # every rank runs every decode step
            )
        response_tokens_B_T = sequences_B_N[:, prompt_tokens_B_L.shape[1] :].cpu()
        logp_sampling_B_T = recorder.finish(sequences_B_N[:, -1]).cpu()
        mask_B_T, finished_B = response_mask(response_tokens_B_T, self.stop_ids)
        return Rollout(
            prompt_tokens_B_L, prompt_mask_B_L, response_tokens_B_T, mask_B_T, logp_sampling_B_T, finished_B, problems_B
        )

    def update_weights(self, model: nn.Module, version: int) -> None:
        """Nothing to copy: this sampler generates with the trained module itself; handed the
        trainer's student module (``TokenScores``, maybe in DDP or FSDP2) it generates through it."""
        module = model.module if isinstance(model, DistributedDataParallel) else model
        if isinstance(module, TokenScores) and module.model is self.model:
            self.generator = module

    @contextmanager
    def weights(self) -> Iterator[None]:
        """The model as it samples and scores: in eval mode, put back in its mode afterwards, even
        on error."""
        training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(training)

    @torch.no_grad()
    def logprobs(self, rollout: Rollout) -> Tensor:
        with self.weights():
            return self.scores(self._own_prompts(rollout))

    @torch.no_grad()
    def dense(self, rollout: Rollout, top_k: int | None = None) -> HeadLogits | TopKOfLogits:
        with self.weights():
            logits = self.scores(self._own_prompts(rollout), logits=True)
        return logits if top_k is None else TopKOfLogits(logits, rollout.response_tokens_B_T, top_k)

    def renders_prompts(self) -> bool:
        """Whether this scorer renders a rollout's prompts itself (``prompt_ids``) rather than
        taking the student's tokens: when its chat template differs."""
        return self.prompt_tokenizer is not self.tokenizer

    def _own_prompts(self, rollout: Rollout) -> Rollout:
        """The rollout with its prompts as this model sees them (``prompt_ids``; same responses)."""
        if not self.renders_prompts():
            return rollout
        if rollout.problems is None:
            raise ValueError("this scorer renders prompts with its own chat template: the rollout needs its problems")
        prompt_tokens_B_L, prompt_mask_B_L = pad(self.prompt_ids(rollout.problems), self.tokenizer.pad_token_id, True)
        return replace(rollout, prompt_tokens_B_L=prompt_tokens_B_L, prompt_mask_B_L=prompt_mask_B_L)


def load_teacher(
    pair: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    logprob_chunk: int = 8192,
    prompt_template: str = "own",
    stop_ids: Sequence[int] | None = None,
) -> HFModel:
    """``teacher=hf``: the frozen teacher ``pair.teacher`` in ``pair.teacher_dtype``, in this process,
    its prompts rendered as ``teacher_prompt_tokenizer`` says, its answers ending at ``stop_ids``."""
    prompt_tokenizer = teacher_prompt_tokenizer(pair, tokenizer, prompt_template)
    teacher = load_model(pair.teacher, pair.teacher_dtype, device, tokenizer, trainable=False)
    return HFModel(teacher, tokenizer, logprob_chunk, prompt_tokenizer=prompt_tokenizer, stop_ids=stop_ids)


SELF_WEIGHTS = ("current", "initial")


class SelfTeacher(HFModel):
    """``teacher=self``: the student teaches itself, shown what it will not see at test time. It
    scores each response (and answers its own eval) with the prompt a benchmark gives a privileged
    reader (``privileged``: ``opdx.benchmarks.privileged``), with the student's model itself (no
    copy). ``frozen_base``: with the LoRA adapters off (``PreTrainedModel.disable_adapters``), so
    the frozen base model scores. Its scores are taken without grad, as every teacher's, so the
    teacher is held constant in the student's gradient though it shares its weights."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        privileged: Callable[[Problem], Problem],
        frozen_base: bool = False,
        logprob_chunk: int = 8192,
        stop_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__(model, tokenizer, logprob_chunk, stop_ids=stop_ids)
        self.privileged, self.frozen_base = privileged, frozen_base

    def update_weights(self, model: nn.Module, version: int) -> None:
        """Handed the trainer's student module (``TokenScores``, maybe in DDP or FSDP2) when this
        teacher shares its model: score and answer through it, so FSDP2 gathers its shards and
        ``trainer.precision`` applies as in training. A frozen copy takes nothing."""
        module = model.module if isinstance(model, DistributedDataParallel) else model
        if isinstance(module, TokenScores) and module.model is self.model:
            self.scores = self.generator = module

    def renders_prompts(self) -> bool:
        """Always: the privileged prompt is never the student's."""
        return True

    def prompt_ids(self, problems: Sequence[Problem | str]) -> list[list[int]]:
        """Each problem's privileged prompt (``privileged``) as token ids."""
        return super().prompt_ids([self.privileged(p) if isinstance(p, Problem) else p for p in problems])

    @contextmanager
    def weights(self) -> Iterator[None]:
        """The model as it teaches: in eval mode (no adapter dropout), with the adapters off for
        ``frozen_base``; the student's mode and adapters as they were afterwards, even on error."""
        with super().weights():
            if not self.frozen_base:
                yield
                return
            self.model.disable_adapters()
            try:
                yield
            finally:
                self.model.enable_adapters()


def load_self_teacher(
    pair: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    student: PreTrainedModel,
    benchmark: Benchmark,
    logprob_chunk: int = 8192,
    stop_ids: Sequence[int] | None = None,
    weights: str = "current",
    context: str = "reference",
) -> SelfTeacher:
    """``teacher=self`` (``SelfTeacher``) on ``benchmark``'s privileged prompts (``context``:
    ``opdx.benchmarks.CONTEXTS``). ``weights``: ``current``, the student being trained; ``initial``,
    its weights at the start: a LoRA student's frozen base (no copy), else a frozen copy of
    ``pair.student``. Sharing the student, it scores through the trainer's module once handed it
    (``SelfTeacher.update_weights``). In a mixture each problem gets its own component's privileged
    prompt. ConfigError for a bad option or a context a benchmark cannot give."""
    check(weights in SELF_WEIGHTS, f"teacher.weights={weights!r} is invalid; valid: {', '.join(SELF_WEIGHTS)}")
    frozen_base = weights == "initial" and has_adapters(student)
    shares = weights == "current" or frozen_base
    try:
        for component in benchmark.components:  # a context a benchmark cannot give fails here, before training
            for problem in component.eval[:1]:
                privileged(benchmark, problem, context)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    model = student if shares else load_model(pair.student, pair.dtype, device, tokenizer, trainable=False)
    return SelfTeacher(
        model, tokenizer, lambda problem: privileged(benchmark, problem, context), frozen_base, logprob_chunk, stop_ids
    )


load_self_teacher.memory = "student"  # opdx.run.memory_plan: the student's weights, shared or copied
