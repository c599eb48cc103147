"""`apr distill`: train a student to match a teacher; the options, then the shared run body."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from apr_cli.commands.config_option import ConfigFile
from apr_cli.commands.options import (
    LOSS,
    MODELS,
    ON_POLICY,
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
    flag,
)
from apr_cli.commands.training import RunFlags, run_training
from apr_cli.distill.options import (
    DEFAULT_STUDENT,
    DEFAULT_TEACHER,
    LOSS_KINDS,
    DistillOptions,
    OnPolicyOptions,
    TrainConfig,
)


def distill(
    teacher: Annotated[
        str | None,
        typer.Option(
            help="Teacher: a local Hugging Face folder, a .gguf file, a hub id in the local "
            "cache, or a preset (Qwen2, Qwen3 or Qwen3-MoE).",
            rich_help_panel=MODELS,
            show_default=f"{DEFAULT_TEACHER}, unless --teacher-cache",
        ),
    ] = None,
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
            help="Student: a local Hugging Face folder, a .gguf file, a hub id in the local cache, "
            "or a preset (freshly initialised from --seed).",
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
            "(a preset teacher starts untrained).",
            show_default="50 for a preset teacher, else 0",
            rich_help_panel=MODELS,
        ),
    ] = None,
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
    loss: Annotated[
        str,
        typer.Option(help=f"KD divergence: {', '.join(LOSS_KINDS)}.", rich_help_panel=LOSS),
    ] = TrainConfig.loss,
    temperature: Annotated[
        float,
        typer.Option(help="Softmax temperature T of both models.", rich_help_panel=LOSS),
    ] = TrainConfig.temperature,
    alpha: Annotated[
        float,
        typer.Option(
            help="Weight of the KD term: loss = alpha * T^2 * KD + (1 - alpha) * CE.",
            rich_help_panel=LOSS,
        ),
    ] = TrainConfig.alpha,
    beta: Annotated[
        float,
        typer.Option(help="JSD mixture weight (--loss jsd), in (0, 1).", rich_help_panel=LOSS),
    ] = TrainConfig.beta,
    loss_chunk: LossChunk = TrainConfig.loss_chunk,
    on_policy_fraction: Annotated[  # named after its options field: --config finds it so
        float,
        typer.Option(
            "--on-policy",
            help="Share of optimizer steps (seeded) whose batch is continuations the student "
            "samples from --prompts, scored by the teacher on the generated tokens only.",
            rich_help_panel=ON_POLICY,
        ),
    ] = OnPolicyOptions.on_policy_fraction,
    prompts: Annotated[
        Path | None,
        typer.Option(
            help='Prompts for sampled steps: a JSONL of {"prompt": ...} or a shard folder '
            "(windows cut at a random point).",
            show_default="--dataset",
            exists=True,
            rich_help_panel=ON_POLICY,
        ),
    ] = None,
    max_new_tokens: Annotated[
        int,
        typer.Option(help="Tokens sampled after each prompt.", rich_help_panel=ON_POLICY),
    ] = OnPolicyOptions.max_new_tokens,
    sample_temperature: Annotated[
        float,
        typer.Option(
            help="Sampling temperature (0 = greedy); the loss keeps --temperature.",
            rich_help_panel=ON_POLICY,
        ),
    ] = OnPolicyOptions.sample_temperature,
    sample_top_p: Annotated[
        float,
        typer.Option(help="Nucleus sampling mass, in (0, 1].", rich_help_panel=ON_POLICY),
    ] = OnPolicyOptions.sample_top_p,
    on_policy_loss: Annotated[
        str,
        typer.Option(
            help=f"Divergence on the student's samples ({', '.join(LOSS_KINDS)}); KD only, "
            "no CE on its own tokens.",
            rich_help_panel=ON_POLICY,
        ),
    ] = OnPolicyOptions.on_policy_loss,
    teacher_samples: Annotated[
        bool,
        flag(
            "--teacher-samples",
            help="Sample the continuations from the teacher instead (sequence-level KD), "
            "with the run's --loss and --alpha.",
            rich_help_panel=ON_POLICY,
        ),
    ] = False,
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
    config: ConfigFile(DistillOptions(), "distill") = None,
    save_every: SaveEvery = DistillOptions.save_every,
    keep_checkpoints: KeepCheckpoints = DistillOptions.keep_checkpoints,
    overwrite: Overwrite = False,
    plan_only: PlanOnly = False,
    json_output: JsonOutput = False,
) -> None:
    """Distill a teacher into a student and leave a run directory with the trained student."""
    if teacher is None and teacher_cache is None:
        teacher = DEFAULT_TEACHER
    options = DistillOptions(
        teacher=teacher,
        teacher_cache=teacher_cache,
        student=student,
        student_init=student_init,
        dataset=dataset,
        shuffle=shuffle,
        device=device,
        dtype=dtype,
        teacher_warmup=teacher_warmup,
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
            temperature=temperature,
            alpha=alpha,
            loss=loss,
            beta=beta,
            seed=seed,
            loss_chunk=loss_chunk,
            compile=compile,
            activation_checkpointing=activation_checkpointing,
            vocab_size=vocab_size,
        ),
        on_policy=OnPolicyOptions(
            on_policy_fraction=on_policy_fraction,
            prompts=prompts,
            max_new_tokens=max_new_tokens,
            sample_temperature=sample_temperature,
            sample_top_p=sample_top_p,
            on_policy_loss=on_policy_loss,
            teacher_samples=teacher_samples,
        ),
    )
    flags = RunFlags(out, resume, overwrite, plan_only, json_output)
    run_training(options, DistillOptions(), flags, "distill")
