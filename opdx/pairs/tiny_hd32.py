"""`tiny_hd32`: the tiny pair with the student's attention heads padded from 16 to 32 dimensions.

    opdx prepare model=tiny_hd32            # writes $OPDX_CACHE/tiny_hd32/{teacher,student}
    opdx train model=tiny_hd32 rollout=vllm # vLLM's CPU attention takes head sizes 32, 64, 80, ...

The student computes the same function as the shipped tiny student (to float rounding): each
head's query and key get 16 zero dimensions placed so that rotary embeddings pair the same
dimensions at the same frequencies, and the query is scaled by sqrt(2) so q.k / sqrt(32) equals
the original q.k / sqrt(16); values and the output projection get zero rows and columns. The zero
parts get zero gradients (each is multiplied by another zero part), so training keeps them zero;
AdamW's steps on the scaled query weights differ a little from the unpadded student's. The
teacher is the tiny teacher, copied.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from opdx.config import asset_path

HEAD_DIM = 32


def head_rows(old_head_dim: int, new_head_dim: int, heads: int, interleave: bool) -> torch.Tensor:
    """Row of the padded projection that takes each row of the original one, [heads * old_head_dim].

    ``interleave`` places a head's dimension i of each rotary half at twice its index in the new
    half (transformers' and vLLM's Llama rotate the halves: dimension i pairs with i + d/2 at
    frequency theta^(-2i/d), and 2i of a half of 2d keeps that frequency); otherwise dimensions keep
    their index."""
    half = old_head_dim // 2
    index = torch.arange(old_head_dim)
    within = torch.where(index < half, 2 * index, new_head_dim // 2 + 2 * (index - half)) if interleave else index
    return (torch.arange(heads)[:, None] * new_head_dim + within[None, :]).flatten()


def padded_heads(model: LlamaForCausalLM, head_dim: int = HEAD_DIM) -> LlamaForCausalLM:
    """A copy of the Llama ``model`` whose attention heads have ``head_dim`` dimensions, twice its
    own (``head_rows`` doubles the rotary indices), computing the same logits. ValueError otherwise."""
    config = model.config
    old = config.head_dim
    if head_dim != 2 * old:
        raise ValueError(f"padding heads doubles their size: head_dim={head_dim} for a model with {old}, not {2 * old}")
    padded_config = config.__class__.from_dict({**config.to_dict(), "head_dim": head_dim})
    padded = LlamaForCausalLM(padded_config).to(model.dtype)
    state = model.state_dict()
    rotary = head_rows(old, head_dim, config.num_attention_heads, interleave=True)
    rotary_kv = head_rows(old, head_dim, config.num_key_value_heads, interleave=True)
    plain_kv = head_rows(old, head_dim, config.num_key_value_heads, interleave=False)
    plain = head_rows(old, head_dim, config.num_attention_heads, interleave=False)
    new_state = {}
    for name, tensor in padded.state_dict().items():
        source = state[name]
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
            target = torch.zeros_like(tensor)
            if name.endswith("q_proj.weight"):
                target[rotary] = source * math.sqrt(head_dim / old)
            elif name.endswith("k_proj.weight"):
                target[rotary_kv] = source
            elif name.endswith("v_proj.weight"):
                target[plain_kv] = source
            else:
                target[:, plain] = source
            new_state[name] = target
        else:
            new_state[name] = source.clone()
    padded.load_state_dict(new_state)
    padded.generation_config = model.generation_config
    return padded.eval()


def build(out_dir: Path, seed: int = 0) -> dict:
    """The tiny teacher copied and the tiny student with padded heads, into ``out_dir``."""
    del seed  # the padding is deterministic
    shutil.copytree(asset_path("tiny/teacher"), out_dir / "teacher")
    source = asset_path("tiny/student")
    student = padded_heads(LlamaForCausalLM.from_pretrained(source, dtype=torch.float32))
    student.save_pretrained(out_dir / "student")
    AutoTokenizer.from_pretrained(source).save_pretrained(out_dir / "student")
    return {"source": source, "head_dim": HEAD_DIM, "parameters": sum(p.numel() for p in student.parameters())}
