"""Sampling from the student and log-probabilities of sampled tokens.

Shapes: B sequences, L prompt positions (left-padded), T response positions, V vocabulary,
D hidden size. ``logp_*_B_T[b, t]`` is log p(response_B_T[b, t] | prompt, response[b, <t]).

The log-probabilities recorded while sampling are those of the distribution actually sampled
from (after temperature / top-k / top-p), and the same ``warp`` is applied when the student's
log-probs are recomputed with grad, so u = q/p always uses that distribution.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from opdx.benchmarks import Problem


@dataclass(frozen=True)
class SamplingParams:
    """Temperature 1 with no top-k / top-p samples from the student's own distribution."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def is_plain(self) -> bool:
        return self.temperature == 1.0 and self.top_k == 0 and self.top_p >= 1.0

    def warpers(self) -> LogitsProcessorList:
        warpers = LogitsProcessorList()
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        return warpers

    def warp(self, logits_N_V: Tensor) -> Tensor:
        """The logits of the distribution actually sampled from, for [N, V] rows."""
        for warper in self.warpers():
            logits_N_V = warper(None, logits_N_V)
        return logits_N_V


PLAIN_SAMPLING = SamplingParams()


@dataclass
class Rollout:
    """Left-padded prompts and right-padded responses; ``response_mask_B_T`` marks tokens up to
    and including the first EOS (all of a response that hit the length limit)."""

    prompt_tokens_B_L: Tensor
    prompt_mask_B_L: Tensor
    response_tokens_B_T: Tensor
    response_mask_B_T: Tensor
    logp_sampling_B_T: Tensor | None = None
    finished_B: Tensor | None = None

    @classmethod
    def from_token_lists(
        cls, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
    ) -> Rollout:
        prompt_tokens_B_L, prompt_mask_B_L = pad(prompts, pad_id, left=True)
        response_tokens_B_T, response_mask_B_T = pad(responses, pad_id, left=False)
        return cls(prompt_tokens_B_L, prompt_mask_B_L, response_tokens_B_T, response_mask_B_T.bool())

    @property
    def lengths_B(self) -> Tensor:
        return self.response_mask_B_T.sum(-1)


def pad(sequences: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[Tensor, Tensor]:
    """Pad token lists to a [B, N] tensor and its 0/1 mask."""
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        tokens[i, span] = torch.tensor(list(seq), dtype=torch.long)
        mask[i, span] = 1
    return tokens, mask


TOOLS_INSTRUCTION = (
    "You can call these functions. To call one, answer with "
    '<tool_call>{"name": <function name>, "arguments": <arguments as a JSON object>}</tool_call>, '
    "one block per call.\n<tools>\n"
)


def chat_messages(problem: Problem, template_has_tools: bool) -> list[dict[str, str]]:
    """System (if any) and user messages; tool schemas go into the system message when the
    chat template cannot take ``tools=`` itself."""
    system = problem.system
    if problem.tools and not template_has_tools:
        schemas = "\n".join(json.dumps(tool) for tool in problem.tools)
        system = f"{system}\n\n" if system else ""
        system += f"{TOOLS_INSTRUCTION}{schemas}\n</tools>"
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": problem.prompt}]


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Problem | str]) -> list[list[int]]:
    """Token ids of each prompt (a Problem, or a bare user message): the chat template when the
    tokenizer has one (with the problem's tool schemas, through ``tools=`` when the template
    handles them), else the plain encoding with the tokenizer's own special tokens (BOS for the
    tiny tokenizer)."""
    problems = [Problem(prompt=p, answer="") if isinstance(p, str) else p for p in prompts]
    if not tokenizer.chat_template:
        if any(p.system or p.tools for p in problems):
            raise ValueError("system messages and tools need a tokenizer with a chat template")
        return tokenizer([p.prompt for p in problems])["input_ids"]
    template_has_tools = "tools" in tokenizer.chat_template
    return [
        tokenizer.apply_chat_template(
            chat_messages(problem, template_has_tools),
            tools=problem.tools if template_has_tools else None,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for problem in problems
    ]


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
        self.previous_logp_B_V = torch.log_softmax(scores.float(), dim=-1)
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


def response_mask(response_tokens_B_T: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor]:
    """Mask of tokens up to and including the first EOS, and whether an EOS was emitted."""
    is_eos_B_T = response_tokens_B_T == eos_token_id
    finished_B = is_eos_B_T.any(-1)
    eos_before_B_T = (is_eos_B_T.long().cumsum(-1) - is_eos_B_T.long()) > 0
    return ~eos_before_B_T, finished_B


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Problem | str],
    samples_per_prompt: int,
    max_new_tokens: int,
    params: SamplingParams = PLAIN_SAMPLING,
    greedy: bool = False,
    on_step: Callable[[], object] | None = None,
) -> Rollout:
    """``samples_per_prompt`` responses per prompt (grouped: B = P * G, prompt-major); ``on_step``
    is called after every decoding step."""
    prompt_ids = [ids for ids in encode_prompts(tokenizer, prompts) for _ in range(samples_per_prompt)]
    prompt_tokens_B_L, prompt_mask_B_L = pad(prompt_ids, tokenizer.pad_token_id, left=True)
    device = model.device
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
        **built_in_warpers_off,
    )
    processors = LogitsProcessorList(([] if greedy else list(params.warpers())) + [recorder])
    if on_step is not None:
        processors.append(DecodingProgress(on_step))
    was_training = model.training
    model.eval()
    sequences_B_N = model.generate(
        input_ids=prompt_tokens_B_L.to(device),
        attention_mask=prompt_mask_B_L.to(device),
        generation_config=config,
        logits_processor=processors,
    )
    model.train(was_training)
    response_tokens_B_T = sequences_B_N[:, prompt_tokens_B_L.shape[1] :].cpu()
    logp_sampling_B_T = recorder.finish(sequences_B_N[:, -1]).cpu()
    mask_B_T, finished_B = response_mask(response_tokens_B_T, tokenizer.eos_token_id)
    return Rollout(prompt_tokens_B_L, prompt_mask_B_L, response_tokens_B_T, mask_B_T, logp_sampling_B_T, finished_B)


