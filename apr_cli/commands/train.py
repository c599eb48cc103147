"""`apr train`: the distill pipeline with no teacher (cross-entropy on the labels alone)."""

from __future__ import annotations

from typing import Annotated

import typer

from apr_cli.commands.config_option import ConfigFile
from apr_cli.commands.options import (
    MODELS,
    BatchSize,
    Compile,
    Dataset,
    Device,
    EvalEvery,
    EvalWindows,
    Fsdp,
    GradAccum,
    GradClip,
    JsonOutput,
    KeepBest,
    KeepCheckpoints,
    LossChunk,
    Lr,
    Out,
    Overwrite,
    PlanOnly,
    ReportTo,
    Resume,
    SaveEvery,
    Seed,
    SeqLen,
    Shuffle,
    Steps,
    ValDataset,
    Warmup,
    WeightDecay,
)
from apr_cli.commands.training import run_training
from apr_cli.distill.pipeline import TrainConfig
from apr_cli.distill.run import DEFAULT_STUDENT, DistillOptions

DEFAULTS = TrainConfig()


def train(
    ctx: typer.Context,
    student: Annotated[  # named after the options field it sets: --config finds it by name
        str,
        typer.Option(
            "--model",
            help="Model to train: a local Hugging Face folder, a hub id in the local cache, or a "
            "preset (freshly initialised from --seed). Saved as RUN/student-trained.apr.",
            rich_help_panel=MODELS,
        ),
    ] = DEFAULT_STUDENT,
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
    loss_chunk: LossChunk = DEFAULTS.loss_chunk,
    compile: Compile = False,
    fsdp: Fsdp = False,
    out: Out = None,
    resume: Resume = None,
    val_dataset: ValDataset = None,
    eval_every: EvalEvery = DistillOptions.eval_every,
    eval_windows: EvalWindows = DistillOptions.eval_windows,
    keep_best: KeepBest = False,
    report_to: ReportTo = DistillOptions.report_to,
    config: ConfigFile(DistillOptions(teacher=None), "train") = None,
    save_every: SaveEvery = DistillOptions.save_every,
    keep_checkpoints: KeepCheckpoints = DistillOptions.keep_checkpoints,
    overwrite: Overwrite = False,
    plan_only: PlanOnly = False,
    json_output: JsonOutput = False,
) -> None:
    """Train a model on the labels alone (cross-entropy, no teacher): baselines and teachers.

    The same pipeline, run directory, --resume, --plan and --json as `apr distill`.
    """
    run_training(ctx, DistillOptions(teacher=None), "train")
