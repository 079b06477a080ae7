"""Hugging Face backends: ``generate`` sampling and one-forward scoring of a local transformers model.

    opdx train rollout=hf teacher=hf     # conf/rollout/hf.yaml, conf/teacher/hf.yaml (the default)

``TokenScores`` is the one ``nn.Module`` whose ``forward`` gives the log-probs (or logits) of a
rollout's response tokens: the student's with-grad forward goes through it, so wrapping *it* in
``DistributedDataParallel`` or FSDP2 puts the wrapper's hooks on the path; the teacher scores
with the same module under ``torch.no_grad``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import cache as cache_result
from functools import partial

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.cache_utils import CacheLayerMixin

from opdx.benchmarks import Problem
from opdx.compat import PairError, vocab_logits
from opdx.config import ModelConfig, check
from opdx.models import load_model, load_tokenizer_of
from opdx.prompts import encode_prompts
from opdx.rollout import PLAIN_SAMPLING, Rollout, SamplingParams, gather_logprobs, pad, response_mask


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


class TokenScores(nn.Module):
    """log p(response token | prefix) of a rollout under a causal LM, [B, T] on the CPU,
    or with ``logits=True`` the next-token logits at each response position, [B, T, V], both in
    float32 at least (float64 for a float64 model).
    Both are over the tokenizer's ``vocab_size`` ids (output rows beyond it are padding: left out,
    ``opdx.compat.vocab_logits``) and warped by ``params`` (the distribution sampled from; the
    teacher uses the plain one).

    Log-probs are made ``chunk_size`` positions at a time; with grad enabled each chunk is
    recomputed in backward (activation checkpointing), so no full [B, T, V] tensor is kept.
    """

    def __init__(self, model: PreTrainedModel, chunk_size: int = 128, vocab_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.vocab_size = vocab_size or model.get_output_embeddings().weight.shape[0]

    def forward(self, rollout: Rollout, params: SamplingParams = PLAIN_SAMPLING, logits: bool = False) -> Tensor:
        hidden_B_T_D = self._hidden_states(rollout)
        lm_head = self.model.get_output_embeddings()
        if logits:
            logits_B_T_V = upcast(vocab_logits(lm_head(hidden_B_T_D), self.vocab_size))
            return params.warp(logits_B_T_V.flatten(0, 1)).view_as(logits_B_T_V)
        tokens_B_T = rollout.response_tokens_B_T.to(hidden_B_T_D.device)
        chunks = []
        for start in range(0, tokens_B_T.shape[1], self.chunk_size):
            end = start + self.chunk_size
            args = (lm_head, params, self.vocab_size, hidden_B_T_D[:, start:end], tokens_B_T[:, start:end])
            if torch.is_grad_enabled():
                chunks.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False))
            else:
                chunks.append(_chunk_logprobs(*args))
        return torch.cat(chunks, dim=1).cpu()

    def generate(self, **kwargs: object) -> Tensor:
        """The model's ``generate``, through this module: under FSDP2 it is registered as a forward
        method of the sharded root (``register_fsdp_forward_method``), so its parameters are gathered."""
        return self.model.generate(**kwargs)

    def _hidden_states(self, rollout: Rollout) -> Tensor:
        """Final hidden states at the positions that predict each response token, [B, T, D].

        Rows that share a prompt (a group of samples) share its forward (``shared_prompt_cache``):
        the same function as one forward per row, with the prompt's cost divided by the group
        size, where ``_may_share``; elsewhere every row runs whole."""
        device = self.model.device
        prompt_B_L, prompt_mask_B_L = rollout.prompt_tokens_B_L.to(device), rollout.prompt_mask_B_L.to(device)
        tokens_B_N = torch.cat([prompt_B_L, rollout.response_tokens_B_T[:, :-1].to(device)], dim=1)
        attention_B_N = torch.cat([prompt_mask_B_L, torch.ones_like(rollout.response_tokens_B_T[:, :-1]).to(device)], 1)
        position_ids_B_N = (attention_B_N.cumsum(-1) - 1).clamp(min=0)
        prefix = prompt_B_L.shape[1] - 1  # the positions before the first one that predicts a response token
        may_share = self._may_share()
        cache = shared_prompt_cache(self.model, prompt_B_L, prompt_mask_B_L, read_only=True) if may_share else None
        start = 0 if cache is None else prefix  # the first position this forward runs
        out = self.model.base_model(
            input_ids=tokens_B_N[:, start:],
            attention_mask=attention_B_N,
            position_ids=position_ids_B_N[:, start:],
            use_cache=cache is not None,
            **cache_argument(self.model, cache),
        )
        return out.last_hidden_state[:, prefix - start :]

    def _may_share(self) -> bool:
        """Whether the prompt's forward may be shared: not where activation checkpointing would
        run (HF's checkpointed layers drop a cache) nor under FSDP2 (whose backward cannot take a
        layer run twice in one forward: it reshards in between)."""
        checkpointing = any(getattr(module, "gradient_checkpointing", False) for module in self.model.modules())
        checkpointed = checkpointing and torch.is_grad_enabled() and self.model.training
        return not isinstance(self, FSDPModule) and not checkpointed


def shared_prompt_cache(
    model: PreTrainedModel, prompt_B_L: Tensor, prompt_mask_B_L: Tensor, read_only: bool = False
) -> DynamicCache | None:
    """The keys and values of every row's prompt but its last token ([B, L-1] positions, left
    padded), computed once per distinct prompt and indexed out to the rows that share it; None
    when no two rows share a prompt (or the prompts are one token), where it would save nothing,
    or when the model did not fill the cache (a model whose forward takes no such cache).

    ``read_only``: a forward on the cache reads the prompt's keys and values joined to its own
    and stores nothing (``_joined``), so a one-shot scoring forward holds no copy of the whole
    sequence's keys and values per layer; ``generate`` needs the default, which grows per token.
    With grad enabled the cache carries the graph, so gradients reach the prompt through every row
    that reads it (autograd sums them at the indexing). Values equal one forward per row to
    floating-point rounding (the model's float32 norms make that ~1e-7 relative, float64 too)."""
    distinct_U_2L, row_B = torch.unique(torch.cat([prompt_B_L, prompt_mask_B_L], 1), dim=0, return_inverse=True)
    prefix = prompt_B_L.shape[1] - 1
    if prefix == 0 or len(distinct_U_2L) == len(row_B):
        return None
    prompt_U_L, prompt_mask_U_L = distinct_U_2L.split(prompt_B_L.shape[1], dim=1)
    cache = DynamicCache(config=model.config)
    model.base_model(
        input_ids=prompt_U_L[:, :prefix],
        attention_mask=prompt_mask_U_L[:, :prefix],
        position_ids=(prompt_mask_U_L[:, :prefix].cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        **cache_argument(model, cache),
    )
    if cache.get_seq_length() != prefix:
        return None
    cache.batch_select_indices(row_B)
    if read_only:
        for layer in cache.layers:
            layer.update = partial(_joined, layer)
    return cache


def _joined(layer: CacheLayerMixin, key_states: Tensor, value_states: Tensor, *_: object, **__: object) -> tuple:
    """A cache layer's keys and values with ``key_states`` / ``value_states`` appended, the layer
    unchanged (what ``DynamicLayer.update`` and the sliding-window layer return, without storing)."""
    return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


def cache_argument(model: PreTrainedModel, cache: DynamicCache | None) -> dict[str, DynamicCache | None]:
    """``cache`` as the keyword this transformers takes in forward and ``generate``: ``cache``
    where the model's forward names it so (later 5.x, where ``past_key_values`` is deprecated),
    else ``past_key_values``."""
    return {_cache_keyword(type(model.base_model)): cache}


@cache_result
def _cache_keyword(base_model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(base_model_class.forward).parameters else "past_key_values"


def upcast(logits: Tensor) -> Tensor:
    """Logits in float32 at least (bfloat16 and float16 upcast; float64 stays float64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunk_logprobs(
    lm_head: nn.Module, params: SamplingParams, vocab_size: int, hidden_B_C_D: Tensor, tokens_B_C: Tensor
) -> Tensor:
    logits_B_C_V = upcast(vocab_logits(lm_head(hidden_B_C_D), vocab_size))
    logits_B_C_V = params.warp(logits_B_C_V.flatten(0, 1)).view_as(logits_B_C_V)
    return gather_logprobs(logits_B_C_V, tokens_B_C)


class PaddingRowsOff(LogitsProcessor):
    """Scores of ids at or beyond the tokenizer's size set to -inf: padding rows are never sampled."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        return scores.index_fill(-1, torch.arange(self.vocab_size, scores.shape[-1], device=scores.device), -torch.inf)


CACHES = ("dynamic", "static")


class HFModel:
    """A local transformers model as a sampler (``generate``) and a scorer (``TokenScores``).

    As the ``rollout=hf`` backend it samples from the training student itself, so a weight update
    has nothing to copy; as ``teacher=hf`` (``load_teacher``) it holds the frozen teacher.
    ``prompt_tokenizer`` renders its prompts when its chat template is not the one of ``tokenizer``
    (the pair's shared tokenizer, whose ids and EOS the responses use); ``context`` is the number
    of positions the model has. ``cache`` is the KV cache ``generate`` decodes with: ``dynamic``
    (grows per token; rows that share a prompt share its prefill) or ``static`` (preallocated to
    prompt + max new tokens, which transformers compiles on GPUs: its first call compiles).
    """

    supports_logits = True

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        logprob_chunk: int = 128,
        prompt_tokenizer: PreTrainedTokenizerBase | None = None,
        cache: str = "dynamic",
    ) -> None:
        check(cache in CACHES, f"rollout.cache={cache!r} is invalid; valid: {', '.join(CACHES)}")
        self.cache = cache
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
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            cache_implementation=None if self.cache == "dynamic" else self.cache,
            **built_in_warpers_off,
        )
        padding_rows = model.get_output_embeddings().weight.shape[0] > len(tokenizer)
        processors = LogitsProcessorList([PaddingRowsOff(len(tokenizer))] if padding_rows else [])
        processors += ([] if greedy else list(params.warpers())) + [recorder]
        if on_step is not None:
            processors.append(DecodingProgress(on_step))
        was_training = model.training
        model.eval()
        sharded = isinstance(self.generator, FSDPModule)  # its parameters are gathered inside generate only
        prompt_tokens, prompt_mask = prompt_tokens_B_L.to(model.device), prompt_mask_B_L.to(model.device)
        shares = not sharded and self.cache == "dynamic"
        cache = shared_prompt_cache(model, prompt_tokens, prompt_mask) if shares else None
        sequences_B_N = self.generator.generate(
            input_ids=prompt_tokens,
            attention_mask=prompt_mask,
            generation_config=config,
            **cache_argument(model, cache),
            logits_processor=processors,
            synced_gpus=sharded,  # every rank runs every decode step
        )
        model.train(was_training)
        response_tokens_B_T = sequences_B_N[:, prompt_tokens_B_L.shape[1] :].cpu()
        logp_sampling_B_T = recorder.finish(sequences_B_N[:, -1]).cpu()
        mask_B_T, finished_B = response_mask(response_tokens_B_T, tokenizer.eos_token_id)
        return Rollout(
            prompt_tokens_B_L, prompt_mask_B_L, response_tokens_B_T, mask_B_T, logp_sampling_B_T, finished_B, problems_B
        )

    def update_weights(self, model: nn.Module) -> None:
        """Nothing to copy: this sampler generates with the trained module itself; handed the
        trainer's student module (``TokenScores``, maybe in DDP or FSDP2) it generates through it."""
        module = model.module if isinstance(model, DistributedDataParallel) else model
        if isinstance(module, TokenScores) and module.model is self.model:
            self.generator = module

    @torch.no_grad()
    def logprobs(self, rollout: Rollout) -> Tensor:
        return self.scores(self._own_prompts(rollout))

    @torch.no_grad()
    def logits(self, rollout: Rollout) -> Tensor:
        return self.scores(self._own_prompts(rollout), logits=True)

    def _own_prompts(self, rollout: Rollout) -> Rollout:
        """The rollout with its prompts rendered by this model's own chat template (same responses)."""
        if self.prompt_tokenizer is self.tokenizer:
            return rollout
        if rollout.problems is None:
            raise ValueError("this scorer renders prompts with its own chat template: the rollout needs its problems")
        prompt_tokens_B_L, prompt_mask_B_L = pad(self.prompt_ids(rollout.problems), self.tokenizer.pad_token_id, True)
        return replace(rollout, prompt_tokens_B_L=prompt_tokens_B_L, prompt_mask_B_L=prompt_mask_B_L)


PROMPT_TEMPLATES = ("own", "student")


def load_teacher(
    pair: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    logprob_chunk: int = 128,
    prompt_template: str = "own",
) -> HFModel:
    """``teacher=hf``: the frozen teacher ``pair.teacher`` in ``pair.teacher_dtype``, in this process,
    its prompts rendered as ``teacher_prompt_tokenizer`` says."""
    prompt_tokenizer = teacher_prompt_tokenizer(pair, tokenizer, prompt_template)
    teacher = load_model(pair.teacher, pair.teacher_dtype, device, tokenizer, trainable=False)
    return HFModel(teacher, tokenizer, logprob_chunk, prompt_tokenizer=prompt_tokenizer)


def teacher_prompt_tokenizer(
    pair: ModelConfig, tokenizer: PreTrainedTokenizerBase, prompt_template: str
) -> PreTrainedTokenizerBase:
    """The tokenizer whose chat template renders the prompts the teacher scores and answers.

    ``prompt_template="own"``: the teacher's own (``pair.teacher``'s) when it differs from the
    student's (an instruct teacher and a base student); the response token ids stay the student's.
    ``"student"``: the student's. PairError naming a bad value."""
    if prompt_template not in PROMPT_TEMPLATES:
        raise PairError(f"teacher.prompt_template={prompt_template!r} is invalid; valid: {', '.join(PROMPT_TEMPLATES)}")
    own = load_tokenizer_of(pair.teacher)
    if own.chat_template == tokenizer.chat_template:
        return tokenizer
    if prompt_template == "student":
        print("teacher: prompts rendered with the student's chat template (teacher.prompt_template=student)")
        return tokenizer
    print("teacher: prompts rendered with its own chat template, not the student's (the responses stay the student's)")
    return own
