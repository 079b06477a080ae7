"""Rollouts as data: token ids, masks and the log-probs the sampler recorded, whatever sampled them.

Shapes: B sequences, L prompt positions (left-padded), T response positions, V vocabulary.
``logp_*_B_T[b, t]`` is log p(response_B_T[b, t] | prompt, response[b, <t]).

The log-probs a sampler records are those of the distribution actually sampled from (after
temperature / top-k / top-p, ``SamplingParams.warp``), and the same warp is applied when the
student's log-probs are recomputed with grad, so u = q/p always uses that distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from transformers import (
    LogitsProcessorList,
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

    def warp(self, logits_S_V: Tensor) -> Tensor:
        """The logits of the distribution actually sampled from, for [S, V] rows (states)."""
        for warper in self.warpers():
            logits_S_V = warper(None, logits_S_V)
        return logits_S_V


PLAIN_SAMPLING = SamplingParams()


@dataclass
class Rollout:
    """Left-padded prompts and right-padded responses; ``response_mask_B_T`` marks tokens up to
    and including the first EOS (all of a response that hit the length limit). ``problems`` holds
    the problem of each sequence, for a scorer that renders prompts with its own chat template.
    ``weight_version_B`` (int64), where the sampler records it, is the version of the weights that
    sampled each row (``Sampler.update_weights``: the training steps they had taken; the oldest,
    were a row's tokens to span several)."""

    prompt_tokens_B_L: Tensor
    prompt_mask_B_L: Tensor
    response_tokens_B_T: Tensor
    response_mask_B_T: Tensor
    logp_sampling_B_T: Tensor | None = None
    finished_B: Tensor | None = None
    problems: list[Problem | str] | None = None
    weight_version_B: Tensor | None = None

    @classmethod
    def from_token_lists(
        cls, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
    ) -> Rollout:
        prompt_tokens_B_L, prompt_mask_B_L = pad(prompts, pad_id, left=True)
        response_tokens_B_T, response_mask_B_T = pad(responses, pad_id, left=False)
        return cls(prompt_tokens_B_L, prompt_mask_B_L, response_tokens_B_T, response_mask_B_T.bool())

    @classmethod
    def from_samples(
        cls,
        problems: Sequence[Problem | str],
        prompts_P: Sequence[Sequence[int]],
        responses_B: Sequence[Sequence[int]],
        finished_B: Sequence[bool],
        pad_id: int,
        logps_B: Sequence[Sequence[float]] | None = None,
        versions_B: Sequence[int] | None = None,
    ) -> Rollout:
        """A rollout from an engine's samples: G = B / P responses per prompt (prompt-major), each
        whole (up to and including its EOS, or cut at the length limit), with the sampled tokens'
        log-probs (0 beyond a response's end) and the weight version of each row when given."""
        samples = len(responses_B) // max(len(prompts_P), 1)
        if not prompts_P or samples * len(prompts_P) != len(responses_B) or len(finished_B) != len(responses_B):
            raise ValueError(
                f"an engine returned {len(responses_B)} responses ({len(finished_B)} finish flags) for "
                f"{len(prompts_P)} prompts: not the same number per prompt"
            )
        prompts_B = [ids for ids in prompts_P for _ in range(samples)]
        rollout = cls.from_token_lists(prompts_B, responses_B, pad_id)
        rollout.finished_B = torch.tensor(list(finished_B), dtype=torch.bool)
        rollout.problems = [problem for problem in problems for _ in range(samples)]
        if logps_B is not None:
            rollout.logp_sampling_B_T = torch.zeros(rollout.response_tokens_B_T.shape)
            for row, logps in enumerate(logps_B):
                rollout.logp_sampling_B_T[row, : len(logps)] = torch.tensor(logps)
        if versions_B is not None:
            rollout.weight_version_B = torch.tensor(list(versions_B), dtype=torch.long)
        return rollout

    @classmethod
    def concat(cls, rollouts: Sequence[Rollout]) -> Rollout:
        """The rows of ``rollouts`` in order, prompts left-padded and responses right-padded to the
        widest (padding masked, its token ids 0, its sampled log-probs 0; a padded response column
        is beyond every stop). One rollout is returned as it is."""
        if len(rollouts) == 1:
            return rollouts[0]

        def joined(name: str, left: bool = False) -> Tensor | None:
            tensors = [getattr(rollout, name) for rollout in rollouts]
            if any(tensor is None for tensor in tensors):
                return None
            width = max(tensor.shape[-1] for tensor in tensors)
            pads = [(width - tensor.shape[-1], 0) if left else (0, width - tensor.shape[-1]) for tensor in tensors]
            return torch.cat([torch.nn.functional.pad(tensor, pad) for tensor, pad in zip(tensors, pads, strict=True)])

        problems = [rollout.problems for rollout in rollouts]

        def rows(name: str) -> Tensor | None:
            tensors = [getattr(rollout, name) for rollout in rollouts]
            return None if any(tensor is None for tensor in tensors) else torch.cat(tensors)

        return cls(
            joined("prompt_tokens_B_L", left=True),
            joined("prompt_mask_B_L", left=True),
            joined("response_tokens_B_T"),
            joined("response_mask_B_T"),
            joined("logp_sampling_B_T"),
            rows("finished_B"),
            None if None in problems else [problem for part in problems for problem in part],
            rows("weight_version_B"),
        )

    def select(self, rows: Sequence[int]) -> Rollout:
        """The rollout of ``rows`` (in that order), its prompt columns that are padding in all of
        them left out; the response columns stay (T), so results scatter back by row."""
        rows_b = torch.tensor(list(rows), dtype=torch.long)
        prompt_mask_b_L = self.prompt_mask_B_L[rows_b]
        first = int((prompt_mask_b_L.sum(0) > 0).long().argmax()) if prompt_mask_b_L.any() else 0
        return Rollout(
            self.prompt_tokens_B_L[rows_b, first:],
            prompt_mask_b_L[:, first:],
            self.response_tokens_B_T[rows_b],
            self.response_mask_B_T[rows_b],
            None if self.logp_sampling_B_T is None else self.logp_sampling_B_T[rows_b],
            None if self.finished_B is None else self.finished_B[rows_b],
            None if self.problems is None else [self.problems[i] for i in rows],
            None if self.weight_version_B is None else self.weight_version_B[rows_b],
        )

    def trimmed(self) -> Rollout:
        """The rollout without the response columns beyond its longest response (masked in every
        row; one column is kept): a micro-batch's forward then spans its own longest response."""
        width = max(1, int(self.lengths_B.max()))
        cut = {name: getattr(self, name)[:, :width] for name in ("response_tokens_B_T", "response_mask_B_T")}
        logp = None if self.logp_sampling_B_T is None else self.logp_sampling_B_T[:, :width]
        return replace(self, **cut, logp_sampling_B_T=logp)

    def longest_first(self) -> Tensor:
        """A row order, [B]: by the longest response among the rows that share a row's prompt,
        longest first (ties in row order, so the samples of one prompt stay together and still
        share its forward): consecutive micro-batches then hold responses of like lengths."""
        prompts_B_2L = torch.cat([self.prompt_tokens_B_L, self.prompt_mask_B_L], 1)
        _, prompt_B = torch.unique(prompts_B_2L, dim=0, return_inverse=True)
        lengths_B = self.lengths_B
        longest_U = torch.zeros(len(lengths_B), dtype=lengths_B.dtype).scatter_reduce(0, prompt_B, lengths_B, "amax")
        return torch.sort(longest_U[prompt_B], descending=True, stable=True).indices

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


def response_mask(response_tokens_B_T: Tensor, stop_ids: int | Sequence[int]) -> tuple[Tensor, Tensor]:
    """Mask of tokens up to and including the first stop id (any of ``stop_ids``: an EOS, or each
    end-of-turn id a model's generation config lists), and whether a stop id was emitted."""
    stops = torch.tensor([stop_ids] if isinstance(stop_ids, int) else list(stop_ids), dtype=response_tokens_B_T.dtype)
    is_stop_B_T = torch.isin(response_tokens_B_T, stops)
    finished_B = is_stop_B_T.any(-1)
    stop_before_B_T = (is_stop_B_T.long().cumsum(-1) - is_stop_B_T.long()) > 0
    return ~stop_before_B_T, finished_B


def gather_logprobs(logits_B_T_V: Tensor, tokens_B_T: Tensor) -> Tensor:
    """log softmax(logits)[token] at every position, [B, T]."""
    return torch.log_softmax(logits_B_T_V, dim=-1).gather(-1, tokens_B_T.unsqueeze(-1)).squeeze(-1)


def decode_responses(tokenizer: PreTrainedTokenizerBase, rollout: Rollout) -> list[str]:
    return [
        tokenizer.decode(tokens[mask].tolist(), skip_special_tokens=True)
        for tokens, mask in zip(rollout.response_tokens_B_T, rollout.response_mask_B_T, strict=True)
    ]
