"""The memory planner: each phase's peak device memory of a run, from the models' configs alone.

    opdx plan model=qwen3_1p7b_to_0p6b_base benchmark=deepmath      # the overrides of opdx train
    opdx plan model=qwen3_8b_to_1p7b_base plan.gpu_memory_gib=80 plan.gpus=8 trainer.strategy=fsdp2

A run goes through four phases, and the device holds at each one what stays (the student's
weights and AdamW state, the teacher's weights, a colocated vLLM engine's share) plus what the
phase makes:

- ``rollout``: sampling the step's sequences, with their KV cache (``generate``) or inside the
  engine's share (vLLM);
- ``teacher``: the teacher's no-grad forward over one micro-batch and a chunk of its logits;
- ``update``: the student's with-grad forward and backward over one micro-batch (activations,
  each layer's input alone under ``trainer.gradient_checkpointing``), its gradients, a logits chunk
  with its gradient (for a dense support, both models' logits chunks and the teacher's hidden states);
- ``eval``: the teacher's and the student's eval ``generate`` of ``eval.batch_size`` sequences.

Sizes come from each model's ``config.json`` (a local directory, the hub cache, or the config the
model file carries: ``model.student_config`` / ``model.teacher_config``), with the parameter count
of the model built on the meta device (no weights, no download). ``opdx train`` plans before it
loads any weights: it refuses a run that cannot fit, naming the phase and its parts, and fills in
``trainer.micro_batch_size=auto`` (the largest micro-batch that fits, the whole batch when it does)
and an ``eval.batch_size`` lowered to what fits.

The figures are an estimate, counted from the tensors each phase keeps (``docs/gpu.md`` lists
them and compares them with measured peaks); the planner leaves ``plan.headroom`` of the device to
the allocator's fragmentation and the CUDA context.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from opdx.config import LORA_ALL_LINEAR, ConfigError, LoraConfig, RunConfig, SetupConfig

GIB = 2**30
CPU_KV_CACHE_BYTES = 1 << 28  # a vLLM engine's least KV cache on the CPU (kv_cache_memory_bytes null): 256 MiB
# float32 [dense_chunk, V] tensors a dense support's loss + backward holds at its peak (scripts/bench_loss.py:
# 5.0 for reverse_kl, 6.1 forward_kl, 9.1 js, whose f makes the most temporaries)
DENSE_CHUNK_COPIES = 10
CHUNK_COPIES_GRAD = 4  # float32 [chunk, V]: the recomputed logits, their log-softmax, and the two gradients
CHUNK_COPIES = 2  # float32 [chunk, V] without grad: the logits and their log-softmax
DECODE_COPIES = 4  # float32 [rows, V] per decoding step: the logits, the processed scores, probabilities, a copy


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a causal LM its memory depends on (``config.json``'s fields)."""

    parameters: int
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Keys and values of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def layer_activation_bytes(self, compute: int, residual: int) -> int:
        """What one decoder layer keeps for backward per token, ``compute`` / ``residual`` bytes per
        element of its matmuls and of the residual stream (Llama / Qwen layers; others are close):
        each RMSNorm's float32 input and its output (cast again for the projections when they
        compute in a lower dtype); q and k before and after their norms and rotary, v and the
        attention's output (SDPA's kernels keep no [T, T] matrix); the MLP's gate, SiLU, up and
        their product."""
        h, i, qk = self.hidden, self.intermediate, (self.heads + self.kv_heads) * self.head_dim
        norms = 2 * h * (4 + residual + (compute if compute < residual else 0))
        qk_norm_copies = 4 * qk if compute < 4 else 0  # the q/k norms' float32 inputs
        return norms + 3 * compute * qk + qk_norm_copies + 4 * compute * i


def model_config(path: str, carried: Mapping[str, Any] | None) -> PretrainedConfig:
    """``path``'s config: its ``config.json`` in a local directory or the hub cache, else the one the
    model file carries (``carried``, with its ``model_type``), else the hub's (a download of one
    small file). ConfigError naming the model when none is at hand."""
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        pass
    if carried:
        values = dict(carried)
        return AutoConfig.for_model(values.pop("model_type"), **values)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"the planner cannot read {path!r}'s config.json: {str(error).splitlines()[0]}. Give a local directory, "
            "or the config in the model file (model.student_config / model.teacher_config)"
        ) from None


def model_shape(path: str, carried: Mapping[str, Any] | None = None) -> ModelShape:
    """The shape of ``path``'s model (``model_config``), with its parameters counted on the meta device."""
    config = model_config(path, carried)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    text = config.get_text_config()
    heads = text.num_attention_heads
    return ModelShape(
        parameters=parameters,
        vocab=text.vocab_size,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )


