"""opdx.policy: the student's scoring module (chunked, shared prompt forward, checkpointed, wrapped)."""

import pytest
import torch

from opdx.backends.hf import HFModel
from opdx.config import asset_path
from opdx.models import checkpoint_activations
from opdx.policy import TokenScores, cache_argument, shared_prompt_cache
from opdx.rollout import Rollout

PROMPTS = ["12+7=", "3-45+6=", "9="]


@pytest.fixture(scope="module")
def student():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = asset_path("tiny/student")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_chunking_and_left_padding_do_not_change_logprobs(student):
    model, tokenizer = student
    torch.manual_seed(1)
    rollout = HFModel(model, tokenizer).sample(PROMPTS, 2, 10)
    full = TokenScores(model, 128)(rollout)
    torch.testing.assert_close(TokenScores(model, 3)(rollout), full)
    alone = Rollout(
        rollout.prompt_tokens_B_L[-1:, -2:],
        rollout.prompt_mask_B_L[-1:, -2:],
        rollout.response_tokens_B_T[-1:],
        rollout.response_mask_B_T[-1:],
    )  # "9=" has BOS + 2 tokens: drop its left padding
    alone.prompt_tokens_B_L = rollout.prompt_tokens_B_L[-1:, -3:]
    alone.prompt_mask_B_L = rollout.prompt_mask_B_L[-1:, -3:]
    mask = rollout.response_mask_B_T[-1]
    torch.testing.assert_close(TokenScores(model)(alone)[0][mask], full[-1][mask], atol=5e-5, rtol=0)


