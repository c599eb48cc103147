"""Preparing a run: teacher, student, data and backend resolved and checked; its plan."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from apr_cli.data.shards import ShardBatchSource, read_meta
from apr_cli.data.source import BatchSource, SyntheticBatchSource
from apr_cli.distill.backend import Backend, seed_everything, select_backend
from apr_cli.distill.compile_policy import choose_compile
from apr_cli.distill.losses import auto_chunk_tokens
from apr_cli.distill.on_policy import PromptSource, kv_cache_bytes, load_prompts
from apr_cli.distill.options import DistillOptions
from apr_cli.distill.parallel import load_local_shards
from apr_cli.distill.pipeline import Pipeline, StepMetrics, TrainConfig
from apr_cli.distill.sinks import check_installed, parse_report_to
from apr_cli.errors import AprError
from apr_cli.model.checkpoint import init_student_from_teacher, load_model, parse_teacher_layers
from apr_cli.model.qwen2 import Qwen2ForCausalLM, count_parameters
from apr_cli.model.vocab import shared_vocab_size
from apr_cli.teacher_cache.reader import TeacherCache

# A preset teacher starts from random weights and knows nothing; these CE steps on the same
# batches give it something to teach (enough for the synthetic identity task).
PRESET_TEACHER_WARMUP = 50


@dataclass
class Prepared:
    """Models, data and backend resolved and checked; nothing written yet."""

    options: DistillOptions
    backend: Backend
    teacher: Qwen2ForCausalLM | None
    student: Qwen2ForCausalLM
    teacher_info: dict[str, Any] | None
    student_info: dict[str, Any]
    source: BatchSource
    vocab_size: int  # rows both models share (the loss covers options.train.vocab_size)
    warnings: list[str]
    teacher_cache: TeacherCache | None = None  # stands in for the teacher model
    val_source: ShardBatchSource | None = None  # --val-dataset
    prompts: PromptSource | None = None  # on-policy steps' prompts (--on-policy > 0)

    @property
    def teacher_warmup(self) -> int:
        if self.teacher_info is None:
            return 0
        if self.options.teacher_warmup is not None:
            return self.options.teacher_warmup
        return PRESET_TEACHER_WARMUP if self.teacher_info["kind"] == "preset" else 0

    @property
    def verb(self) -> str:
        """What the run does, for its summary line."""
        return "Training" if self.teacher_info is None else "Distillation"


def set_threads(requested: int) -> None:
    """--threads N; else OMP_NUM_THREADS if the user set it; else one thread per core this
    process may use, shared among torchrun's ranks on this host.

    With idle threads sleeping (OMP_WAIT_POLICY=PASSIVE, set by `apr`), that stays fast when
    other jobs hold some of the cores: benchmarks/bench_threads.py, docs/performance.md.
    """
    if requested:
        torch.set_num_threads(requested)
    elif "OMP_NUM_THREADS" not in os.environ:
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // ranks_here))


def prepare(options: DistillOptions, plan_only: bool = False) -> Prepared:
    """Resolve and check everything a run needs, failing before any file is written.

    `plan_only` checks the models but builds them on the meta device: a plan for a 30B teacher
    reads no weights and needs no memory for them.
    """
    options = options.absolute()
    options.validate()
    set_threads(options.threads)
    cfg = options.train
    # One step's token ids alone must fit in memory: a mistyped --batch-size would otherwise
    # fail at step 1 with an allocator error, after the run directory was written.
    ids_bytes = cfg.batch_size * (cfg.seq_len + 1) * 8  # (B, T+1) int64
    if ids_bytes > physical_memory():
        raise AprError(
            f"--batch-size {cfg.batch_size} x --seq-len {cfg.seq_len}: the token ids alone need "
            f"{ids_bytes / 2**30:,.0f} GiB, more than this machine's "
            f"{physical_memory() / 2**30:,.0f} GiB of memory"
        )
    backend = select_backend(options.device, options.dtype)
    seed_everything(cfg.seed)
    device = torch.device("meta") if plan_only else backend.device
    teacher, teacher_info = None, None
    if options.teacher is not None:
        # Checked on the meta device first: under --fsdp a checkpoint is then read shard by shard.
        teacher, teacher_info = load_model(
            options.teacher, dtype=backend.teacher_dtype, device="meta"
        )
        if not plan_only:
            teacher = load_teacher(teacher, teacher_info, options, backend)
    if options.student_init is not None:
        if teacher is None:
            raise AprError("--student-init needs a --teacher to take layers from")
        layers = parse_teacher_layers(options.student_init, teacher.config.num_hidden_layers)
        student = init_student_from_teacher(teacher, layers).float()
        student_info = {
            "spec": options.student_init,
            "kind": "teacher-layers",
            "layers": layers,
            "path": teacher_info["path"],
            "config": student.config.to_dict(),
            "parameters": count_parameters(student),
            "dtype": "float32",
        }
    else:
        # Student weights stay fp32: they are the optimizer's master copy.
        student, student_info = load_model(
            options.student, dtype=torch.float32, device=device, seed=cfg.seed
        )
    models = [m for m in (teacher, student) if m is not None]
    vocab = (
        shared_vocab_size(teacher.config.vocab_size, student.config.vocab_size)
        if teacher is not None
        else student.config.vocab_size
    )
    cache = None
    if options.teacher_cache is not None:
        cache = TeacherCache(options.teacher_cache)  # checks every shard's size and hash
        teacher_info = cache_teacher_info(cache)
        vocab = cache.check_vocab(student.config.vocab_size)
    # Recorded in the options (hence the manifest and checkpoints) so a resume uses the same rows.
    cfg.vocab_size = loss_vocab_size(options, vocab, teacher_info, student_info)
    context = min(m.config.max_position_embeddings for m in models)
    cfg.validate(max_seq_len=context)
    if cfg.batch_size % (cfg.grad_accum * backend.world_size):
        raise AprError(
            f"--batch-size {cfg.batch_size} is not a multiple of --grad-accum {cfg.grad_accum} "
            f"x world size {backend.world_size}"
        )
    if options.dataset is not None:
        source: BatchSource = ShardBatchSource(
            options.dataset,
            vocab_size=cfg.vocab_size,
            rank=backend.rank,
            world_size=backend.world_size,
            shuffle=options.shuffle,
            seed=cfg.seed,
        )
        source.check_seq_len(cfg.seq_len)
        if cache is not None:
            # Every window the run will read, from step 0 (a resume reads a subset).
            needed = source.windows_needed(cfg.steps * cfg.batch_size, cfg.seq_len)
            cache.check_run(options.dataset, cfg.seq_len, cfg.temperature, needed)
    else:
        source = SyntheticBatchSource(
            cfg.vocab_size, rank=backend.rank, world_size=backend.world_size
        )
    val_source = None
    if options.val_dataset is not None:
        val_source = ShardBatchSource(options.val_dataset, vocab_size=cfg.vocab_size)
        val_source.check_seq_len(cfg.seq_len)
    check_installed(parse_report_to(options.report_to))
    prompts = None
    if options.on_policy.enabled:
        prompts = load_prompts(
            options.on_policy,
            options.dataset,
            student_info.get("path"),
            cfg.vocab_size,
            cfg.seq_len,
            cfg.seed,
            backend.rank,
            backend.world_size,
        )
    warnings = []
    if teacher is not None and same_model(teacher, student, teacher_info, student_info):
        warnings.append(
            "warning: teacher and student are the same model: there is nothing to distill"
        )
    return Prepared(
        options,
        backend,
        teacher,
        student,
        teacher_info,
        student_info,
        source,
        vocab,
        warnings,
        cache,
        val_source,
        prompts,
    )


def load_teacher(
    meta: Qwen2ForCausalLM, info: dict[str, Any], options: DistillOptions, backend: Backend
) -> Qwen2ForCausalLM:
    """The checked meta teacher given its weights: under --fsdp a checkpoint's blocks are read
    shard by shard, each rank only its rows; otherwise (a preset's seeded init, a teacher the
    run warms up or copies layers from, a GGUF) it is loaded whole."""
    sharded = (
        options.fsdp
        and backend.world_size > 1
        and info["kind"] in ("local", "hub")
        and not options.teacher_warmup
        and options.student_init is None
    )
    if sharded:
        load_local_shards(meta, Path(info["path"]), backend.device)
        return meta
    teacher, _ = load_model(
        options.teacher,
        dtype=backend.teacher_dtype,
        device=backend.device,
        seed=options.train.seed + 1,
    )
    return teacher


def loss_vocab_size(
    options: DistillOptions, shared: int, teacher_info: dict | None, student_info: dict
) -> int:
    """Rows the loss covers: --vocab-size, else the real vocabulary when one is known (the
    dataset's meta.json, a model folder's tokenizer.json), else every row the models share.

    Qwen2.5's configs have 151936 or 152064 rows for 151665 tokens; the rest were never trained.
    """
    asked = options.train.vocab_size
    if asked > 0:
        if asked > shared:
            raise AprError(f"--vocab-size {asked} exceeds the {shared} rows the models share")
        return asked
    known = []
    if options.dataset is not None:
        meta_vocab = (read_meta(options.dataset) or {}).get("vocab_size")
        if isinstance(meta_vocab, int) and meta_vocab > 0:
            known.append(meta_vocab)
    for info in (teacher_info, student_info):
        folder = None if info is None or info["path"] is None else Path(info["path"])
        if folder is not None and (folder / "tokenizer.json").is_file():
            from apr_cli.data.tokenizer import load_tokenizer  # the tokenizers package, if needed

            known.append(load_tokenizer(folder / "tokenizer.json").vocab_size)
    return min([shared, *known])


def cache_teacher_info(cache: TeacherCache) -> dict[str, Any]:
    """The manifest's teacher entry for a cached teacher: the cache and its fingerprints."""
    report = cache.describe()
    return {
        **{k: report["teacher"][k] for k in ("spec", "config", "parameters", "fingerprint")},
        "kind": f"teacher-cache ({cache.kind})",
        "path": report["path"],
        "dtype": report["compute_dtype"],
        "cache": report,
    }


