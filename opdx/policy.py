"""The student's with-grad scoring: ``TokenScores``, the one ``nn.Module`` whose ``forward``
gives the log-probs (or logits) of a rollout's response tokens, and the shared-prompt cache.

Every backend's run trains through it: the trainer wraps *it* in ``DistributedDataParallel`` or
FSDP2 (``opdx.dist.wrap``), so the wrapper's hooks are on the path of the loss; the Hugging Face
backend (``opdx.backends.hf``) scores a teacher with the same module under ``torch.no_grad`` and
generates through it. Log-probs for u come from a float32 (or wider) log-softmax of the head's
logits on both sides (``head_logits``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache as cache_result
from functools import partial

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin

from opdx.compat import vocab_logits
from opdx.logits import HeadLogits
from opdx.lora import merged_tensors
from opdx.rollout import PLAIN_SAMPLING, Rollout, SamplingParams, gather_logprobs


class TokenScores(nn.Module):
    """log p(response token | prefix) of a rollout under a causal LM, [B, T] on the CPU,
    or with ``logits=True`` the next-token logits at each response position as ``HeadLogits``
    (the final hidden states [B, T, D] and the head that makes [C, V] logits of any C of them: the
    dense supports make them chunk by chunk), both in float32 at least (float64 for a float64 model).
    Both are over the tokenizer's ``vocab_size`` ids (output rows beyond it are padding: left out,
    ``opdx.compat.vocab_logits``) and warped by ``params`` (the distribution sampled from; the
    teacher uses the plain one).

    Log-probs are made ``chunk_size`` tokens (rows x positions, flattened) at a time, so a chunk
    of logits is at most [chunk_size, V] whatever the batch; with grad enabled each chunk is
    recomputed in backward (activation checkpointing), so no full [B, T, V] tensor is kept. The
    head's logits are computed in float32 from a bfloat16 or float16 model (``head_logits``).

    ``compute_dtype`` (``trainer.precision=bf16-mixed``): float32 weights that compute in bfloat16,
    through ``torch.autocast`` around the forward and ``generate``; the head stays float32.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        chunk_size: int = 8192,
        vocab_size: int | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.vocab_size = vocab_size or model.get_output_embeddings().weight.shape[0]
        self.compute_dtype = compute_dtype

    def autocast(self) -> torch.autocast:
        """Autocast to ``compute_dtype`` where it is lower than the weights' dtype, else off."""
        weights = self.model.get_output_embeddings().weight.dtype
        on = self.compute_dtype is not None and self.compute_dtype != weights
        return torch.autocast(self.model.device.type, dtype=self.compute_dtype or weights, enabled=on)

    def forward(
        self, rollout: Rollout, params: SamplingParams = PLAIN_SAMPLING, logits: bool = False
    ) -> Tensor | HeadLogits:
        with self.autocast():
            return self._scores(rollout, params, logits)

    def _scores(self, rollout: Rollout, params: SamplingParams, logits: bool) -> Tensor | HeadLogits:
        hidden_B_T_D = self._hidden_states(rollout)
        lm_head = self.model.get_output_embeddings()
        if logits:
            return HeadLogits(hidden_B_T_D, partial(_chunk_logits, lm_head, params, self.vocab_size))
        tokens_B_T = rollout.response_tokens_B_T.to(hidden_B_T_D.device)
        hidden_S_D, tokens_S = hidden_B_T_D.flatten(0, 1), tokens_B_T.flatten()
        chunks = []
        for start in range(0, len(tokens_S), self.chunk_size):
            end = start + self.chunk_size
            args = (lm_head, params, self.vocab_size, hidden_S_D[start:end], tokens_S[start:end])
            if torch.is_grad_enabled():
                chunks.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False))
            else:
                chunks.append(_chunk_logprobs(*args))
        return torch.cat(chunks).view_as(tokens_B_T).cpu()

    def generate(self, **kwargs: object) -> Tensor:
        """The model's ``generate``, through this module: under FSDP2 it is registered as a forward
        method of the sharded root (``register_fsdp_forward_method``), so its parameters are gathered.
        Its head computes in float32 (``float32_head``), as the scoring forward's does."""
        with self.autocast(), float32_head(self.model.get_output_embeddings()):
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


def head_logits(lm_head: nn.Module, hidden: Tensor) -> Tensor:
    """The output head's logits [..., rows] in float32 at least. A float32 or float64 head runs as
    it is; a bfloat16 or float16 one is computed in float32 from upcast operands, not rounded to its
    own dtype first (a bfloat16 logit near 16 has a step of 0.125 nat), so u = q/p compares two
    float32 heads (ScaleRL's fp32 head; vLLM's ``head_dtype`` override does the same on an engine)."""
    weight = lm_head.weight.dtype
    if (
        weight in (torch.float32, torch.float64)
        and hidden.dtype == weight
        and not torch.is_autocast_enabled(hidden.device.type)
    ):
        return lm_head(hidden)
    return _float32_linear(lm_head, hidden)


def _float32_linear(lm_head: nn.Module, hidden: Tensor) -> Tensor:
    dtype = torch.promote_types(lm_head.weight.dtype, torch.float32)
    bias = None if getattr(lm_head, "bias", None) is None else lm_head.bias.to(dtype)
    with torch.autocast(hidden.device.type, enabled=False):  # float32 master weights under bf16-mixed too
        return torch.nn.functional.linear(hidden.to(dtype), lm_head.weight.to(dtype), bias)


@contextmanager
def float32_head(lm_head: nn.Module) -> Iterator[None]:
    """Within, ``lm_head`` computes its logits as ``head_logits`` does (float32 from upcast
    operands), so ``generate`` samples from, and records the log-probs of, the same float32 head
    as the scoring forward, not its bfloat16 rounding. Its ``forward`` is replaced for the block
    (once, no second head computation per decoding step)."""
    lm_head.forward = partial(_float32_linear, lm_head)
    try:
        yield
    finally:
        del lm_head.forward


def _chunk_logits(lm_head: nn.Module, params: SamplingParams, vocab_size: int, hidden_C_D: Tensor) -> Tensor:
    """The warped float32 logits [C, V] of the tokenizer's ids at ``hidden_C_D``."""
    return params.warp(vocab_logits(head_logits(lm_head, hidden_C_D), vocab_size))


def _chunk_logprobs(
    lm_head: nn.Module, params: SamplingParams, vocab_size: int, hidden_C_D: Tensor, tokens_C: Tensor
) -> Tensor:
    return gather_logprobs(_chunk_logits(lm_head, params, vocab_size, hidden_C_D), tokens_C)


def full_weights(model: nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
    """The trainer's student module's tensors by checkpoint name, whole and in ``dtype``, one at a
    time: under FSDP2 each parameter is gathered as it is read (a collective every rank joins in the
    same order), so no rank holds the whole gathered model at once. Tied embeddings come under both
    names, as ``state_dict`` gives them. A LoRA student's come merged, under the base model's names
    (``opdx.lora.merged_tensors``)."""
    module = model.module if isinstance(model, DistributedDataParallel) else model
    for name, tensor in merged_tensors(module):
        yield name.removeprefix("model."), tensor.detach().to(dtype)
