"""Metric sinks: TensorBoard event files and W&B offline runs read back with their own readers."""

import json
import struct
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from apr_cli.distill.pipeline import StepMetrics
from apr_cli.distill.sinks import (
    TENSORBOARD_DIR,
    TensorBoardSink,
    WandbSink,
    check_installed,
    parse_report_to,
    train_scalars,
    val_scalars,
)
from apr_cli.errors import AprError


def step_metrics(step: int) -> StepMetrics:
    return StepMetrics(step, 8, 1.0 / step, 0.5 / step, 0.25 / step, 1e-3, 2.0, 100.0, 0.1)


def tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under RUN/tensorboard, as TensorBoard itself loads them."""
    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(run_dir) -> list:
    """The records of every W&B offline run under RUN/wandb, parsed with W&B's protobufs.

    A .wandb file is a LevelDB-style log: a 7-byte file header, then 32 KiB blocks of chunks,
    each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            pending += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
    return records


def test_train_and_val_names():
    assert list(train_scalars(step_metrics(2))) == [
        "train/loss",
        "train/kd",
        "train/ce",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
    ]
    row = {"step": 5, "kind": "eval", "val_loss": 2.0, "kl_to_teacher": 0.3, "top1_agreement": 0.9}
    assert val_scalars(row) == {
        "val/loss": 2.0,
        "val/kl_to_teacher": 0.3,
        "val/top1_agreement": 0.9,
    }
    assert val_scalars({"step": 5, "kind": "eval", "val_loss": 2.0}) == {"val/loss": 2.0}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("jsonl", ()),
        ("tensorboard,wandb", ("tensorboard", "wandb")),
        (" wandb , jsonl,wandb", ("wandb",)),
        ("", ()),
    ],
)
def test_report_to_parses(value, expected):
    assert parse_report_to(value) == expected


def test_report_to_refuses_an_unknown_sink():
    with pytest.raises(AprError, match=r"--report-to: unknown sink 'mlflow'"):
        parse_report_to("tensorboard,mlflow")


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_package_names_its_extra(monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # what `import name` sees when it is absent
    with pytest.raises(AprError, match=rf"pip install 'apr-cli\[{name}\]'"):
        check_installed((name,))


def test_tensorboard_resume_purges_the_steps_it_redoes(tmp_path):
    first = TensorBoardSink(tmp_path, resumed_at=None)
    for step in range(1, 7):  # killed after step 6; the checkpoint is at step 4
        first.log(step, {"train/loss": 100.0 + step})
    first.log(4, {"val/loss": 7.0})
    first.close()
    second = TensorBoardSink(tmp_path, resumed_at=4)
    for step in range(5, 9):
        second.log(step, {"train/loss": float(step)})
    second.log(8, {"val/loss": 6.0})
    second.close()
    scalars = tensorboard_scalars(tmp_path)
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 9))
    assert [v for _, v in scalars["train/loss"]] == [101.0, 102.0, 103.0, 104.0, 5, 6, 7, 8]
    assert scalars["val/loss"] == [(4, 7.0), (8, 6.0)]


@pytest.mark.slow
def test_wandb_offline_records_config_and_scalars(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = WandbSink(tmp_path, {"steps": 8, "lr": 0.003}, run_id="apr-test-1")
    for step in (1, 2):
        sink.log(step, train_scalars(step_metrics(step)))
    sink.log(2, {"val/loss": 3.5})
    sink.close()
    records = wandb_records(tmp_path)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs[0].run_id == "apr-test-1"
    config = {i.key: json.loads(i.value_json) for i in runs[0].config.update}
    assert config["steps"] == 8 and config["lr"] == 0.003
    history = [
        {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert [h["_step"] for h in history] == [1, 2]
    assert history[0]["train/loss"] == 1.0 and history[1]["val/loss"] == 3.5


@pytest.mark.slow
def test_a_wandb_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "no-such-mode")  # W&B refuses its own settings
    with pytest.raises(AprError, match=r"^--report-to wandb: .*WANDB_MODE=offline") as caught:
        WandbSink(tmp_path, {}, run_id="apr-test-2")
    assert "\n" not in str(caught.value)