def gather_logprobs(logits_B_T_V: Tensor, tokens_B_T: Tensor) -> Tensor:
    """log softmax(logits)[token] at every position, [B, T]."""
    return torch.log_softmax(logits_B_T_V, dim=-1).gather(-1, tokens_B_T.unsqueeze(-1)).squeeze(-1)


def _chunk_logprobs(
    lm_head: torch.nn.Module, params: SamplingParams, hidden_B_C_D: Tensor, tokens_B_C: Tensor
) -> Tensor:
    logits_B_C_V = lm_head(hidden_B_C_D).float()
    logits_B_C_V = params.warp(logits_B_C_V.flatten(0, 1)).view_as(logits_B_C_V)
    return gather_logprobs(logits_B_C_V, tokens_B_C)


def sequence_hidden_states(model: PreTrainedModel, rollout: Rollout) -> Tensor:
    """Final hidden states at the positions that predict each response token, [B, T, D]."""
    device = model.device
    tokens_B_N = torch.cat([rollout.prompt_tokens_B_L, rollout.response_tokens_B_T[:, :-1]], dim=1).to(device)
    attention_B_N = torch.cat(
        [rollout.prompt_mask_B_L, torch.ones_like(rollout.response_tokens_B_T[:, :-1])], dim=1
    ).to(device)
    position_ids_B_N = (attention_B_N.cumsum(-1) - 1).clamp(min=0)
    out = model.base_model(
        input_ids=tokens_B_N, attention_mask=attention_B_N, position_ids=position_ids_B_N, use_cache=False
    )
    return out.last_hidden_state[:, rollout.prompt_tokens_B_L.shape[1] - 1 :]


def sequence_logprobs(
    model: PreTrainedModel, rollout: Rollout, params: SamplingParams = PLAIN_SAMPLING, chunk_size: int = 128
) -> Tensor:
    """log p(response token | prefix) under ``model`` (warped by ``params``), [B, T], float32.

    Logits are made ``chunk_size`` positions at a time; with grad enabled each chunk is
    recomputed in backward (activation checkpointing), so no full [B, T, V] tensor is kept.
    """
    hidden_B_T_D = sequence_hidden_states(model, rollout)
    tokens_B_T = rollout.response_tokens_B_T.to(hidden_B_T_D.device)
    lm_head = model.get_output_embeddings()
    chunks = []
    for start in range(0, tokens_B_T.shape[1], chunk_size):
        args = (lm_head, params, hidden_B_T_D[:, start : start + chunk_size], tokens_B_T[:, start : start + chunk_size])
        if torch.is_grad_enabled():
            chunks.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            chunks.append(_chunk_logprobs(*args))
    return torch.cat(chunks, dim=1).cpu()


def sequence_logits(model: PreTrainedModel, rollout: Rollout, params: SamplingParams = PLAIN_SAMPLING) -> Tensor:
    """Full warped next-token logits at each response position, [B, T, V] (analytic estimator)."""
    hidden_B_T_D = sequence_hidden_states(model, rollout)
    logits_B_T_V = model.get_output_embeddings()(hidden_B_T_D).float()
    return params.warp(logits_B_T_V.flatten(0, 1)).view_as(logits_B_T_V)


def decode_responses(tokenizer: PreTrainedTokenizerBase, rollout: Rollout) -> list[str]:
    return [
        tokenizer.decode(tokens[mask].tolist(), skip_special_tokens=True)
        for tokens, mask in zip(rollout.response_tokens_B_T, rollout.response_mask_B_T, strict=True)
    ]