@dataclass(frozen=True)
class Workload:
    """What a run asks of one rank's device, in sequences and tokens."""

    rows: int  # sequences per step on this rank (its prompts x samples per prompt)
    rollout_rows: int  # sequences per sampling call of the step's rollout
    samples_per_prompt: int
    eval_samples: int  # the eval's samples per prompt (its sampled rollout shares prompts by these)
    prompt_tokens: int  # the longest prompt
    new_tokens: int
    eval_rows: int  # sequences per eval generate call
    eval_new_tokens: int
    logprob_chunk: int  # tokens per logits chunk
    dense_chunk: int  # states per logits chunk of a dense support
    compute_bytes: int  # the student's matmul dtype
    master_bytes: int  # the student's weights, gradients and AdamW state
    teacher_bytes: int
    shards: int  # FSDP2 ranks the student's state is sharded over
    gradient_checkpointing: bool  # each layer's input alone is kept; the prompt's forward is not shared then
    dense: bool  # the estimator's support needs both models' full logits (estimator.support topk or full)
    rollout_memory: str  # local (generate on this device) | engine (a vLLM engine here)
    engine_bytes: int  # a colocated engine's reservation
    engine_sleeps: bool  # the engine frees it between samplings (vLLM sleep mode)
    adapters: int = 0  # a LoRA student's adapter parameters (model.lora): they alone have gradients and AdamW state


@dataclass
class Phase:
    """One phase's peak, as named parts in bytes."""

    name: str
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


# (in, out) features of each linear layer of a Llama / Qwen decoder layer, by the name peft targets
LINEAR_SHAPES: dict[str, Callable[[ModelShape], tuple[int, int]]] = {
    "q_proj": lambda s: (s.hidden, s.heads * s.head_dim),
    "k_proj": lambda s: (s.hidden, s.kv_heads * s.head_dim),
    "v_proj": lambda s: (s.hidden, s.kv_heads * s.head_dim),
    "o_proj": lambda s: (s.heads * s.head_dim, s.hidden),
    "gate_proj": lambda s: (s.hidden, s.intermediate),
    "up_proj": lambda s: (s.hidden, s.intermediate),
    "down_proj": lambda s: (s.intermediate, s.hidden),
}


def adapter_parameters(student: ModelShape, lora: LoraConfig) -> int:
    """The parameters of ``lora``'s adapters on ``student``: r (in + out) per adapted linear layer
    (A is [r, in], B [out, r]), over ``LINEAR_SHAPES`` (all of them for ``all-linear``, or when a
    target is not among them, erring high); 0 without adapters."""
    if not lora.r:
        return 0
    targets = lora.targets()
    if targets == LORA_ALL_LINEAR or not set(targets) <= set(LINEAR_SHAPES):
        targets = list(LINEAR_SHAPES)
    return lora.r * student.layers * sum(sum(LINEAR_SHAPES[name](student)) for name in targets)


