"""Sampler and scorer backends: what the trainer and ``opdx eval`` use of a model.

A *sampler* turns problems into a ``Rollout`` (token ids, masks, and the log-probs of the
distribution actually sampled from) and takes new student weights after an optimizer step; a
*scorer* returns the log-prob of each given response token and, where it can, its next-token
distribution at each of them (``opdx.logits``: logits made chunk by chunk, or the top-k), which the
dense estimator supports need. The student's rollouts come from the ``rollout`` config group,
the teacher from the ``teacher`` group, whose YAML names the backend class (``_target_``) and its
options; a backend is one module and one YAML, and the trainer never sees which it is.

    opdx train rollout=hf teacher=hf          # the default: Hugging Face models in this process

Every backend renders prompts with ``opdx.prompts.encode_prompts``, so all see identical ids.
A backend class may say where its model's memory is, for the memory planner (``opdx.plan``):
``memory = "local"`` (the default: on the training device), ``"engine"`` (a colocated engine's
share of it) or ``"remote"`` (another machine).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdx.benchmarks import Problem
from opdx.compat import PairError
from opdx.config import ConfigError, ModelConfig
from opdx.logits import DenseScores
from opdx.models import load_tokenizer_of
from opdx.plan import CPU_KV_CACHE_BYTES
from opdx.rollout import Rollout, SamplingParams

# vLLM 0.32's GPU model runner (V2, the default on CUDA) takes at most this many logit_bias entries and
# as many allowed_token_ids per request (MAX_NUM_LOGIT_BIAS_TOKENS, MAX_NUM_ALLOWED_TOKEN_IDS in
# vllm/v1/worker/gpu/sample/logit_bias.py); more raises inside the engine step.
MAX_LOGIT_BIAS_TOKENS = 1024


CPU_KV_CACHE_SEQUENCES = 4  # a CPU engine's KV cache has room for this many sequences of its context at least


@runtime_checkable
class Sampler(Protocol):
    """Samples responses; B = P * G sequences, prompt-major. ``context`` is the number of
    positions (prompt + response) its model takes."""

    context: int

    def prompt_ids(self, problems: Sequence[Problem | str]) -> list[list[int]]:
        """Each problem's prompt as token ids, as this backend renders it."""
        ...

    def sample(
        self,
        problems: Sequence[Problem | str],
        samples_per_prompt: int,
        max_new_tokens: int,
        params: SamplingParams,
        greedy: bool = False,
        on_step: Callable[[], object] | None = None,
    ) -> Rollout:
        """``samples_per_prompt`` responses per problem (greedy: the argmax, ``params`` unused),
        with ``logp_sampling_B_T`` recorded; ``on_step`` is called after each decoding step."""
        ...

    def update_weights(self, model: nn.Module, version: int) -> None:
        """Take the weights of ``model`` (the trainer's student module) for the next samples;
        ``version`` counts the training steps they have taken (0: the initial student), which a
        sampler that records it stamps on each rollout row (``Rollout.weight_version_B``)."""
        ...


@runtime_checkable
class Scorer(Protocol):
    """Scores given response tokens at temperature 1 (q is the model itself). ``supports`` are the
    estimator supports (``estimator.support``) it can score: ``sampled`` always, ``topk`` where it
    gives its top-k, ``full`` where it gives its logits."""

    supports: tuple[str, ...]

    def logprobs(self, rollout: Rollout) -> Tensor:
        """log q(response token | prefix), [B, T] float32 on the CPU."""
        ...

    def dense(self, rollout: Rollout, top_k: int | None = None) -> DenseScores:
        """The next-token distribution at each response position, [B, T]: its logits (``top_k``
        None; ``full`` in ``supports``) or its ``top_k`` most likely tokens (``opdx.logits.TopK``)."""
        ...


def teacher_scores(teacher: Scorer, rollout: Rollout, support: str, top_k: int) -> Tensor | DenseScores:
    """What an estimator whose ``teacher_support`` is ``support`` reads of the teacher: the sampled
    tokens' log-probs [B, T], its top-``top_k``, or its full logits; without grad."""
    with torch.no_grad():
        if support == "sampled":
            return teacher.logprobs(rollout)
        return teacher.dense(rollout, top_k if support == "topk" else None)


@runtime_checkable
class Teacher(Sampler, Scorer, Protocol):
    """A teacher scores the student's rollouts and samples its own answers (its accuracy)."""


def request_seeds(count: int) -> list[int]:
    """A sampling seed for each of ``count`` engine requests, drawn from torch's global generator
    (which the trainer seeds per step and rank), so a run's samples repeat and ranks differ. A
    request of G samples uses seed, seed + 1, ... (vLLM)."""
    return torch.randint(2**31 - 1, (count,)).tolist()


class ServerError(RuntimeError):
    """An inference server (a served teacher's or student's) is down, answers with an error or in
    another shape, serves another model or tokenizer, or (one opdx started) exited; the message
    names the URL. ``status`` is the HTTP status of an error answer.
    (Here, not in ``server.py``, so that the CLI reports it without importing a concrete backend.)"""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


PROMPT_TEMPLATES = ("own", "student")


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


def padding_rows_off(rows: int, vocab_size: int) -> dict[int, float] | None:
    """The logit bias that keeps the output rows beyond the tokenizer (padding: Qwen3 has 151,936
    rows for 151,669 ids) from being sampled: -inf on each, so the processed log-probs are
    normalised over the tokenizer's ids as the trainer's are. None without padding rows: no
    restriction at all. An allow-list of every real id would be 151,669 entries, which vLLM's GPU
    runner refuses (``MAX_LOGIT_BIAS_TOKENS``); ConfigError when even the padding rows are more."""
    padding = rows - vocab_size
    if padding <= 0:
        return None
    if padding > MAX_LOGIT_BIAS_TOKENS:
        raise ConfigError(
            f"vLLM rollouts: the student has {rows:,} output rows for {vocab_size:,} tokenizer ids; the {padding:,} "
            f"padding rows must be masked with a logit bias, and vLLM's GPU runner takes at most "
            f"{MAX_LOGIT_BIAS_TOKENS} entries per request. Use rollout=hf for this model"
        )
    return dict.fromkeys(range(vocab_size, rows), -math.inf)


def head_size(config: Any) -> int:
    """The attention head size of a transformers config (``head_dim``, else hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_bytes_per_token(model: PreTrainedModel) -> int:
    """Bytes of keys and values one token takes in the model's KV cache (all layers, its dtype)."""
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_size(config) * model.dtype.itemsize


def cpu_kv_cache_bytes(model: PreTrainedModel, context: int) -> int:
    """The KV cache of a vLLM engine of ``model`` on the CPU, where vLLM reads its memory share as a
    fraction of RAM: ``opdx.plan.CPU_KV_CACHE_BYTES`` (256 MiB), or room for ``CPU_KV_CACHE_SEQUENCES``
    sequences of ``context`` positions when that is more (vLLM refuses to start without room for one)."""
    return max(CPU_KV_CACHE_BYTES, CPU_KV_CACHE_SEQUENCES * context * kv_bytes_per_token(model))
