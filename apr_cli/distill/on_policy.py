"""On-policy distillation: batches whose continuations the student (or the teacher) samples.

For a seeded fraction of optimizer steps the batch is not read from the corpus: prompts are
drawn, the current student continues them (batched, with the KV cache), and the loss covers only
the generated tokens, which the teacher scores in the same forward as the prompt (GKD, Agarwal
et al. 2024). `teacher_samples` draws the continuation from the teacher instead (sequence-level
KD, Kim & Rush 2016). docs/on-policy.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from apr_cli.distill.losses import IGNORE_INDEX
from apr_cli.distill.options import OnPolicyOptions
from apr_cli.errors import AprError
from apr_cli.model.generate import generate_batch
from apr_cli.model.qwen2 import Qwen2ForCausalLM

STUDENT_SAMPLES, TEACHER_SAMPLES, CORPUS = "on-policy", "teacher-samples", "off-policy"


class PromptSource(Protocol):
    """Where prompts come from; stateful like a BatchSource."""

    def next_prompts(self, count: int, room: int, generator: torch.Generator) -> list[list[int]]:
        """This rank's next `count` prompts, each at most `room` tokens long."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class JsonlPrompts:
    """Prompts from a JSONL file of {"prompt": text}, in file order, cycling; rank-striped.

    A prompt longer than the room left by the continuation keeps its last `room` tokens (the
    text nearest the continuation); the manifest counts how many were cut.
    """

    def __init__(self, path: Path, tokenizer: Any, vocab_size: int, rank: int, world_size: int):
        self.path, self.rank, self.world_size = path, rank, world_size
        self.prompts: list[list[int]] = []
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise AprError(f"--prompts {path}: cannot read ({e})") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise AprError(
                    f'--prompts {path}: line {number} is not a JSON object with a "prompt"'
                ) from None
            if not isinstance(text, str) or not text:
                raise AprError(
                    f"--prompts {path}: line {number}: the prompt is not a non-empty string"
                )
            ids = tokenizer.encode(text)
            if max(ids) >= vocab_size:
                raise AprError(
                    f"--prompts {path}: line {number} has token {max(ids)}, outside the models' "
                    f"shared vocabulary of {vocab_size}"
                )
            self.prompts.append(ids)
        if not self.prompts:
            raise AprError(f"--prompts {path}: no prompts")
        self.consumed = 0  # global prompts handed out, over all ranks

    def next_prompts(self, count: int, room: int, generator: torch.Generator) -> list[list[int]]:
        first = self.consumed + self.rank
        picked = [
            self.prompts[(first + i * self.world_size) % len(self.prompts)][-room:]
            for i in range(count)
        ]
        self.consumed += count * self.world_size
        return picked

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = state["consumed"]

    def describe(self) -> dict[str, Any]:
        return {"kind": "jsonl", "path": str(self.path), "prompts": len(self.prompts)}


class WindowPrompts:
    """Prompts cut from shard windows: each window's first c tokens, c uniform in [1, room].

    The windows come from their own seeded, shuffled pass over the shards, so prompts are not
    the batches the off-policy steps read.
    """

    def __init__(self, source: Any, seq_len: int):
        self.source, self.seq_len = source, seq_len

    def next_prompts(self, count: int, room: int, generator: torch.Generator) -> list[list[int]]:
        windows, _ = self.source.next_batch(count, self.seq_len)  # (count, seq_len)
        cuts = torch.randint(1, room + 1, (count,), generator=generator, device=generator.device)
        return [w[:c].tolist() for w, c in zip(windows, cuts.tolist())]

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        return {**self.source.describe(), "kind": "shard-windows"}