def forward_tokens(rows: int, group: int, prompt: int, new: int, shared: bool) -> int:
    """Positions a forward over ``rows`` sequences of ``prompt`` + ``new`` tokens runs: a group of
    ``group`` samples of one prompt runs the prompt once where it is ``shared``
    (``opdx.policy.shared_prompt_cache``)."""
    return (-(-rows // group) if shared else rows) * prompt + rows * new


def dense_loss_bytes(states: int, vocab: int) -> int:
    """The peak extra bytes of a dense support's loss + backward over chunks of ``states`` states
    (``opdx.objective.dense_state_terms``): DENSE_CHUNK_COPIES float32 [states, V] tensors (both
    models' logits and log-probs, the categories' terms, their gradients), measured by
    ``scripts/bench_loss.py``."""
    return DENSE_CHUNK_COPIES * states * vocab * 4


def attention_bytes(rows: int, tokens: int) -> int:
    """The boolean 4-D [rows, 1, T, T] mask transformers builds for a padded batch. SDPA's kernels
    (flash and memory-efficient on GPUs, flash on CPUs) keep no [T, T] probabilities."""
    return rows * tokens * tokens


def phases(student: ModelShape, teachers: list[ModelShape], w: Workload, micro: int) -> list[Phase]:
    """Each phase's peak on one rank for micro-batches of ``micro`` sequences; ``teachers`` are the
    teachers on this device (all resident, the largest one scoring)."""
    teacher = max(teachers, key=lambda shape: shape.parameters, default=None)
    tokens = w.prompt_tokens + w.new_tokens
    weights = (student.parameters + w.adapters) * w.master_bytes // w.shards
    trained = (w.adapters or student.parameters) * w.master_bytes // w.shards  # what has gradients
    optimizer = 2 * trained  # AdamW's exp_avg and exp_avg_sq, in the weights' dtype
    autocast = student.parameters * w.compute_bytes if w.compute_bytes < w.master_bytes else 0  # cast copies
    resident = {"student weights": weights, "optimizer state": optimizer}
    if teachers:
        resident["teacher weights"] = sum(shape.parameters for shape in teachers) * w.teacher_bytes
    engine = {"vLLM engine": w.engine_bytes} if w.rollout_memory == "engine" else {}
    if not w.engine_sleeps:
        resident |= engine

    def sampling(model: ModelShape, rows: int, new_tokens: int, dtype: int, casts: int) -> dict[str, int]:
        length = w.prompt_tokens + new_tokens
        prefill = rows * w.prompt_tokens * (2 * model.hidden + model.intermediate) * dtype
        return {
            "KV cache": rows * length * model.kv_bytes_per_token(dtype),
            "prefill": prefill + attention_bytes(rows, w.prompt_tokens),
            "decoding logits": DECODE_COPIES * rows * model.vocab * 4,
            **({"bf16 weight casts": casts} if casts else {}),
        }

    rollout = Phase("rollout", resident | engine)
    if w.rollout_memory == "local":
        rollout.parts |= sampling(student, w.rollout_rows, w.new_tokens, w.compute_bytes, autocast)
    result = [rollout]

    def scoring(rows: int, group: int, new_tokens: int, dense: bool) -> dict[str, int]:
        """The teacher's no-grad forward over ``rows`` sequences in groups of ``group``, one layer's
        tensors at a time (the residual, normed and attention streams; the MLP's gate, up, SiLU
        and product)."""
        length = w.prompt_tokens + new_tokens
        positions = forward_tokens(rows, group, w.prompt_tokens, new_tokens, shared=True)
        layer = positions * (4 * teacher.hidden + 4 * teacher.intermediate) * w.teacher_bytes
        upcast = teacher.vocab * teacher.hidden * 4 if w.teacher_bytes < 4 else 0  # a float32 head per chunk
        chunk = min(w.logprob_chunk, rows * new_tokens)
        return {
            "forward": layer + positions * teacher.hidden * w.teacher_bytes,
            "attention": attention_bytes(rows, length),
            # a dense support keeps the hidden states, whose logits the loss makes chunk by chunk
            **({"hidden states": rows * new_tokens * teacher.hidden * 4} if dense else {}),
            "logits chunk": 0 if dense else CHUNK_COPIES * chunk * teacher.vocab * 4 + upcast,
        }

    if teacher is not None:
        result.append(Phase("teacher", resident | scoring(micro, w.samples_per_prompt, w.new_tokens, w.dense)))
    residual = 4 if w.master_bytes >= 4 else w.compute_bytes  # float32 embeddings keep a float32 stream
    per_token = student.layer_activation_bytes(w.compute_bytes, residual)
    shared = not w.gradient_checkpointing and w.shards == 1  # FSDP2 cannot run a layer twice in one forward
    positions = forward_tokens(micro, w.samples_per_prompt, w.prompt_tokens, w.new_tokens, shared)
    if w.gradient_checkpointing:
        activations = positions * (student.layers * student.hidden * residual + per_token)
    else:
        activations = positions * student.layers * per_token
    update = {
        "gradients": trained,
        "activations": activations + positions * student.hidden * 4,
        "attention": attention_bytes(micro, tokens),
        "logits chunk": CHUNK_COPIES_GRAD * min(w.logprob_chunk, micro * w.new_tokens) * student.vocab * 4,
        **({"bf16 weight casts": autocast} if autocast else {}),
    }
    if w.dense:  # both models' logits, chunk by chunk from the hidden states; the teacher's kept for it
        update["logits chunk"] = dense_loss_bytes(min(w.dense_chunk, micro * w.new_tokens), student.vocab)
        update["teacher hidden"] = micro * w.new_tokens * (teacher.hidden if teacher else 0) * 4
    result.append(Phase("update", resident | update))
    # the student's eval samples, then the teacher scores them (its reverse KL); the teacher's own
    # eval samples at step 0, before AdamW's lazy state exists
    evals = [Phase("eval", resident | engine)]
    if w.rollout_memory == "local":
        evals[0].parts |= sampling(student, w.eval_rows, w.eval_new_tokens, w.compute_bytes, autocast)
    if teacher is not None:
        at_step_0 = {key: value for key, value in resident.items() if key != "optimizer state"}
        evals.append(Phase("eval", at_step_0 | sampling(teacher, w.eval_rows, w.eval_new_tokens, w.teacher_bytes, 0)))
        evals.append(Phase("eval", resident | scoring(w.eval_rows, w.eval_samples, w.eval_new_tokens, False)))
    result.append(max(evals, key=lambda p: p.total))
    return result


@dataclass
class Plan:
    """The phases of a run at the chosen sizes, against the device's memory."""

    phases: list[Phase]
    device: str
    device_bytes: int
    headroom: float
    micro_batch_size: int  # sequences per micro-batch (the whole batch: one micro-batch)
    notes: list[str]
    workload: Workload  # at the chosen rollout and eval batches

    @property
    def rows(self) -> int:
        return self.workload.rows

    @property
    def rollout_batch_size(self) -> int:
        """Sequences per sampling call of a step's rollout."""
        return self.workload.rollout_rows

    @property
    def eval_batch_size(self) -> int:
        return self.workload.eval_rows

    @property
    def budget(self) -> int:
        return int(self.device_bytes * self.headroom)

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def fits(self) -> bool:
        return self.peak.total <= self.budget

    def lines(self) -> list[str]:
        """The plan as the lines ``opdx plan`` prints; the last one says whether it fits."""
        out = [*self.notes]
        for phase in self.phases:
            out.append(f"{phase.name:<22} {size(phase.total):>10}")
            out += [f"  {name:<20} {size(part):>10}" for name, part in phase.parts.items()]
        sizes = (self.micro_batch_size, self.rollout_batch_size)
        micro, rollout = ("the whole batch" if size >= self.rows else f"{size}" for size in sizes)
        out.append(
            f"micro-batch: {micro}; rollout batch: {rollout} ({self.rows} sequences per step on a rank); "
            f"eval batch: {self.eval_batch_size}"
        )
        verdict = "fits" if self.fits else f"does not fit ({self.peak.name})"
        of = f"{size(self.budget)} ({self.headroom:.0%} of {size(self.device_bytes)}, {self.device})"
        out.append(f"peak {size(self.peak.total)} of {of}: {verdict}")
        return out


def size(bytes_: int) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{bytes_ / GIB:.1f} GiB" if bytes_ >= GIB else f"{bytes_ / 2**20:.1f} MiB"


def count(parameters: int) -> str:
    """A parameter count in billions, or millions below one billion."""
    return f"{parameters / 1e9:.3g}B" if parameters >= 1e9 else f"{parameters / 1e6:.3g}M"


def halvings(start: int, multiple: int = 1) -> list[int]:
    """``start``, then halved (rounded up) down to ``multiple``, each a multiple of ``multiple``."""
    sizes, size = [], start
    while True:
        rounded = max(multiple, size // multiple * multiple)
        if not sizes or rounded < sizes[-1]:
            sizes.append(rounded)
        if rounded <= multiple:
            return sizes
        size = -(-size // 2)


def rollout_rows(size: int | None, rows: int, group: int) -> int:
    """Sequences per sampling call for ``trainer.rollout_batch_size=size`` (null: all ``rows``):
    whole groups of ``group`` samples, at least one group."""
    return min(rows, max(1, (size or rows) // group) * group)


def choose(
    student: ModelShape,
    teachers: list[ModelShape],
    workload: Workload,
    micro: int | None,
    rollout: int | None,
    budget: int,
) -> tuple[int, Workload]:
    """The micro-batch (``micro``, or the largest of the halvings of the batch that fits) and the
    workload at the chosen rollout batch (``rollout``, or the largest halving of the batch, whole
    groups, whose rollout fits) and eval batch (the largest halving of ``workload.eval_rows``, a
    multiple of ``workload.eval_samples``, that fits)."""
    for size in [micro] if micro else halvings(workload.rows):
        by_phase = {p.name: p.total for p in phases(student, teachers, workload, size)}
        if max(by_phase["update"], by_phase.get("teacher", 0)) <= budget:
            micro = size
            break
    micro = micro or 1

    def largest(sizes: list[int], key: str, phase: int) -> Workload:
        trials = [replace(workload, **{key: size}) for size in sizes]
        fitting = (w for w in trials if phases(student, teachers, w, micro)[phase].total <= budget)
        return next(fitting, trials[-1])

    group = workload.samples_per_prompt
    workload = largest([rollout] if rollout else halvings(workload.rows, group), "rollout_rows", 0)
    return micro, largest(halvings(workload.eval_rows, workload.eval_samples), "eval_rows", -1)


def device_memory(config: SetupConfig, device: torch.device) -> tuple[int, str]:
    """The memory the plan is for: ``plan.gpu_memory_gib``, else the CUDA device's total, else
    (a CPU run) the machine's RAM."""
    if config.plan.gpu_memory_gib:
        return int(config.plan.gpu_memory_gib * GIB), "plan.gpu_memory_gib"
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, torch.cuda.get_device_name(device)
    import psutil

    return psutil.virtual_memory().total, "CPU RAM"


def plan_run(
    config: RunConfig,
    device: torch.device,
    world: int,
    prompt_tokens: int,
    dense: bool,
    rollout_memory: str,
    teachers: Mapping[str, Mapping[str, Any] | None],
    notes: list[str] | None = None,
) -> Plan:
    """The plan of a training run on one of ``world`` ranks whose longest prompt has
    ``prompt_tokens`` tokens. ``rollout_memory`` says where the sampler holds memory (``local``:
    ``generate`` on this device; ``engine``: a colocated vLLM engine); ``teachers`` are the teachers
    whose weights are on this device, by path, with the config their model file carries."""
    t, m = config.trainer, config.model
    world = config.plan.gpus or world
    device_bytes, device_name = device_memory(config, device)
    rows = -(-t.prompts_per_step // world) * t.samples_per_prompt
    compute = getattr(torch, m.dtype).itemsize
    master = 4 if t.precision == "bf16-mixed" else compute
    engine = 0
    on_gpu = device.type == "cuda" or config.plan.gpu_memory_gib is not None  # vLLM reads its share on GPUs
    sleeps = on_gpu if config.rollout.get("sleep") is None else bool(config.rollout.get("sleep"))
    if rollout_memory == "engine":
        share = config.rollout.get("gpu_memory_utilization", 0.0) if on_gpu else 0.0
        engine = int(share * device_bytes) or int(config.rollout.get("kv_cache_memory_bytes") or CPU_KV_CACHE_BYTES)
    e = config.eval
    student = model_shape(m.student, m.student_config)
    workload = Workload(
        rows=rows,
        rollout_rows=rows,
        samples_per_prompt=t.samples_per_prompt,
        eval_samples=max(e.n, 1),
        prompt_tokens=prompt_tokens,
        new_tokens=config.sampling.max_new_tokens,
        eval_rows=min(e.batch_size, max(e.n, 1) * e.problems),
        eval_new_tokens=e.max_new_tokens or config.sampling.max_new_tokens,
        logprob_chunk=config.runtime.logprob_chunk,
        dense_chunk=config.runtime.dense_chunk,
        compute_bytes=compute,
        master_bytes=master,
        teacher_bytes=getattr(torch, m.teacher_dtype).itemsize,
        shards=world if t.strategy == "fsdp2" else 1,
        gradient_checkpointing=t.gradient_checkpointing,
        dense=dense,
        rollout_memory=rollout_memory,
        engine_bytes=engine,
        engine_sleeps=rollout_memory == "engine" and sleeps,
        adapters=adapter_parameters(student, m.lora),
    )
    shapes = {path: model_shape(path, carried) for path, carried in teachers.items()}
    budget = int(device_bytes * config.plan.headroom)
    micro = None if t.micro_batch_size == "auto" else (t.micro_batch_size or rows)
    rollout = None if t.rollout_batch_size == "auto" else rollout_rows(t.rollout_batch_size, rows, t.samples_per_prompt)
    micro, chosen = choose(student, list(shapes.values()), workload, micro, rollout, budget)
    notes = [*(notes or [])]
    named = [f"{path}: {count(shape.parameters)}" for path, shape in shapes.items()] or ["none on this device"]
    notes.append(f"student {m.student}: {count(student.parameters)} parameters; teacher {', '.join(named)}")
    if workload.adapters:
        notes.append(f"LoRA adapters of rank {m.lora.r} on {m.lora.target_modules}: {count(workload.adapters)} train")
    notes.append(
        f"{rows} sequences per step on a rank of {world}, prompts of up to {prompt_tokens} tokens + "
        f"{workload.new_tokens} new; {t.precision}, {t.strategy}"
    )
    return Plan(
        phases(student, list(shapes.values()), chosen, micro), device_name, device_bytes, config.plan.headroom, micro,
        notes, chosen,
    )  # fmt: skip
