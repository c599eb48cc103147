"""HumanEval: problems, stop texts, pass@k, and `apr humaneval` end to end."""

from __future__ import annotations

import gzip
import json
from math import comb
from pathlib import Path

import pytest
from typer.testing import CliRunner

from apr_cli.cli import app
from apr_cli.data.tokenizer import ByteTokenizer
from apr_cli.errors import AprError
from apr_cli.evals.humaneval import (
    GenerationSettings,
    bundled_problems_path,
    generate_completions,
    load_completions,
    load_problems,
    pass_at_k,
    truncate,
)
from apr_cli.model.checkpoint import save_model
from apr_cli.model.config import ModelConfig
from apr_cli.model.generate import generate_batch
from apr_cli.model.qwen2 import build_model


@pytest.mark.parametrize(
    "n, c, k",
    [(1, 0, 1), (1, 1, 1), (5, 0, 1), (5, 2, 1), (10, 3, 5), (10, 0, 10), (20, 1, 10),
     (20, 15, 10), (200, 7, 100), (200, 0, 100), (100, 100, 100), (3, 2, 2), (7, 7, 1)],
)  # fmt: skip
def test_pass_at_k_equals_the_closed_form(n, c, k):
    expected = 1.0 if n - c < k else 1 - comb(n - c, k) / comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert c > 0 or pass_at_k(n, c, k) == 0.0


def test_truncate_cuts_at_the_first_stop_text():
    assert truncate("    return 1\n\ndef g():\n    pass") == "    return 1\n"
    assert truncate("    x = 1\n# done\nif x:") == "    x = 1"
    assert truncate("    return 1\n") == "    return 1\n"
    assert truncate("    print(1)\nprint(2)") == "    print(1)"


def test_the_installed_problems_are_humaneval():
    problems = load_problems()
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    assert problems[163].entry_point and "def check" in problems[163].test


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ADD = {
    "task_id": "T/0",
    "prompt": "def add(a, b):\n",
    "test": "def check(f):\n    assert f(2, 3) == 5\n",
    "entry_point": "add",
}
NEG = {
    "task_id": "T/1",
    "prompt": "def neg(a):\n",
    "test": "def check(f):\n    assert f(2) == -2\n",
    "entry_point": "neg",
}


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"task_id": "T/0", "prompt": "p"}], "lacks string field(s) test, entry_point"),
        ([ADD, ADD], "a task_id appears twice"),
        ([], "no problems"),
    ],
)
def test_bad_problem_files(tmp_path, rows, message):
    with pytest.raises(AprError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_problems(write_jsonl(tmp_path / "p.jsonl", rows))


def test_problem_file_that_is_not_json(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps(ADD) + "\n{oops\n")
    with pytest.raises(AprError, match=r"p.jsonl:2: not JSON"):
        load_problems(tmp_path / "p.jsonl")


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"task_id": "T/9", "completion": "x"}], "'T/9' is not one of the problems"),
        ([{"task_id": "T/0"}], "line 1 needs string fields"),
        ([{"task_id": "T/0", "completion": "a"}], "between 0 and 1"),
    ],
)
def test_bad_completion_files(tmp_path, rows, message):
    problems = load_problems(write_jsonl(tmp_path / "p.jsonl", [ADD, NEG]))
    with pytest.raises(AprError, match=message):
        load_completions(write_jsonl(tmp_path / "c.jsonl", rows), problems)


def run_cli(*args: str):
    return CliRunner().invoke(app, ["humaneval", *args, "--timeout", "5"])


