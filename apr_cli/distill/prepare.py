"""Preparing a run: teacher, student, data and backend resolved and checked; its plan."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from apr_cli.data.source import BatchSource, SyntheticBatchSource
from apr_cli.distill.backend import Backend, seed_everything, select_backend
from apr_cli.distill.losses import auto_chunk_tokens
from apr_cli.distill.options import DistillOptions
from apr_cli.distill.parallel import load_local_shards
from apr_cli.distill.pipeline import Pipeline, TrainConfig
from apr_cli.errors import AprError
from apr_cli.model.checkpoint import init_student_from_teacher, load_model, parse_teacher_layers
from apr_cli.model.qwen2 import Qwen2ForCausalLM, count_parameters
from apr_cli.model.vocab import shared_vocab_size

# A preset teacher starts from random weights and knows nothing; these CE steps on the same
# batches give it something to teach (enough for the synthetic identity task).
PRESET_TEACHER_WARMUP = 50


@dataclass
class Prepared:
    """Models, data and backend resolved and checked; nothing written yet.

    The models start on the meta device (shapes only); `load_teacher` and `load_student` give
    them weights when a run trains.
    """

    options: DistillOptions
    backend: Backend
    teacher: Qwen2ForCausalLM | None
    student: Qwen2ForCausalLM
    teacher_info: dict[str, Any] | None
    student_info: dict[str, Any]
    source: BatchSource
    vocab_size: int  # rows both models share (the loss covers options.train.vocab_size of them)
    warnings: list[str]

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
        return "Training" if self.teacher is None else "Distillation"


def prepare(options: DistillOptions) -> Prepared:
    """Resolve and check everything a run needs, failing before any file is written.

    Models are built on the meta device from presets and checkpoint headers, so a plan of a 7B
    teacher costs no weights in memory.
    """
    options.validate()
    cfg = options.train
    backend = select_backend(options.device)
    seed_everything(cfg.seed)
    teacher, teacher_info = None, None
    if options.teacher is not None:
        teacher, teacher_info = load_model(options.teacher, dtype=backend.teacher_dtype, meta=True)
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
        student, student_info = load_model(options.student, dtype=torch.float32, meta=True)
    models = [m for m in (teacher, student) if m is not None]
    vocab = (
        shared_vocab_size(teacher.config.vocab_size, student.config.vocab_size)
        if teacher is not None
        else student.config.vocab_size
    )
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
        from apr_cli.data.shards import ShardBatchSource

        source: BatchSource = ShardBatchSource(
            options.dataset,
            vocab_size=cfg.vocab_size,
            rank=backend.rank,
            world_size=backend.world_size,
            shuffle=options.shuffle,
            seed=cfg.seed,
        )
        source.check_seq_len(cfg.seq_len)
    else:
        source = SyntheticBatchSource(
            cfg.vocab_size, rank=backend.rank, world_size=backend.world_size
        )
    return Prepared(
        options, backend, teacher, student, teacher_info, student_info, source, vocab, []
    )


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
        from apr_cli.data.shards import read_meta

        meta_vocab = (read_meta(options.dataset) or {}).get("vocab_size")
        if isinstance(meta_vocab, int) and meta_vocab > 0:
            known.append(meta_vocab)
    for info in (teacher_info, student_info):
        folder = None if info is None or info["path"] is None else Path(info["path"])
        if folder is not None and (folder / "tokenizer.json").is_file():
            from apr_cli.data.tokenizer import load_tokenizer

            known.append(load_tokenizer(folder / "tokenizer.json").vocab_size)
    return min([shared, *known])


def load_teacher(p: Prepared) -> None:
    """Give the teacher its weights (a preset's seeded init, or the checkpoint's)."""
    if p.teacher_info is None:
        return
    if sharded_load(p):
        load_local_shards(p.teacher, Path(p.teacher_info["path"]), p.backend.device)
        return
    p.teacher, _ = load_model(
        p.teacher_info["spec"],
        dtype=p.backend.teacher_dtype,
        device=p.backend.device,
        seed=p.options.train.seed + 1,
    )


def sharded_load(p: Prepared) -> bool:
    """Under --fsdp a checkpoint teacher is read shard by shard; one the run trains (a preset's
    warm-up) or copies layers from (--student-init) is loaded whole."""
    return (
        p.options.fsdp
        and p.backend.world_size > 1
        and p.teacher_info["kind"] != "preset"
        and p.teacher_warmup == 0
        and p.student_info["kind"] != "teacher-layers"
    )


def load_student(p: Prepared) -> None:
    """Give the student its weights: copied from the teacher as it is now, or loaded."""
    if p.student_info["kind"] == "teacher-layers":
        p.student = init_student_from_teacher(p.teacher, p.student_info["layers"]).float()
    else:
        p.student, _ = load_model(
            p.student_info["spec"],
            dtype=torch.float32,
            device=p.backend.device,
            seed=p.options.train.seed,
        )
    if p.teacher is not None and same_model(p.teacher, p.student, p.teacher_info, p.student_info):
        p.warnings.append(
            "warning: teacher and student are the same model: there is nothing to distill"
        )


def same_model(a: Qwen2ForCausalLM, b: Qwen2ForCausalLM, a_info: dict, b_info: dict) -> bool:
    """Same checkpoint folder, or the same shapes holding the same weights."""
    if a_info.get("path") and a_info.get("path") == b_info.get("path") and "layers" not in b_info:
        return True
    if a.config.with_(torch_dtype="") != b.config.with_(torch_dtype=""):
        return False
    b_state = b.state_dict()
    a_state = a.state_dict()
    return all(torch.equal(full(t).float(), b_state[name].float()) for name, t in a_state.items())


def full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor, gathered from its shards (collective) when the teacher is sharded."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def estimate_memory(p: Prepared) -> dict[str, int]:
    """A rough peak: weights, fp32 grads + AdamW moments, activations and logits (bytes)."""
    cfg, s = p.options.train, p.student.config
    vocab = max(m.config.vocab_size for m in (p.teacher, p.student) if m is not None)
    tokens = cfg.batch_size // (cfg.grad_accum * p.backend.world_size) * cfg.seq_len  # per pass
    act_bytes = 2 if p.backend.autocast_dtype is not None else 4
    teacher_weights = count_parameters(p.teacher) * act_bytes if p.teacher is not None else 0
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
    # The chunked loss holds about nine (block, vocab) fp32 tensors, never the full logits.
    block = min(cfg.loss_chunk or auto_chunk_tokens(vocab), tokens)
    logits = block * vocab * 4 * 9
    total = teacher_weights + student_states + activations + logits
    return {
        "teacher_weights": teacher_weights,
        "student_weights_grads_optimizer": student_states,
        "activations": activations,
        "logits": logits,
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
        "backend": p.backend.describe(),
        "hyperparameters": cfg.to_dict(),
        "tokens_per_step": cfg.batch_size * cfg.seq_len,
        "micro_batch_size": cfg.batch_size // (cfg.grad_accum * p.backend.world_size),
        "memory_estimate_bytes": estimate_memory(p),
    }


def warm_up_teacher(p: Prepared, emit: Callable[[str], None]) -> dict[str, Any] | None:
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
    result = Pipeline(p.teacher, None, warm_cfg, p.source, p.backend).train()
    p.teacher.to(p.backend.teacher_dtype)
    p.source.reset()
    emit(
        f"teacher warm-up: {steps} CE steps on the batch source, "
        f"loss {result.initial_loss:.4f} -> {result.final_loss:.4f}"
    )
    return {"steps": steps, "initial_loss": result.initial_loss, "final_loss": result.final_loss}
