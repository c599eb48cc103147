"""What a run compiles: the auto rule, the flags, the manifest, and the compiled loss blocks."""

import json

import pytest
import torch
from test_chunked_loss import assert_same, both, inputs

from apr_cli.cli import main
from apr_cli.distill.compile_policy import AUTO_MIN_STEPS, choose_compile

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


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["forward-kl", "reverse-kl", "jsd"])
def test_compiled_loss_blocks_match_the_direct_formula(kind):
    # Compiled on the CPU here, so that the graph a GPU would compile is checked everywhere;
    # chunk 5 of 24 tokens gives a last block of 4, the second (dynamic) compilation.
    kw = {"kind": kind, "temperature": 2.0, "alpha": 0.6, "beta": 0.3}
    chunked, direct = both(*inputs(), 5, **kw, compile_blocks=True)
    assert_same(chunked, direct)
