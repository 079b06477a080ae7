"""A teacher behind an OpenAI-compatible inference server (vLLM's), scoring the student's tokens.

    CUDA_VISIBLE_DEVICES=1 vllm serve Qwen/Qwen3-1.7B --port 8000 --no-enable-prefix-caching --generation-config vllm \
        --hf-overrides '{"head_dtype": "float32"}'     # its own GPU; or on the trainer's: --gpu-memory-utilization 0.2
    CUDA_VISIBLE_DEVICES=0 opdx train model=qwen3_1p7b_to_0p6b_base teacher=server teacher.url=http://localhost:8000/v1

On the trainer's GPU, the server's share (``--gpu-memory-utilization``, 0.92 by default) must leave
the trainer its memory; ``head_dtype`` float32 makes its log-probs come from a float32 output layer,
as the trainer's do (docs/vllm.md).

OPD and OPD+ need only the teacher's log-prob of each *sampled* token, so a served teacher is exact
for every divergence with ``estimator=stopgrad`` and ``unbiased`` (not a top-k approximation).
``estimator.support=topk`` asks for the teacher's top-k at every position as well (``dense``); the
full support needs the teacher's logits, which a server does not return, and is refused at start.

Each row (prompt + response, as token ids: never text, which the server would tokenize again)
goes to ``/v1/completions`` with ``max_tokens: 1`` and ``prompt_logprobs: k`` (k = 0 for the
sampled support), which returns, at every prompt position after the first, the log-prob of the
token actually there and of the k most likely tokens (vLLM's extension of the API; vLLM also
decodes each entry's token, which no request field turns off); values are looked up by token id,
and vLLM's -9999 stands for -inf. The server caps k at its ``--max-logprobs`` (20 by default).

Prompt log-probs are the model's own at temperature 1, whatever the request's sampling settings:
vLLM computes them from the raw logits, before any logits processor (``vllm/v1/worker/gpu_model_runner.py``,
``_get_prompt_logprobs_dict``: "prompt tokens skip sampling processors"). A server started with
``--logprobs-mode raw_logits`` or ``processed_logits`` returns logits there instead; a top-k whose
probabilities sum past 1 shows it, and is refused by name.
Rows go in batches, several requests at once, each with a timeout and bounded retries
(urllib3's ``Retry``); a server that is down, serves another model or another tokenizer fails at
start with a message naming the URL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, PreTrainedTokenizerBase

from opdx.backends import ServerError, request_seeds, teacher_prompt_tokenizer
from opdx.backends.http import ServerClient
from opdx.benchmarks import Problem
from opdx.config import ModelConfig
from opdx.logits import TopK
from opdx.prompts import encode_prompts
from opdx.rollout import PLAIN_SAMPLING, Rollout, SamplingParams

NEG_INF_SENTINEL = -9999.0  # vLLM's JSON for a log-prob of -inf
# The teacher's own answers: every sampling setting a server could fill from the model's
# generation_config.json set to none (opdx samples with temperature / top-k / top-p alone).
NEUTRAL_SAMPLING = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0}


class ServedTeacher:
    """``teacher=server``: the teacher's log-probs of given tokens and its own answers, from the
    server at ``url`` (``http://host:port/v1``) serving ``model`` (null: the one model it lists).

    ``timeout`` seconds per request, ``retries`` more tries on a connection error or a 5xx answer
    (with backoff), ``rows_per_request`` sequences per request, ``concurrency`` requests at once.
    The server's tokenizer is checked against the pair's (the student's ``tokenizer``); the pair's
    teacher (``pair.teacher``, a local path or hub id) gives, with ``prompt_template=own``, the chat
    template the prompts are rendered with (as ``teacher=hf``). ``context`` is the server's
    ``max_model_len`` less one (a scoring request asks for one new token). Raises
    ServerError at start as described above."""

    supports = ("sampled", "topk")
    memory = "remote"  # opdx.plan: the teacher's weights are on the server, not on this device

    def __init__(
        self,
        url: str,
        pair: ModelConfig,
        tokenizer: PreTrainedTokenizerBase,
        model: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        rows_per_request: int = 64,
        concurrency: int = 8,
        prompt_template: str = "own",
        stop_ids: Sequence[int] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        self.stop_ids = list(stop_ids or [tokenizer.eos_token_id])
        self.prompt_tokenizer = teacher_prompt_tokenizer(pair, tokenizer, prompt_template)
        self.rows_per_request = rows_per_request
        self.client = ServerClient(url, "teacher", timeout, retries, concurrency)
        self.model, max_model_len = self.client.served_model(model)
        self.context = max_model_len - 1
        self.client.check_tokenizer(self.model, tokenizer)
        note_padding_rows(pair, len(tokenizer))
        print(f"teacher: {self.model} served at {self.url}")

    def prompt_ids(self, problems: Sequence[Problem | str]) -> list[list[int]]:
        """Each problem's prompt as the teacher sees it (``prompt_template``)."""
        return encode_prompts(self.prompt_tokenizer, problems)

    def _completions(self, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each body's ``/completions`` choices in order, ``concurrency`` requests at a time."""
        answers = self.client.map("/completions", bodies)
        return [choice for answer in answers for choice in sorted(answer["choices"], key=lambda c: c["index"])]

    def _prompts_B(self, rollout: Rollout) -> list[list[int]]:
        if self.prompt_tokenizer is not self.tokenizer:
            if rollout.problems is None:
                raise ValueError("this teacher renders prompts with its own chat template: the rollout needs problems")
            return self.prompt_ids(rollout.problems)
        rows = zip(rollout.prompt_tokens_B_L, rollout.prompt_mask_B_L, strict=True)
        return [tokens[mask.bool()].tolist() for tokens, mask in rows]

    def logprobs(self, rollout: Rollout) -> Tensor:
        """log q(response token | prefix) at every response token, [B, T] float32 (0 past a
        response's end), from the server's prompt log-probs of prompt + response."""
        return self._scored(rollout, 0).logq_token

    def dense(self, rollout: Rollout, top_k: int | None = None) -> TopK:
        """The teacher's ``top_k`` at every response position (``opdx.logits.TopK``, [B, T, k];
        past a response's end ids 0 and log-probs -inf), in the same requests as the sampled
        tokens' log-probs; the tail is 1 minus the k's mass (``TopK.served``), over every output
        row of the model (padding rows included: ``note_padding_rows``). ValueError for full logits
        (``top_k`` None), which a server does not give; ServerError naming the server's
        ``--max-logprobs`` when k is over it, or its ``--logprobs-mode`` when it returns logits."""
        if top_k is None:
            raise ValueError("a served teacher gives the top-k log-probs of each position, not its full logits")
        return self._scored(rollout, top_k)

    def _scored(self, rollout: Rollout, top_k: int) -> TopK:
        """The prompt log-probs of every row's prompt + response with ``top_k`` most likely tokens
        (0: the response tokens' own alone), as a ``TopK`` over [B, T]."""
        prompts_B = self._prompts_B(rollout)
        lengths_B = rollout.lengths_B.tolist()
        responses_B = [
            tokens[:length].tolist() for tokens, length in zip(rollout.response_tokens_B_T, lengths_B, strict=True)
        ]
        rows = [prompt + response for prompt, response in zip(prompts_B, responses_B, strict=True)]
        bodies = [
            {"model": self.model, "prompt": rows[start : start + self.rows_per_request], "max_tokens": 1,
             "prompt_logprobs": top_k, "temperature": 1.0}
            for start in range(0, len(rows), self.rows_per_request)
        ]  # fmt: skip
        try:
            choices = self._completions(bodies)
        except ServerError as error:
            if top_k and error.status == 400 and "logprobs" in str(error):
                raise ServerError(
                    f"{error}\nestimator.top_k={top_k} asks for more log-probs than the server gives: start it with "
                    f"--max-logprobs {top_k} or more, or lower estimator.top_k",
                    error.status,
                ) from None
            raise
        shape_B_T = rollout.response_tokens_B_T.shape
        logq_token_B_T = torch.zeros(shape_B_T, dtype=torch.float32)
        ids_B_T_J = torch.zeros((*shape_B_T, top_k), dtype=torch.long)
        logq_B_T_J = torch.full((*shape_B_T, top_k), -math.inf, dtype=torch.float32)
        for row, (choice, prompt, response) in enumerate(zip(choices, prompts_B, responses_B, strict=True)):
            prompt_logprobs = self.client.field(choice, "prompt_logprobs", "/completions")
            try:
                logq_token_B_T[row, : len(response)] = torch.tensor(token_logprobs(prompt_logprobs, prompt, response))
                if top_k:
                    ids_T_J, logq_T_J = top_logprobs(prompt_logprobs[len(prompt) : len(prompt) + len(response)], top_k)
                    ids_B_T_J[row, : len(response)], logq_B_T_J[row, : len(response)] = ids_T_J, logq_T_J
            except ValueError as error:
                raise ServerError(f"teacher=server: {self.url}/completions: {error}") from None
        mass = torch.logsumexp(logq_B_T_J, -1).max().item() if top_k else -math.inf
        if mass > 1e-3:
            raise ServerError(
                f"teacher=server: the top-{top_k} probabilities from {self.url} sum to {math.exp(mass):.3f} > 1: the "
                "server returns logits, not log-probs (started with --logprobs-mode raw_logits or processed_logits?); "
                "restart it with the default --logprobs-mode raw_logprobs"
            )
        return TopK.served(ids_B_T_J, logq_B_T_J, logq_token_B_T)

    def sample(
        self,
        problems: Sequence[Problem | str],
        samples_per_prompt: int,
        max_new_tokens: int,
        params: SamplingParams = PLAIN_SAMPLING,
        greedy: bool = False,
        on_step: Callable[[], object] | None = None,
    ) -> Rollout:
        """The teacher's own answers (its eval): ``samples_per_prompt`` per problem, B = P * G,
        each to a stop id of the pair or ``max_new_tokens``, sampled by the server with a seed per prompt
        drawn from torch's global generator. ``on_step`` is not called."""
        prompts_P = self.prompt_ids(problems)
        seeds_P = request_seeds(len(prompts_P))
        sampling = {"temperature": 0.0} if greedy else {
            "temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p
        }  # fmt: skip
        bodies = [
            {"model": self.model, "prompt": [ids], "n": samples_per_prompt, "max_tokens": max_new_tokens,
             "seed": seed, "ignore_eos": True, "stop_token_ids": self.stop_ids,
             "return_token_ids": True, **NEUTRAL_SAMPLING, **sampling}
            for ids, seed in zip(prompts_P, seeds_P, strict=True)
        ]  # fmt: skip
        choices = self._completions(bodies)
        return Rollout.from_samples(
            problems,
            prompts_P,
            [self.client.field(choice, "token_ids", "/completions") for choice in choices],
            [choice["finish_reason"] == "stop" for choice in choices],
            self.tokenizer.pad_token_id,
        )

    def update_weights(self, model: nn.Module, version: int) -> None:
        """Nothing: the teacher is frozen."""


def token_logprobs(
    prompt_logprobs: list[dict[str, dict[str, float]] | None], prompt: list[int], response: list[int]
) -> list[float]:
    """The log-prob of each response token from a choice's ``prompt_logprobs`` over prompt +
    response (entry i: {token id: {"logprob": ...}} for position i, entry 0 null), looked up by the
    token's id (it need not be the most likely one); -9999 is -inf. ValueError when an entry lacks
    its token."""
    values = []
    for position, token in enumerate(response, start=len(prompt)):
        entry = prompt_logprobs[position]
        if entry is None or str(token) not in entry:
            raise ValueError(f"the server's prompt_logprobs at position {position} lack token {token}: {entry}")
        value = float(entry[str(token)]["logprob"])
        values.append(-math.inf if value <= NEG_INF_SENTINEL else value)
    return values


def top_logprobs(prompt_logprobs: list[dict[str, dict[str, float]]], top_k: int) -> tuple[Tensor, Tensor]:
    """The ``top_k`` most likely tokens' ids [T, k] (int64) and log-probs [T, k] (float32) of each
    entry of a choice's ``prompt_logprobs`` (each holds the k and, when it is not among them, the
    token actually there: its rank tells it apart); -9999 is -inf. ValueError when an entry has
    fewer than k."""
    ids, values = [], []
    for position, entry in enumerate(prompt_logprobs):
        ranked = sorted(entry.items(), key=lambda item: item[1]["rank"])[:top_k]
        if len(ranked) < top_k:
            raise ValueError(f"the server's prompt_logprobs entry {position} has {len(ranked)} tokens, not {top_k}")
        ids.append([int(token) for token, _ in ranked])
        values.append([float(value["logprob"]) for _, value in ranked])
    logq_T_J = torch.tensor(values, dtype=torch.float32)
    return torch.tensor(ids, dtype=torch.long), logq_T_J.masked_fill(logq_T_J <= NEG_INF_SENTINEL, -math.inf)


def note_padding_rows(pair: ModelConfig, vocab_size: int) -> None:
    """Say so when the teacher's output layer has rows beyond the tokenizer's ids: a server's
    log-probs are normalised over every row, ``teacher=hf``'s over the tokenizer's ids only."""
    rows = AutoConfig.from_pretrained(pair.teacher).vocab_size
    if rows > vocab_size:
        print(
            f"teacher: {pair.teacher} has {rows:,} output rows for {vocab_size:,} token ids; the server normalises its "
            f"log-probs over all rows (teacher=hf over the token ids only), so log q differs from a local teacher's by "
            "the probability it gives the padding rows"
        )
