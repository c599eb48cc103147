"""`apr distill`: train a student to match a teacher; the options, then the shared run body."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from apr_cli.commands.common import fail
from apr_cli.commands.options import (
    LOSS,
    MODELS,
    BatchSize,
    Compile,
    Dataset,
    Device,
    Fsdp,
    GradAccum,
    GradClip,
    JsonOutput,
    KeepCheckpoints,
    LossChunk,
    Lr,
    Out,
    Overwrite,
    PlanOnly,
    Resume,
    SaveEvery,
    Seed,
    SeqLen,
    Shuffle,
    Steps,
    Warmup,
    WeightDecay,
)
from apr_cli.commands.training import run_training, typed
from apr_cli.distill.losses import LOSS_KINDS
from apr_cli.distill.pipeline import TrainConfig
from apr_cli.distill.run import DEFAULT_STUDENT, DEFAULT_TEACHER, DistillOptions

DEFAULTS = TrainConfig()


def distill(
    ctx: typer.Context,
    teacher: Annotated[
        str,
        typer.Option(
            help="Teacher: a local Hugging Face folder, a hub id in the local cache, or a preset.",
            rich_help_panel=MODELS,
        ),
    ] = DEFAULT_TEACHER,
    teacher_cache: Annotated[
        Path | None,
        typer.Option(
            help="A teacher cache (apr teacher-cache build) instead of --teacher: no teacher "
            "model is loaded; --dataset and --seq-len must be the cache's.",
            exists=True,
            file_okay=False,
            rich_help_panel=MODELS,
        ),
    ] = None,
    student: Annotated[
        str,
        typer.Option(
            help="Student: a local Hugging Face folder, a hub id in the local cache, or a preset "
            "(freshly initialised from --seed).",
            rich_help_panel=MODELS,
        ),
    ] = DEFAULT_STUDENT,
    student_init: Annotated[
        str | None,
        typer.Option(
            help="Build the student from the teacher instead of --student: "
            "teacher-layers:0,2,4 or teacher-layers:every-other.",
            rich_help_panel=MODELS,
        ),
    ] = None,
    teacher_warmup: Annotated[
        int | None,
        typer.Option(
            help="CE steps that train the teacher on the batches before distilling "
            "[default: 50 for a preset teacher, which starts untrained; 0 otherwise].",
            rich_help_panel=MODELS,
        ),
    ] = None,
    dataset: Dataset = None,
    shuffle: Shuffle = False,
    seq_len: SeqLen = DEFAULTS.seq_len,
    batch_size: BatchSize = DEFAULTS.batch_size,
    steps: Steps = DEFAULTS.steps,
    lr: Lr = DEFAULTS.lr,
    warmup: Warmup = DEFAULTS.warmup,
    grad_accum: GradAccum = DEFAULTS.grad_accum,
    grad_clip: GradClip = DEFAULTS.grad_clip,
    weight_decay: WeightDecay = DEFAULTS.weight_decay,
    seed: Seed = DEFAULTS.seed,
    device: Device = "auto",
    loss: Annotated[
        str,
        typer.Option(help=f"KD divergence: {', '.join(LOSS_KINDS)}.", rich_help_panel=LOSS),
    ] = DEFAULTS.loss,
    temperature: Annotated[
        float,
        typer.Option(help="Softmax temperature T of both models.", rich_help_panel=LOSS),
    ] = DEFAULTS.temperature,
    alpha: Annotated[
        float,
        typer.Option(
            help="Weight of the KD term: loss = alpha * T^2 * KD + (1 - alpha) * CE.",
            rich_help_panel=LOSS,
        ),
    ] = DEFAULTS.alpha,
    beta: Annotated[
        float,
        typer.Option(help="JSD mixture weight (--loss jsd), in (0, 1).", rich_help_panel=LOSS),
    ] = DEFAULTS.beta,
    loss_chunk: LossChunk = DEFAULTS.loss_chunk,
    compile_models: Compile = False,
    fsdp: Fsdp = False,
    out: Out = None,
    resume: Resume = None,
    save_every: SaveEvery = DistillOptions.save_every,
    keep_checkpoints: KeepCheckpoints = DistillOptions.keep_checkpoints,
    overwrite: Overwrite = False,
    plan_only: PlanOnly = False,
    json_output: JsonOutput = False,
) -> None:
    """Distill a teacher into a student and leave a run directory with the trained student."""
    if teacher_cache is not None:
        if typed(ctx, "teacher"):
            raise fail("--teacher and --teacher-cache: pass one of them, not both")
        ctx.params["teacher"] = None  # the cache stands in for the default teacher
    run_training(ctx, DistillOptions(), "distill")
