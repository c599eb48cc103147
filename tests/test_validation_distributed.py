"""Evals under torchrun on CPU (gloo, 2 processes): DDP and FSDP2 score what one process scores."""

import json

import numpy as np
import pytest

from apr_cli.data.shards import write_shard
from tests.test_distributed import ARGS, run
from tests.test_validation_run import weights

# fp32 whatever the CPU: bf16 matmuls (auto on CPUs with AMX) differ between layouts.
EVALS = ["--eval-every", "4", "--eval-windows", "6", "--keep-best", "--dtype", "fp32"]


def eval_rows(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "eval"]


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    write_shard(root / "a.bin", np.random.default_rng(2).integers(0, 512, 500))
    return root


@pytest.fixture(scope="module")
def single(tmp_path_factory, val):
    out = tmp_path_factory.mktemp("single") / "run"
    proc = run(1, *ARGS, "--val-dataset", val, *EVALS, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_ranks_score_what_one_rank_scores(tmp_path, val, single, parallel):
    out = tmp_path / "run"
    proc = run(2, *ARGS, *parallel, "--val-dataset", val, *EVALS, "--out", out)
    assert proc.returncode == 0, proc.stderr
    got, want = eval_rows(out), eval_rows(single)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [4, 8]  # once each: rank 0
    for a, b in zip(got, want):
        for key in ("val_loss", "kl_to_teacher", "top1_agreement"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert sum(line.startswith("eval ") for line in proc.stdout.splitlines()) == 2
    best, reference = weights(out, "student-best.apr"), weights(single, "student-best.apr")
    assert best.keys() == reference.keys()
    for name in best:
        np.testing.assert_allclose(best[name], reference[name], rtol=1e-4, atol=1e-4)
