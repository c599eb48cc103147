"""`apr train`: the distill pipeline with no teacher (cross-entropy on the labels alone)."""

from __future__ import annotations

from typing import Annotated

import typer

from apr_cli.commands.options import (
    MODELS,
    BatchSize,
    Compile,
    Dataset,
    Device,
    Dtype,
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
    Threads,
    Warmup,
    WeightDecay,
)
from apr_cli.commands.training import RunFlags, run_training
from apr_cli.distill.options import DEFAULT_STUDENT, DistillOptions, TrainConfig


def train(
    model: Annotated[
        str,
        typer.Option(
            help="Model to train: a local Hugging Face folder, a hub id in the local cache, or a "
            "preset (freshly initialised from --seed). Saved as RUN/student-trained.apr.",
            rich_help_panel=MODELS,
        ),
    ] = DEFAULT_STUDENT,
    dataset: Dataset = None,
    shuffle: Shuffle = False,
    seq_len: SeqLen = TrainConfig.seq_len,
    batch_size: BatchSize = TrainConfig.batch_size,
    steps: Steps = TrainConfig.steps,
    lr: Lr = TrainConfig.lr,
    warmup: Warmup = TrainConfig.warmup,
    grad_accum: GradAccum = TrainConfig.grad_accum,
    grad_clip: GradClip = TrainConfig.grad_clip,
    weight_decay: WeightDecay = TrainConfig.weight_decay,
    seed: Seed = TrainConfig.seed,
    device: Device = DistillOptions.device,
    dtype: Dtype = DistillOptions.dtype,
    loss_chunk: LossChunk = TrainConfig.loss_chunk,
    compile_models: Compile = False,
    fsdp: Fsdp = False,
    threads: Threads = DistillOptions.threads,
    out: Out = None,
    resume: Resume = None,
    save_every: SaveEvery = DistillOptions.save_every,
    keep_checkpoints: KeepCheckpoints = DistillOptions.keep_checkpoints,
    overwrite: Overwrite = False,
    plan_only: PlanOnly = False,
    json_output: JsonOutput = False,
) -> None:
    """Train a model on the labels alone (cross-entropy, no teacher): baselines and teachers.

    The same pipeline, run directory, --resume, --plan and --json as `apr distill`.
    """
    options = DistillOptions(
        teacher=None,
        student=model,
        dataset=dataset,
        shuffle=shuffle,
        device=device,
        dtype=dtype,
        save_every=save_every,
        fsdp=fsdp,
        keep_checkpoints=keep_checkpoints,
        threads=threads,
        train=TrainConfig(
            steps=steps,
            batch_size=batch_size,
            seq_len=seq_len,
            grad_accum=grad_accum,
            lr=lr,
            warmup=warmup,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            seed=seed,
            loss_chunk=loss_chunk,
            compile=compile_models,
        ),
    )
    flags = RunFlags(out, resume, overwrite, plan_only, json_output)
    run_training(options, DistillOptions(teacher=None), flags, "train")