def load_prompts(
    options: OnPolicyOptions,
    dataset: Path | None,
    student_path: str | None,
    vocab_size: int,
    seq_len: int,
    seed: int,
    rank: int,
    world_size: int,
) -> PromptSource:
    """The prompt source `--prompts` names (a .jsonl file or a shard folder; else --dataset).

    A JSONL file is tokenized with the dataset's tokenizer (its meta.json) or the student's
    tokenizer.json.
    """
    from apr_cli.data.shards import ShardBatchSource, read_meta
    from apr_cli.data.tokenizer import load_tokenizer

    path = options.prompts or dataset
    if not path.exists():
        raise AprError(f"--prompts {path}: not found")
    if path.is_dir():
        source = ShardBatchSource(
            path,
            vocab_size=vocab_size,
            rank=rank,
            world_size=world_size,
            shuffle=True,
            seed=seed + 1,  # a different order from the training batches
        )
        source.check_seq_len(seq_len)
        return WindowPrompts(source, seq_len)
    meta = read_meta(dataset) if dataset is not None else None
    if meta is not None and "tokenizer" in meta:
        tokenizer = load_tokenizer(meta["tokenizer"], base=dataset)
    elif student_path is not None and (Path(student_path) / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(Path(student_path))
    else:
        raise AprError(
            f"--prompts {path}: no tokenizer to encode it (give --dataset with a meta.json "
            "naming one, or a student folder holding tokenizer.json)"
        )
    return JsonlPrompts(path, tokenizer, vocab_size, rank, world_size)


def sequences_batch(
    prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) (B, L - 1) for prompt + continuation rows, L the longest row.

    Labels are the next tokens of the continuation only: prompt positions and the right
    padding carry IGNORE_INDEX, so the loss covers exactly the generated tokens.
    """
    rows = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)  # (B, L), padding id 0
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for b, (row, p) in enumerate(zip(rows, prompts)):
        ids[b, : len(row)] = torch.tensor(row)
        labels[b, len(p) : len(row)] = ids[b, len(p) : len(row)]
    return ids[:, :-1], labels[:, 1:]


class SampledBatches:
    """Decides which steps sample, and builds their batches from prompts and a model's samples.

    Which steps sample is a function of (seed, step) alone; the sampling generator is this
    rank's own, seeded by (seed, rank), and its state travels in the checkpoint.
    """

    def __init__(
        self,
        options: OnPolicyOptions,
        prompts: PromptSource,
        seed: int,
        rank: int,
        world_size: int,
        device: torch.device,
    ):
        self.options, self.prompts, self.seed = options, prompts, seed
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))

    @property
    def kind(self) -> str:
        return TEACHER_SAMPLES if self.options.teacher_samples else STUDENT_SAMPLES

    def samples_at(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based) trains on sampled continuations."""
        return bool(
            np.random.default_rng([self.seed, step]).random() < self.options.on_policy_fraction
        )

    def next_batch(
        self, model: Qwen2ForCausalLM, rows: int, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) for `rows` prompts continued by `model`; at most seq_len positions."""
        o = self.options
        room = seq_len + 1 - o.max_new_tokens  # prompt + continuation fill one window at most
        prompts = self.prompts.next_prompts(rows, room, self.generator)
        new = generate_batch(
            model,
            prompts,
            o.max_new_tokens,
            temperature=o.sample_temperature,
            top_p=o.sample_top_p,
            generator=self.generator,
        )
        return sequences_batch(prompts, new)

    def state_dict(self) -> dict[str, Any]:
        """The prompt position and every rank's sampling generator (collective when W > 1)."""
        states = [self.generator.get_state()]
        if self.world_size > 1:
            states = [None] * self.world_size
            dist.all_gather_object(states, self.generator.get_state())
        return {"prompts": self.prompts.state_dict(), "generators": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        generators = state["generators"]
        if len(generators) != self.world_size:
            raise AprError(
                f"--resume: the run sampled on {len(generators)} ranks, not {self.world_size}"
            )
        self.prompts.load_state_dict(state["prompts"])
        self.generator.set_state(generators[self.rank])


def kv_cache_bytes(model: Qwen2ForCausalLM, rows: int, seq_len: int) -> int:
    """The sampling KV cache for `rows` rows of up to seq_len + 1 positions."""
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim
    return per_token * rows * (seq_len + 1) * model.output_weight.element_size()
