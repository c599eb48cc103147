"""Options that several commands share, as `Annotated` types: one definition, one help text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

MODELS, DATA, TRAINING, LOSS, RUN, OUTPUT = "Models", "Data", "Training", "Loss", "Run", "Output"
WATCH = "Watching"
ON_POLICY = "On-policy"
RUNTIME = "Runtime"
DEVICE_HELP = "auto (CUDA when available, else CPU), cuda or cpu."


def flag(name: str, **kwargs: Any) -> Any:
    """A value-less option: `name` alone (no --no-name), shown without a type in --help."""
    return typer.Option(name, metavar="", **kwargs)


Dataset = Annotated[
    Path | None,
    typer.Option(
        help="Directory of token shards (*.bin); without it, synthetic batches.",
        exists=True,
        file_okay=False,
        dir_okay=True,
        rich_help_panel=DATA,
    ),
]
Shuffle = Annotated[
    bool,
    flag(
        "--shuffle",
        help="Read the dataset's windows in a random order (seeded by --seed, new each epoch).",
        rich_help_panel=DATA,
    ),
]
SeqLen = Annotated[int, typer.Option(help="Tokens per row.", rich_help_panel=DATA)]
BatchSize = Annotated[
    int,
    typer.Option(
        help="Rows per optimizer step (split over --grad-accum micro-batches).",
        rich_help_panel=DATA,
    ),
]
Steps = Annotated[int, typer.Option(help="Optimizer steps, exactly.", rich_help_panel=TRAINING)]
Lr = Annotated[float, typer.Option(help="Peak learning rate (AdamW).", rich_help_panel=TRAINING)]
Warmup = Annotated[
    int,
    typer.Option(
        help="Linear warm-up steps before cosine decay to lr/10.", rich_help_panel=TRAINING
    ),
]
GradAccum = Annotated[
    int,
    typer.Option(
        help="Micro-batches per optimizer step (gradient accumulation).",
        rich_help_panel=TRAINING,
    ),
]
GradClip = Annotated[
    float, typer.Option(help="Max global gradient norm.", rich_help_panel=TRAINING)
]
WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay.", rich_help_panel=TRAINING)]
Seed = Annotated[
    int, typer.Option(help="Seed for init, data order and sampling.", rich_help_panel=TRAINING)
]
Device = Annotated[str, typer.Option(help=DEVICE_HELP, rich_help_panel=TRAINING)]
Dtype = Annotated[
    str,
    typer.Option(
        help="Matmul precision: auto (bf16 on CUDA, fp32 on the CPU), bf16 or fp32. "
        "The loss, master weights and optimizer state stay fp32.",
        rich_help_panel=TRAINING,
    ),
]
Threads = Annotated[
    int,
    typer.Option(
        help="CPU threads for torch; 0: one per core this process may use (split over torchrun "
        "ranks). Idle threads sleep unless OMP_WAIT_POLICY says otherwise.",
        rich_help_panel=TRAINING,
    ),
]
LossChunk = Annotated[
    int,
    typer.Option(
        help="Tokens per loss block (bounds logits memory); 0 chooses automatically.",
        rich_help_panel=LOSS,
    ),
]
Compile = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile",
        metavar="",
        help="torch.compile the models' forward passes, and on a GPU the loss blocks. "
        "Default: on for GPU runs of 500+ steps, off on the CPU (where it measured no faster).",
        rich_help_panel=TRAINING,
        show_default=False,
    ),
]
VocabSize = Annotated[
    int,
    typer.Option(
        help="Rows of the vocabulary the loss covers (the tokenizer's real size); rows past it "
        "are padding, left out of both softmaxes. 0: the dataset's meta.json or a model "
        "folder's tokenizer.json when present, else every row both models share.",
        rich_help_panel=TRAINING,
    ),
]
ActivationCheckpointing = Annotated[
    bool,
    flag(
        "--activation-checkpointing",
        help="Recompute each student block's activations in backward instead of keeping them: "
        "less memory for a student that does not fit, about a third more compute.",
        rich_help_panel=TRAINING,
    ),
]
Fsdp = Annotated[
    bool,
    flag(
        "--fsdp",
        help="Under torchrun, shard student and teacher with FSDP2 instead of replicating (DDP).",
        rich_help_panel=TRAINING,
    ),
]
Out = Annotated[
    Path | None,
    typer.Option(
        help="Run directory.",
        show_default="runs/COMMAND-YYYYMMDD-HHMMSS in UTC, then -2, -3... if taken",
        file_okay=False,
        rich_help_panel=RUN,
    ),
]
Resume = Annotated[
    Path | None,
    typer.Option(
        help="Continue the run in this directory from its newest checkpoint; only --steps "
        "(and device or checkpoint settings) may change.",
        exists=True,
        file_okay=False,
        rich_help_panel=RUN,
    ),
]
SaveEvery = Annotated[
    int, typer.Option(help="Steps between checkpoints (0: only at the end).", rich_help_panel=RUN)
]
KeepCheckpoints = Annotated[
    int, typer.Option(help="Checkpoints kept (the newest).", rich_help_panel=RUN)
]
Overwrite = Annotated[
    bool, flag("--overwrite", help="Replace a finished run already in --out.", rich_help_panel=RUN)
]
PlanOnly = Annotated[
    bool,
    flag(
        "--plan",
        help="Print the resolved plan (models, sizes, memory, data) and exit.",
        rich_help_panel=RUN,
    ),
]
JsonOutput = Annotated[
    bool,
    flag(
        "--json",
        help="Print the final summary (or plan) as JSON on stdout; step lines go to stderr.",
        rich_help_panel=RUN,
    ),
]
ValDataset = Annotated[
    Path | None,
    typer.Option(
        help="Held-out shards (*.bin) scored during training: val loss, and with a teacher the "
        "KL to it and top-1 agreement.",
        exists=True,
        file_okay=False,
        rich_help_panel=WATCH,
    ),
]
EvalEvery = Annotated[
    int,
    typer.Option(
        help="Steps between evals on --val-dataset (0: after the last step only).",
        rich_help_panel=WATCH,
    ),
]
EvalWindows = Annotated[
    int,
    typer.Option(
        help="Val windows scored at each eval, the same ones every time (0: all).",
        rich_help_panel=WATCH,
    ),
]
KeepBest = Annotated[
    bool,
    flag(
        "--keep-best",
        help="Keep the student with the lowest val loss as RUN/student-best.apr.",
        rich_help_panel=WATCH,
    ),
]
ReportTo = Annotated[
    str,
    typer.Option(
        help="Where metrics go besides metrics.jsonl: tensorboard, wandb (comma-separated).",
        rich_help_panel=WATCH,
    ),
]
