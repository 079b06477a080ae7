"""Memory and time of a dense estimator support's loss + backward, chunked, beside the unchunked size.

    python scripts/bench_loss.py --support full --batch 4 --tokens 2048 --vocab 151936 --hidden 64
    python scripts/bench_loss.py --support topk --top-k 16 --batch 4 --tokens 2048 --vocab 151936 --hidden 64
    python scripts/bench_loss.py --support sampled --batch 4 --tokens 2048 --vocab 151936 --hidden 64 \
        --logprob-chunk 2048          # the sampled token's log-probs, chunked as the Qwen3 model files set
    python scripts/bench_loss.py --support full --batch 1 --tokens 256 --vocab 151936 --hidden 64 --chunk 256
        # one chunk for every state: what the unchunked computation holds, at a shape where it fits

The student and the teacher are one-layer random Qwen3 models of ``--hidden`` width and ``--vocab``
output rows, built here (nothing downloaded); every one of the batch's ``--tokens`` response
positions is on the mask. A step runs as ``opdx train`` runs it: the teacher's scores without grad
(``TokenScores``: its log-probs of the sampled tokens, or its hidden states and head, as
``teacher=hf`` gives them), the student's with-grad forward, ``Estimator.loss`` (OPD+,
``--divergence``, ``--gamma``) and backward, the logits made ``--chunk`` states at a time
(``runtime.dense_chunk``; the sampled support's log-probs ``--logprob-chunk`` tokens at a time,
``runtime.logprob_chunk``).

Printed: the peak bytes of live tensors over the step (``opdx.memory_tracking.LiveTensorBytes``;
with ``--device cuda`` the CUDA allocator's peak: models, hidden states, logits chunks and
gradients), the same less what is alive before it (the
models and the batch), the process's peak RSS (Python, torch and the allocator's slack included),
the step's median seconds over ``--repeats`` (timed without the tracker, which slows every
operator), the size of one float32 [B, T, V] tensor, and the memory planner's figure for the loss's
chunks (``opdx.plan``). One thread unless ``--threads``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opdx.backends import teacher_scores
from opdx.config import EstimatorConfig, RuntimeConfig
from opdx.divergences import get_divergence
from opdx.memory_tracking import LiveTensorBytes
from opdx.objective import LossInputs, build_estimator
from opdx.plan import dense_loss_bytes
from opdx.policy import TokenScores
from opdx.rollout import Rollout

PROMPT_TOKENS = 16


def model(vocab: int, hidden: int, seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, tie_word_embeddings=False,
        max_position_embeddings=PROMPT_TOKENS + 8192,
    )  # fmt: skip
    return Qwen3ForCausalLM(config).float()


class TeacherOf:
    """The ``Scorer`` calls a step makes of a local teacher (``opdx.backends.hf.HFModel``'s), on a model built here."""

    supports = ("sampled", "topk", "full")

    def __init__(self, scores: TokenScores) -> None:
        self.scores = scores

    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        return self.scores(rollout)

    def dense(self, rollout: Rollout, top_k: int | None = None):  # noqa: ANN201
        from opdx.logits import TopKOfLogits

        logits = self.scores(rollout, logits=True)
        return logits if top_k is None else TopKOfLogits(logits, rollout.response_tokens_B_T, top_k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--support", choices=("sampled", "topk", "full"), default="full")
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048, help="response positions per sequence")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument(
        "--chunk", type=int, default=RuntimeConfig.dense_chunk, help="states per chunk of a dense support's logits"
    )
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--gamma", type=float, default=0.0)
    parser.add_argument("--logprob-chunk", type=int, default=RuntimeConfig.logprob_chunk, help="sampled support")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (at least 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the CUDA allocator's peak")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: time at least one step")
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    student = model(args.vocab, args.hidden, 0).to(device)
    teacher_model = model(args.vocab, args.hidden, 1).requires_grad_(False).to(device)
    policy, teacher = (
        TokenScores(student, args.logprob_chunk, vocab_size=args.vocab),
        TeacherOf(TokenScores(teacher_model, args.logprob_chunk, vocab_size=args.vocab)),
    )
    generator = torch.Generator().manual_seed(0)
    prompts_B_L = torch.randint(args.vocab, (args.batch, PROMPT_TOKENS), generator=generator)
    tokens_B_T = torch.randint(args.vocab, (args.batch, args.tokens), generator=generator)
    rollout = Rollout(
        prompts_B_L, torch.ones_like(prompts_B_L), tokens_B_T, torch.ones_like(tokens_B_T, dtype=torch.bool)
    )
    config = EstimatorConfig("unbiased", gamma=args.gamma, support=args.support, top_k=args.top_k)
    estimator, divergence = build_estimator(config, chunk_size=args.chunk), get_divergence(args.divergence)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        scores = teacher_scores(teacher, rollout, estimator.teacher_support, args.top_k)
        student_scores = policy(rollout, logits=estimator.needs_dense)
        terms = estimator.loss(LossInputs(student_scores, scores, rollout.response_mask_B_T, tokens_B_T), divergence)
        terms.loss.backward()
        student.zero_grad(set_to_none=True)
        return terms.loss.item()  # waits for the device

    step()  # warm-up (allocator, lazy inits)
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = step()
        peak = torch.cuda.max_memory_allocated()
    else:
        with LiveTensorBytes() as live:
            before = live.current
            loss = step()
        peak = live.peak
    whole = args.batch * args.tokens * args.vocab * 4
    shape = f"B={args.batch} T={args.tokens} V={args.vocab:,} D={args.hidden}"
    dense = args.support != "sampled"
    chunking = f"chunk {args.chunk} states" if dense else f"log-probs in chunks of {args.logprob_chunk} tokens"
    print(f"support={args.support}{f' K={args.top_k}' if args.support == 'topk' else ''}, {shape}, {chunking}, "
          f"{args.divergence}, gamma={args.gamma}: loss {loss:.4f}")  # fmt: skip
    mib = 2**20
    print(f"  peak live tensors:                        {peak / mib:9.1f} MiB ({device.type})")
    print(f"  of which the step's (above models, batch): {(peak - before) / mib:9.1f} MiB")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(f"  process peak RSS:                         {rss / mib:9.1f} MiB")
    print(f"  one float32 [B, T, V] tensor (unchunked): {whole / mib:9.1f} MiB")
    if dense:
        planned = dense_loss_bytes(min(args.chunk, args.batch * args.tokens), args.vocab)
        print(f"  planner's figure for the loss's chunks:   {planned / mib:9.1f} MiB (opdx.plan.dense_loss_bytes)")
    print(f"  loss + backward, with both forwards:      {statistics.median(seconds):9.2f} s (median of {args.repeats})")


if __name__ == "__main__":
    main()