def test_cli_scores_completions(tmp_path):
    problems = write_jsonl(tmp_path / "p.jsonl", [ADD, NEG])
    answers = ["    return a + b\n", "    return a - b\n", "    return -a\n", "    return a\n"]
    tasks = ["T/0", "T/0", "T/1", "T/1"]
    completions = write_jsonl(
        tmp_path / "c.jsonl", [{"task_id": t, "completion": a} for t, a in zip(tasks, answers)]
    )
    out = tmp_path / "report"
    args = ["--problems", str(problems), "--completions", str(completions), "--out", str(out)]
    result = run_cli(*args, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["pass_at_k"] == {"pass@1": 0.5}
    assert summary["outcomes"] == {"passed": 2, "failed": 2, "timeout": 0, "error": 0}
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["sample"], r["passed"]) for r in results] == [
        ("T/0", 0, True),
        ("T/0", 1, False),
        ("T/1", 0, True),
        ("T/1", 1, False),
    ]
    assert {"namespaces", "dedicated_uid", "limits", "python"} <= set(summary["sandbox"])
    # The gate: below it, exit 1 after the report; and a second run may not overwrite it.
    again = run_cli(*args[:4], "--out", str(tmp_path / "gated"), "--min-pass-at-1", "0.6")
    assert again.exit_code == 1 and "below --min-pass-at-1" in again.stderr
    assert "pass@1" in again.stdout and (tmp_path / "gated" / "summary.json").exists()
    refused = run_cli(*args)
    assert refused.exit_code == 2 and "already holds a report" in refused.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "exactly one of MODEL and --completions"),
        (["tiny-student", "--completions", "{c}"], "exactly one of MODEL and --completions"),
        (["tiny-student", "--problems", "{p}"], "MODEL needs --tokenizer"),
        (["--completions", "{p}", "--problems", "{p}"], "needs string fields task_id"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, message):
    p = write_jsonl(tmp_path / "p.jsonl", [ADD])
    c = write_jsonl(tmp_path / "c.jsonl", [{"task_id": "T/0", "completion": ""}])
    args = [a.format(p=p, c=c) for a in args]
    result = run_cli(*args, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1


CFG = ModelConfig(
    vocab_size=260,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    torch_dtype="float32",
)


def test_completions_are_the_batched_generation_cut_at_stop_texts():
    model = build_model(CFG, seed=1)
    tok = ByteTokenizer()
    problems = load_problems(bundled_problems_path())[:3]
    settings = GenerationSettings(samples=2, max_new_tokens=12, batch_size=4)
    completions = generate_completions(model, tok, problems, settings)
    assert list(completions) == [p.task_id for p in problems]
    for p in problems:
        alone = generate_batch(model, [tok.encode(p.prompt)], 12)[0]
        expected = truncate(tok.decode(alone[: alone.index(256)] if 256 in alone else alone))
        assert completions[p.task_id] == [expected, expected]  # greedy: samples agree


def test_cli_with_a_model(tmp_path):
    model_dir = save_model(build_model(CFG, seed=1), tmp_path / "model")
    problems = write_jsonl(tmp_path / "p.jsonl", [ADD, NEG])
    out = tmp_path / "report"
    args = [str(model_dir), "--tokenizer", "bytes", "--problems", str(problems)]
    args += ["--max-new-tokens", "8", "--samples", "3", "--temperature", "1.0"]
    result = run_cli(*args, "--out", str(out), "--json", "--workers", "2")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["samples_per_problem"] == 3 and summary["problems"] == 2
    assert summary["generation"]["temperature"] == 1.0 and summary["generation"]["seconds"] >= 0
    assert sum(summary["outcomes"].values()) == 6
    assert len((out / "results.jsonl").read_text().splitlines()) == 6


def canonical(tmp_path: Path, empty: bool) -> Path:
    with gzip.open(bundled_problems_path(), "rt") as f:
        rows = [json.loads(line) for line in f]
    key = "canonical_solution"
    rows = [{"task_id": r["task_id"], "completion": "" if empty else r[key]} for r in rows]
    return write_jsonl(tmp_path / "c.jsonl", rows)


@pytest.mark.slow
@pytest.mark.parametrize("empty, passed", [(False, 164), (True, 0)])
def test_canonical_solutions_all_pass_and_empty_ones_all_fail(tmp_path, empty, passed):
    completions = canonical(tmp_path, empty)
    result = run_cli("--completions", str(completions), "--out", str(tmp_path / "r"), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["outcomes"]["passed"] == passed and summary["problems"] == 164
    assert summary["pass_at_k"]["pass@1"] == passed / 164
