"""`apr train`: the distill pipeline with no teacher (cross-entropy on the labels alone)."""

from __future__ import annotations

from typing import Annotated

import typer

from apr_cli.commands.config_option import ConfigFile
from apr_cli.commands.options import (
    MODELS,
    ActivationCheckpointing,
    BatchSize,
    Compile,
    Dataset,
    Device,
    Dtype,
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
    Threads,
    ValDataset,
    VocabSize,
    Warmup,
    WeightDecay,
)
from apr_cli.commands.training import RunFlags, run_training
from apr_cli.distill.options import DEFAULT_STUDENT, DistillOptions, TrainConfig


def train(
    student: Annotated[  # named after the options field it sets: --config finds it by name
        str,
        typer.Option(
            "--model",
            help="Model to train: a local Hugging Face folder, a .gguf file, a hub id in the "
            "local cache, or a preset (freshly initialised from --seed). Saved as "
            "RUN/student-trained.apr.",
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
    compile: Compile = None,
    activation_checkpointing: ActivationCheckpointing = False,
    vocab_size: VocabSize = TrainConfig.vocab_size,
    fsdp: Fsdp = False,
    threads: Threads = DistillOptions.threads,
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
    options = DistillOptions(
        teacher=None,
        student=student,
        dataset=dataset,
        shuffle=shuffle,
        device=device,
        dtype=dtype,
        save_every=save_every,
        fsdp=fsdp,
        keep_checkpoints=keep_checkpoints,
        val_dataset=val_dataset,
        eval_every=eval_every,
        eval_windows=eval_windows,
        keep_best=keep_best,
        report_to=report_to,
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
            compile=compile,
            activation_checkpointing=activation_checkpointing,
            vocab_size=vocab_size,
        ),
    )
    flags = RunFlags(out, resume, overwrite, plan_only, json_output)
    run_training(options, DistillOptions(teacher=None), flags, "train")
