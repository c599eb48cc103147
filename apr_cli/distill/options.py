"""A run's options as typed objects: defaults, validation, and what a resume may change.

Free of torch, so the command line shows its defaults without importing it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from apr_cli.distill.sinks import JSONL, parse_report_to
from apr_cli.errors import AprError

DEFAULT_TEACHER = "tiny-teacher"
DEFAULT_STUDENT = "tiny-student"
DEFAULT_WINDOWS = 512  # windows `apr eval` scores
LOSS_KINDS = ("forward-kl", "reverse-kl", "jsd")


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps, exactly
    batch_size: int = 16  # rows per optimizer step, split over grad_accum micro-batches
    seq_len: int = 64
    grad_accum: int = 1
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup: int = 10  # linear warm-up steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max global gradient norm
    temperature: float = 3.0
    alpha: float = 0.7  # weight of the KD term; 1 - alpha weighs CE on the labels
    loss: str = "forward-kl"
    beta: float = 0.5  # jsd mixture weight
    seed: int = 0
    loss_chunk: int = 0  # tokens per loss block; 0 picks a size that bounds logits memory
    compile: bool | None = None  # torch.compile models (and GPU loss blocks); None: auto
    activation_checkpointing: bool = False  # recompute student block activations in backward
    vocab_size: int = 0  # rows the loss covers (the real vocabulary); 0: every shared row

    def validate(self, max_seq_len: int | None = None) -> None:
        """Refuse settings that cannot train, naming the flag."""
        checks = [
            (self.steps > 0, f"--steps must be > 0, got {self.steps}"),
            (self.batch_size > 0, f"--batch-size must be > 0, got {self.batch_size}"),
            (self.seq_len > 0, f"--seq-len must be > 0, got {self.seq_len}"),
            (self.grad_accum > 0, f"--grad-accum must be > 0, got {self.grad_accum}"),
            (
                self.batch_size % self.grad_accum == 0,
                f"--batch-size {self.batch_size} is not a multiple of "
                f"--grad-accum {self.grad_accum}",
            ),
            (0 < self.lr < math.inf, f"--lr must be > 0 and finite, got {self.lr}"),
            (
                0.0 <= self.min_lr_ratio <= 1.0,
                f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}",
            ),
            (self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}"),
            (
                0 <= self.weight_decay < math.inf,
                f"--weight-decay must be >= 0 and finite, got {self.weight_decay}",
            ),
            (
                0 < self.temperature < math.inf,
                f"--temperature must be > 0 and finite, got {self.temperature}",
            ),
            (0.0 <= self.alpha <= 1.0, f"--alpha must be in [0, 1], got {self.alpha}"),
            (self.loss in LOSS_KINDS, f"--loss must be one of {', '.join(LOSS_KINDS)}"),
            (0.0 < self.beta < 1.0, f"--beta must be in (0, 1), got {self.beta}"),
            (
                0 < self.grad_clip < math.inf,
                f"--grad-clip must be > 0 and finite, got {self.grad_clip}",
            ),
            (self.loss_chunk >= 0, f"--loss-chunk must be >= 0, got {self.loss_chunk}"),
            (self.vocab_size >= 0, f"--vocab-size must be >= 0, got {self.vocab_size}"),
        ]
        if max_seq_len is not None:
            checks.append(
                (
                    self.seq_len <= max_seq_len,
                    f"--seq-len {self.seq_len} exceeds the models' context of {max_seq_len}",
                )
            )
        for ok, message in checks:
            if not ok:
                raise AprError(message)

    def lr_at(self, step: int) -> float:
        """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.steps - self.warmup - 1)
        progress = min(1.0, (step - self.warmup) / span)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OnPolicyOptions:
    """What `--on-policy` and its sampling flags asked for."""

    on_policy_fraction: float = 0.0  # share of steps whose batch is sampled (0: corpus only)
    prompts: Path | None = None  # JSONL of {"prompt": ...} or a shard folder; None: --dataset
    max_new_tokens: int = 32  # every continuation has this many tokens (no early stop)
    sample_temperature: float = 1.0  # the loss keeps --temperature
    sample_top_p: float = 1.0
    # Reverse KL on the student's own samples: it is the per-token objective whose gradient
    # pushes down exactly the tokens the student writes and the teacher would not (mode
    # seeking), what GKD and Thinking Machines' on-policy distillation use.
    on_policy_loss: str = "reverse-kl"
    teacher_samples: bool = False  # sample continuations from the teacher (sequence-level KD)

    @property
    def enabled(self) -> bool:
        return self.on_policy_fraction > 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prompts": None if self.prompts is None else str(self.prompts)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OnPolicyOptions:
        return cls(**{**d, "prompts": None if d["prompts"] is None else Path(d["prompts"])})

    def validate(self, seq_len: int, has_teacher: bool, has_dataset: bool) -> None:
        """Refuse settings that cannot sample, naming the flag."""
        checks = [
            (
                0.0 <= self.on_policy_fraction <= 1.0,
                f"--on-policy must be in [0, 1], got {self.on_policy_fraction}",
            ),
            (
                # Only a sampling run is held to its --seq-len (the default may exceed a short one).
                1 <= self.max_new_tokens <= seq_len or not self.enabled,
                f"--max-new-tokens must be in [1, --seq-len {seq_len}], got {self.max_new_tokens}",
            ),
            (
                self.sample_temperature >= 0,
                f"--sample-temperature must be >= 0, got {self.sample_temperature}",
            ),
            (
                0.0 < self.sample_top_p <= 1.0,
                f"--sample-top-p must be in (0, 1], got {self.sample_top_p}",
            ),
            (
                self.on_policy_loss in LOSS_KINDS,
                f"--on-policy-loss must be one of {', '.join(LOSS_KINDS)}",
            ),
            (
                self.enabled or not self.teacher_samples,
                "--teacher-samples needs --on-policy > 0 (the share of steps to sample)",
            ),
            (not self.enabled or has_teacher, "--on-policy needs a teacher to score the samples"),
            (
                not self.enabled or self.prompts is not None or has_dataset,
                "--on-policy needs --prompts (a JSONL file or a shard folder) or --dataset",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise AprError(message)


@dataclass
class DistillOptions:
    """Everything `apr distill` was asked for, before anything is loaded."""

    teacher: str | None = DEFAULT_TEACHER  # None trains the student on the labels alone
    teacher_cache: Path | None = None  # a teacher cache instead of a teacher model
    student: str = DEFAULT_STUDENT
    student_init: str | None = None  # teacher-layers:0,2,... builds the student from the teacher
    dataset: Path | None = None
    shuffle: bool = False  # read --dataset windows in a seeded random order per epoch
    device: str = "auto"
    dtype: str = "auto"  # matmul dtype: auto (bf16 on CUDA, fp32 on the CPU), bf16, fp32
    teacher_warmup: int | None = None  # None: PRESET_TEACHER_WARMUP for a preset teacher, else 0
    save_every: int = 1000  # steps between checkpoints (one is always written at the end)
    fsdp: bool = False  # under torchrun: shard student and teacher (FSDP2) instead of DDP
    keep_checkpoints: int = 2
    val_dataset: Path | None = None  # held-out shards scored during training
    eval_every: int = 0  # steps between evals; 0: after the last step only
    eval_windows: int = DEFAULT_WINDOWS  # val windows scored, the same each time; 0: all
    keep_best: bool = False  # keep the student with the lowest val loss
    report_to: str = JSONL  # comma-separated sinks; metrics.jsonl is always written
    threads: int = 0  # CPU threads for torch; 0: the cores this process may use, split over ranks
    train: TrainConfig = field(default_factory=TrainConfig)
    on_policy: OnPolicyOptions = field(default_factory=OnPolicyOptions)

    @property
    def distills(self) -> bool:
        """A teacher scores the student: a teacher model or a teacher cache standing in for it."""
        return self.teacher is not None or self.teacher_cache is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("dataset", "val_dataset", "teacher_cache"):
            d[name] = None if d[name] is None else str(d[name])
        d["on_policy"] = self.on_policy.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "options") -> DistillOptions:
        """Options as `to_dict` wrote them; unknown or missing fields are refused by name."""
        try:
            fields = {**d, "train": TrainConfig(**d["train"])}
            # Runs from before on-policy sampling have no on_policy options: they never sampled.
            if "on_policy" in d:
                fields["on_policy"] = OnPolicyOptions.from_dict(d["on_policy"])
            for name in ("dataset", "val_dataset", "teacher_cache"):  # absent from older runs
                fields[name] = None if d.get(name) is None else Path(d[name])
            return cls(**fields)
        except (KeyError, TypeError) as e:  # written by another version of apr, or edited
            raise AprError(f"{source}: options this apr cannot use ({e})") from None

    def absolute(self) -> DistillOptions:
        """Local paths made absolute, so a resume from another directory finds the same files.

        A teacher or student that names an existing folder or file is one (load_model looks
        there first); presets and hub ids stay as given.
        """

        def local(spec: str | None) -> str | None:
            exists = spec is not None and Path(spec).expanduser().exists()
            return str(Path(spec).expanduser().resolve()) if exists else spec

        def path(p: Path | None) -> Path | None:
            return None if p is None else p.expanduser().resolve()

        return replace(
            self,
            teacher=local(self.teacher),
            student=local(self.student),
            dataset=path(self.dataset),
            val_dataset=path(self.val_dataset),
            teacher_cache=path(self.teacher_cache),
        )

    def validate(self) -> None:
        self.train.validate()
        self.on_policy.validate(
            self.train.seq_len, self.teacher is not None, self.dataset is not None
        )
        if self.teacher_warmup is not None and self.teacher_warmup < 0:
            raise AprError(f"--teacher-warmup must be >= 0, got {self.teacher_warmup}")
        if self.save_every < 0:
            raise AprError(f"--save-every must be >= 0, got {self.save_every}")
        if self.threads < 0:
            raise AprError(f"--threads must be >= 0, got {self.threads}")
        if self.keep_checkpoints < 1:
            raise AprError(f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.teacher_cache is not None:
            if self.teacher is not None:
                raise AprError("--teacher and --teacher-cache: pass one of them, not both")
            if self.dataset is None:
                raise AprError("--teacher-cache needs the --dataset it was built from")
            if self.on_policy.enabled:  # sampled tokens were never cached: a teacher must score
                raise AprError("--on-policy needs a teacher model, not --teacher-cache")
            if self.teacher_warmup or self.student_init is not None:
                flag = "--student-init" if self.student_init else "--teacher-warmup"
                raise AprError(f"{flag} needs a teacher model, not --teacher-cache")
        if self.eval_every < 0:
            raise AprError(f"--eval-every must be >= 0, got {self.eval_every}")
        if self.eval_windows < 0:
            raise AprError(f"--eval-windows must be >= 0, got {self.eval_windows}")
        if self.val_dataset is None and (self.eval_every or self.keep_best):
            flag = "--eval-every" if self.eval_every else "--keep-best"
            raise AprError(f"{flag} needs --val-dataset")
        parse_report_to(self.report_to)


# Fields a resumed run may change: they do not change what the student learns. A test checks
# each names a field of DistillOptions or TrainConfig.
RESUMABLE_CHANGES = frozenset(
    {
        "steps",
        "device",
        "save_every",
        "keep_checkpoints",
        "loss_chunk",
        "compile",
        "fsdp",
        "report_to",
        "threads",
        "activation_checkpointing",
    }
)


def resumed_options(
    saved: DistillOptions, requested: DistillOptions, defaults: DistillOptions, run_dir: Path
) -> DistillOptions:
    """`saved` with the settings `requested` asked for (those not left at `defaults`) applied.

    Refuses a change to a setting outside RESUMABLE_CHANGES, naming its flag.
    """
    train = replace(saved.train, **asked(requested.train, defaults.train))
    on_policy = replace(saved.on_policy, **asked(requested.on_policy, defaults.on_policy))
    options = replace(saved, train=train, on_policy=on_policy, **asked(requested, defaults))
    changed = [
        f"{flag(name)} {shown(new)!r} (the run used {shown(old)!r})"
        for name, old, new in differences(saved, options)
        + differences(saved.train, train)
        + differences(saved.on_policy, on_policy)
        if name not in RESUMABLE_CHANGES
    ]
    if changed:
        raise AprError(
            f"--resume {run_dir}: {'; '.join(changed)} would change the result; "
            "start a new run instead"
        )
    return options


def flag(name: str) -> str:
    """The command-line flag of an options field."""
    return "--on-policy" if name == "on_policy_fraction" else f"--{name.replace('_', '-')}"


def asked(requested: Any, defaults: Any) -> dict[str, Any]:
    """The fields of dataclass `requested` not left at `defaults` (nested dataclasses aside)."""
    return {name: new for name, _, new in differences(defaults, requested)}


def differences(a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    """(field, a's value, b's value) for each plain field two same-type dataclasses differ in."""
    return [
        (f.name, getattr(a, f.name), getattr(b, f.name))
        for f in fields(a)
        if not is_dataclass(getattr(a, f.name)) and getattr(a, f.name) != getattr(b, f.name)
    ]


def shown(value: Any) -> Any:
    """A value as the manifest records it (paths as strings)."""
    return str(value) if isinstance(value, Path) else value