def physical_memory() -> int:
    """Bytes of RAM in this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def same_model(a: Qwen2ForCausalLM, b: Qwen2ForCausalLM, a_info: dict, b_info: dict) -> bool:
    """Same checkpoint folder, or the same shapes holding the same weights."""
    if a_info.get("path") and a_info.get("path") == b_info.get("path") and "layers" not in b_info:
        return True
    if a.config.with_(torch_dtype="") != b.config.with_(torch_dtype="") or a.output_weight.is_meta:
        return False
    b_state = b.state_dict()
    a_state = a.state_dict()
    return all(torch.equal(full(t).float(), b_state[name].float()) for name, t in a_state.items())


def full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor, gathered from its shards (collective) when the teacher is sharded."""
    from torch.distributed.tensor import DTensor  # seconds to import: only when compared

    return t.full_tensor() if isinstance(t, DTensor) else t


def estimate_memory(p: Prepared) -> dict[str, int]:
    """A rough peak: weights, fp32 grads + AdamW moments, activations and logits (bytes)."""
    cfg, s = p.options.train, p.student.config
    vocab = max(m.config.vocab_size for m in (p.teacher, p.student) if m is not None)
    tokens = cfg.batch_size // (cfg.grad_accum * p.backend.world_size) * cfg.seq_len  # per pass
    act_bytes = 2 if p.backend.autocast_dtype is not None else 4
    teacher_weights = count_parameters(p.teacher) * act_bytes if p.teacher is not None else 0
    if p.teacher_cache is not None and p.teacher_cache.kind == "hidden":
        teacher_config = p.teacher_cache.header.teacher["config"]
        vocab = max(vocab, teacher_config["vocab_size"])  # its output weight, in fp32
        teacher_weights = teacher_config["vocab_size"] * teacher_config["hidden_size"] * 4
    student_states = count_parameters(p.student) * 16  # weights, grads, two moments, fp32
    if p.options.fsdp:  # each rank holds 1/world of the shards (whole teacher head aside)
        student_states //= p.backend.world_size
        teacher_weights //= p.backend.world_size
    # ~16 saved tensors of width hidden per layer and token, for backward; with activation
    # checkpointing one per layer, plus one block's 16 while it is recomputed.
    saved = s.num_hidden_layers * 16
    if cfg.activation_checkpointing:
        saved = s.num_hidden_layers + 16
    activations = tokens * s.hidden_size * saved * act_bytes
    # The chunked loss holds four (block, vocab) fp32 buffers and, in bf16, one bf16 buffer.
    matmul_dtype = p.backend.autocast_dtype or torch.float32
    block = min(cfg.loss_chunk or auto_chunk_tokens(vocab, matmul_dtype), tokens)
    logits = block * vocab * (4 * 4 + (2 if p.backend.autocast_dtype is not None else 0))
    kv_cache = 0
    if p.options.on_policy.enabled:
        sampler = p.teacher if p.options.on_policy.teacher_samples else p.student
        kv_cache = kv_cache_bytes(sampler, tokens // cfg.seq_len, cfg.seq_len)
    total = teacher_weights + student_states + activations + logits + kv_cache
    return {
        "teacher_weights": teacher_weights,
        "student_weights_grads_optimizer": student_states,
        "activations": activations,
        "logits": logits,
        "sampling_kv_cache": kv_cache,
        "total": total,
    }


def plan(p: Prepared) -> dict[str, Any]:
    """What a run would do, as the manifest and `--plan` show it."""
    cfg = p.options.train
    return {
        "teacher": p.teacher_info,
        "student": p.student_info,
        "teacher_warmup_steps": p.teacher_warmup,
        "shared_vocab_size": p.vocab_size,
        "loss_vocab_size": cfg.vocab_size,  # the real vocabulary when known; data ids stay below
        "data": p.source.describe(),
        "on_policy": None
        if p.prompts is None
        else {**p.options.on_policy.to_dict(), "prompt_source": p.prompts.describe()},
        "backend": p.backend.describe(),
        "compile": asdict(choose_compile(cfg.compile, p.backend.device, cfg.steps)),
        "hyperparameters": cfg.to_dict(),
        "tokens_per_step": cfg.batch_size * cfg.seq_len,
        "micro_batch_size": cfg.batch_size // (cfg.grad_accum * p.backend.world_size),
        "memory_estimate_bytes": estimate_memory(p),
    }


class WarmupProgress:
    """A line every tenth of the warm-up, so the phase is never silent for long; every step
    goes to `on_step(step, steps)` (a terminal's progress bar)."""

    def __init__(
        self, emit: Callable[[str], None], on_step: Callable[[int, int], None] | None = None
    ):
        self.emit, self.on_progress = emit, on_step

    def on_step(self, m: StepMetrics) -> None:
        if self.on_progress is not None:
            self.on_progress(m.step, m.steps)
        if m.step % max(1, m.steps // 10) == 0:
            self.emit(f"teacher warm-up: step {m.step}/{m.steps} loss={m.loss:.4f}")


def warm_up_teacher(
    p: Prepared,
    emit: Callable[[str], None],
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, Any] | None:
    """Train a preset teacher with CE on the run's batches, then rewind the source."""
    steps = p.teacher_warmup
    if steps == 0:
        return None
    cfg = p.options.train
    warm_cfg = TrainConfig(
        steps=steps,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        grad_accum=cfg.grad_accum,
        lr=cfg.lr,
        warmup=min(cfg.warmup, steps),
        seed=cfg.seed,
    )
    # The teacher is trained in fp32 and frozen afterwards by the distillation pipeline.
    p.teacher.float().train().requires_grad_(True)
    emit(
        f"teacher warm-up: training the untrained preset teacher for {steps} CE steps first "
        "(--teacher-warmup 0 skips it)"
    )
    warm_up = Pipeline(p.teacher, None, warm_cfg, p.source, p.backend)
    result = warm_up.train(WarmupProgress(emit, on_step))
    if p.student_info["kind"] == "teacher-layers":  # the student starts from what it learned
        p.student = init_student_from_teacher(p.teacher, p.student_info["layers"]).float()
    p.teacher.to(p.backend.teacher_dtype)
    p.source.reset()
    emit(
        f"teacher warm-up: {steps} CE steps on the batch source, "
        f"loss {result.initial_loss:.4f} -> {result.final_loss:.4f}"
    )
    return {"steps": steps, "initial_loss": result.initial_loss, "final_loss": result.final_loss}