def test_chunked_logprobs_backprop_like_full_logits(student):
    model, tokenizer = student
    torch.manual_seed(2)
    rollout = HFModel(model, tokenizer).sample(PROMPTS, 2, 8)
    mask = rollout.response_mask_B_T
    chunked = (TokenScores(model, 2)(rollout) * mask).sum()
    grads_chunked = torch.autograd.grad(chunked, list(model.parameters()))
    logits = TokenScores(model)(rollout, logits=True).chunk(0, None)  # every position's at once
    full = (logits.log_softmax(-1).gather(-1, rollout.response_tokens_B_T[..., None]).squeeze(-1) * mask).sum()
    grads_full = torch.autograd.grad(full, list(model.parameters()))
    for a, b in zip(grads_chunked, grads_full, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def row(rollout: Rollout, i: int) -> Rollout:
    r = rollout
    tensors = (r.prompt_tokens_B_L, r.prompt_mask_B_L, r.response_tokens_B_T, r.response_mask_B_T)
    return Rollout(*(t[i : i + 1] for t in tensors))


def test_rows_sharing_a_prompt_share_its_forward(student):
    """A group's prompt runs once (one row per distinct prompt) and its cache is read by every row
    of the group: log-probs and gradients equal one forward per row."""
    model, tokenizer = student
    torch.manual_seed(4)
    rollout = HFModel(model, tokenizer).sample(PROMPTS, 3, 8)
    mask = rollout.response_mask_B_T
    rows = []
    hook = model.model.register_forward_pre_hook(lambda _, __, kw: rows.append(kw["input_ids"].shape), with_kwargs=True)
    shared = TokenScores(model)(rollout)
    hook.remove()
    prefix = rollout.prompt_tokens_B_L.shape[1] - 1
    assert rows == [(3, prefix), (9, rollout.response_tokens_B_T.shape[1])]
    grads_shared = torch.autograd.grad(shared[mask].sum(), list(model.parameters()))
    alone = torch.cat([TokenScores(model)(row(rollout, i)) for i in range(9)])
    grads_alone = torch.autograd.grad(alone[mask].sum(), list(model.parameters()))
    torch.testing.assert_close(shared[mask], alone[mask], atol=1e-5, rtol=0)
    for a, b in zip(grads_shared, grads_alone, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert max(g.abs().max() for g in grads_shared) > 1e-2


def test_a_read_only_prompt_cache_is_read_and_not_grown(student):
    """The scoring forward joins the prompt's keys and values to its own without storing them: no
    per-layer copy of the whole sequence outlives the layer."""
    model, tokenizer = student
    rollout = HFModel(model, tokenizer).sample(PROMPTS, 2, 6, greedy=True)
    prompt, mask = rollout.prompt_tokens_B_L, rollout.prompt_mask_B_L
    prefix = prompt.shape[1] - 1
    suffix = torch.cat([prompt[:, -1:], rollout.response_tokens_B_T[:, :-1]], dim=1)
    attention = torch.cat([mask, torch.ones_like(rollout.response_tokens_B_T[:, :-1])], dim=1)
    positions = ((attention.cumsum(-1) - 1).clamp(min=0))[:, prefix:]
    hidden = []
    with torch.no_grad():
        for read_only in (False, True):
            cache = shared_prompt_cache(model, prompt, mask, read_only=read_only)
            kwargs = dict(attention_mask=attention, position_ids=positions, use_cache=True)
            hidden.append(
                model.base_model(input_ids=suffix, **kwargs, **cache_argument(model, cache)).last_hidden_state
            )
            grown = cache.get_seq_length()
            assert grown == (prefix if read_only else prefix + suffix.shape[1])
    torch.testing.assert_close(hidden[1], hidden[0], atol=0, rtol=0)
    assert shared_prompt_cache(model, prompt[::2], mask[::2]) is None  # no two rows share a prompt


def test_gradient_checkpointing_gives_the_same_gradients(student):
    """trainer.gradient_checkpointing recomputes layers in backward: same gradients, less memory
    (one sample per prompt: no shared prompt cache, which checkpointing turns off)."""
    model, tokenizer = student
    rollout = HFModel(model, tokenizer).sample(PROMPTS, 1, 8)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            checkpoint_activations(model, on=True)
        model.train()
        model.zero_grad()
        TokenScores(model)(rollout)[rollout.response_mask_B_T].sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    checkpoint_activations(model, on=False)
    model.eval()
    for without, with_checkpointing in zip(*grads, strict=True):
        torch.testing.assert_close(with_checkpointing, without, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_a_ddp_wrapped_student_forward_goes_through_the_wrapper(student, tmp_path):
    """The student's with-grad forward is ``TokenScores.forward``: wrapped in DDP (gloo, one
    process), the reducer is prepared by the forward and reduces every gradient bucket in
    backward; a forward that skips the wrapper (as calling ``model.base_model`` from outside did)
    reduces nothing."""
    import copy

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    model, tokenizer = student
    rollout = HFModel(model, tokenizer).sample(PROMPTS, 2, 8)
    # An in-process vLLM engine of an earlier test in this worker may hold the default group.
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:
        policy = DistributedDataParallel(TokenScores(copy.deepcopy(model).train()))
        reduced = []

        def counting_hook(state, bucket):
            reduced.append(bucket.index())
            return allreduce_hook(state, bucket)

        policy.register_comm_hook(None, counting_hook)
        policy(rollout)[rollout.response_mask_B_T].sum().backward()
        assert reduced and all(p.grad is not None for p in policy.parameters())
        reduced.clear()
        policy.module(rollout)[rollout.response_mask_B_T].sum().backward()
        assert reduced == []
    finally:
        if owns_group:
            dist.destroy_process_group()


def test_a_bfloat16_head_gives_float32_logits_not_rounded_ones():
    """u = q/p compares two heads' log-probs: a bfloat16 head's own logits carry its rounding (a
    step of 0.125 near 16), the float32 computation from the same bfloat16 operands does not."""
    from opdx.policy import head_logits

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 1000, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        head.weight.mul_(40)  # logits of order 10, as a trained model's
    hidden = torch.randn(8, 64).to(torch.bfloat16)
    exact = hidden.double() @ head.weight.double().T
    ours = head_logits(head, hidden)
    assert ours.dtype == torch.float32
    assert (ours.double() - exact).abs().max() < 1e-4 < (head(hidden).double() - exact).abs().max()
    float_head = torch.nn.Linear(64, 10).double()
    assert torch.equal(head_logits(float_head, hidden.double()), float_head(hidden.double()))  # as it is
