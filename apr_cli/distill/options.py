"""A run's options as one typed object: defaults, validation, and what a resume may change."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from apr_cli.distill.on_policy import OnPolicyOptions
from apr_cli.distill.pipeline import TrainConfig
from apr_cli.errors import AprError

DEFAULT_TEACHER = "tiny-teacher"
DEFAULT_STUDENT = "tiny-student"


@dataclass
class DistillOptions:
    """Everything `apr distill` was asked for, before anything is loaded."""

    teacher: str | None = DEFAULT_TEACHER  # None trains the student on the labels alone
    student: str = DEFAULT_STUDENT
    student_init: str | None = None  # teacher-layers:0,2,... builds the student from the teacher
    dataset: Path | None = None
    shuffle: bool = False  # read --dataset windows in a seeded random order per epoch
    device: str = "auto"
    teacher_warmup: int | None = None  # None: PRESET_TEACHER_WARMUP for a preset teacher, else 0
    save_every: int = 1000  # steps between checkpoints (one is always written at the end)
    fsdp: bool = False  # under torchrun: shard student and teacher (FSDP2) instead of DDP
    keep_checkpoints: int = 2
    train: TrainConfig = field(default_factory=TrainConfig)
    on_policy: OnPolicyOptions = field(default_factory=OnPolicyOptions)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dataset"] = None if self.dataset is None else str(self.dataset)
        d["on_policy"] = self.on_policy.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillOptions:
        fields = {**d, "train": TrainConfig(**d["train"])}
        # Runs from before on-policy sampling have no on_policy options: they never sampled.
        if "on_policy" in d:
            fields["on_policy"] = OnPolicyOptions.from_dict(d["on_policy"])
        fields["dataset"] = None if d["dataset"] is None else Path(d["dataset"])
        return cls(**fields)

    def validate(self) -> None:
        self.train.validate()
        self.on_policy.validate(
            self.train.seq_len, self.teacher is not None, self.dataset is not None
        )
        if self.teacher_warmup is not None and self.teacher_warmup < 0:
            raise AprError(f"--teacher-warmup must be >= 0, got {self.teacher_warmup}")
        if self.save_every < 0:
            raise AprError(f"--save-every must be >= 0, got {self.save_every}")
        if self.keep_checkpoints < 1:
            raise AprError(f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")


# Fields a resumed run may change: they do not change what the student learns. A test checks
# each names a field of DistillOptions or TrainConfig.
RESUMABLE_CHANGES = frozenset(
    {"steps", "device", "save_every", "keep_checkpoints", "loss_chunk", "compile", "fsdp"}
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
    return "--on-policy" if name == "fraction" else f"--{name.replace('_', '-')}"


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
