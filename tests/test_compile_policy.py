"""What a run compiles: the auto rule, the flags, the manifest, and the compiled loss blocks."""

import json

import pytest
import torch
from test_chunked_loss import assert_same, both, inputs
from test_pipeline import models

from apr_cli.cli import main
from apr_cli.distill import pipeline
from apr_cli.distill.compile_policy import AUTO_MIN_STEPS, CompileChoice, choose_compile
from apr_cli.distill.pipeline import Pipeline, TrainConfig

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)  # a device object needs no GPU


def test_auto_compiles_long_gpu_runs_only():
    assert choose_compile(None, GPU, AUTO_MIN_STEPS).loss_blocks
    assert choose_compile(None, GPU, AUTO_MIN_STEPS).models
    assert not choose_compile(None, GPU, AUTO_MIN_STEPS - 1).any
    assert not choose_compile(None, CPU, 10**6).any  # measured no faster on the CPU


def test_the_flags_override_auto():
    assert not choose_compile(False, GPU, 10**6).any
    on_gpu, on_cpu = choose_compile(True, GPU, 1), choose_compile(True, CPU, 1)
    assert on_gpu.models and on_gpu.loss_blocks
    # On the CPU the compiled loss block measured slower than the eager one: models only.
    assert on_cpu.models and not on_cpu.loss_blocks


@pytest.mark.parametrize(
    "flags,expected",
    [
        ([], {"models": False, "loss_blocks": False, "reason": "auto: off on the CPU"}),
        (["--no-compile"], {"models": False, "loss_blocks": False, "reason": "--no-compile"}),
        (["--compile"], {"models": True, "loss_blocks": False}),
    ],
)
def test_the_plan_says_what_is_compiled(capsys, flags, expected):
    with pytest.raises(SystemExit) as done:
        main(["distill", "--device", "cpu", "--plan", "--json", *flags])
    assert done.value.code == 0
    choice = json.loads(capsys.readouterr().out)["compile"]
    assert choice | expected == choice  # every expected key has the expected value


@pytest.mark.parametrize(
    "text,flags,reason",
    [
        ("compile: false\n", [], "--no-compile"),
        ("compile: true\n", ["--no-compile"], "--no-compile"),  # the command line wins
        ("steps: 5\n", [], "auto: off on the CPU"),
    ],
)
def test_a_config_file_holds_all_three_states(tmp_path, capsys, text, flags, reason):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as done:
        main(["distill", "--device", "cpu", "--plan", "--json", "--config", str(config), *flags])
    assert done.value.code == 0
    assert json.loads(capsys.readouterr().out)["compile"]["reason"] == reason


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["forward-kl", "reverse-kl", "jsd"])
def test_compiled_loss_blocks_match_the_direct_formula(kind):
    # Compiled on the CPU here, so that the graph a GPU would compile is checked everywhere;
    # chunk 5 of 24 tokens gives a last block of 4, the second (dynamic) compilation.
    kw = {"kind": kind, "temperature": 2.0, "alpha": 0.6, "beta": 0.3}
    chunked, direct = both(*inputs(), 5, **kw, compile_blocks=True)
    assert_same(chunked, direct)


@pytest.mark.slow
def test_a_run_compiled_as_on_a_gpu_trains_like_eager(monkeypatch):
    # What auto compiles on a GPU (both models and the loss blocks), run here on the CPU.
    # compile=True, not auto: auto would switch torch._dynamo's errors off for the whole session.
    config = TrainConfig(steps=3, batch_size=4, seq_len=8, warmup=0, compile=True)
    runs = []
    for choice in (CompileChoice(False, False, "eager"), CompileChoice(True, True, "as on a GPU")):
        monkeypatch.setattr(pipeline, "choose_compile", lambda *_, choice=choice: choice)
        student, teacher = models(0)
        pipe = Pipeline(student, teacher, config)
        pipe.train()
        runs.append((pipe.losses, student.state_dict()))
    (eager_losses, eager_weights), (losses, weights) = runs
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    # Compiled kernels round differently (~1e-6), and AdamW's normalised update lets that move a
    # weight by a few percent of one step's lr (3e-3); a wrong gradient would move it by ~lr.
    for name, value in weights.items():
        torch.testing.assert_close(value, eager_weights[name], rtol=1e-3, atol=1e-4)
    assert not torch._dynamo.config.suppress_errors  # only auto falls back to eager
