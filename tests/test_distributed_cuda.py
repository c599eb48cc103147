"""The CUDA path: host syncs per step, fused AdamW. Skipped where no GPU is visible."""

import pytest
import torch

from apr_cli.distill.backend import select_backend
from apr_cli.distill.pipeline import Pipeline, TrainConfig
from apr_cli.model.config import ModelConfig
from apr_cli.model.qwen2 import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_pipeline(grad_accum: int = 2) -> Pipeline:
    teacher = build_model(ModelConfig.from_name("tiny-teacher"), seed=1)
    student = build_model(ModelConfig.from_name("tiny-student"), seed=0)
    config = TrainConfig(steps=4, batch_size=8, seq_len=32, grad_accum=grad_accum)
    return Pipeline(student, teacher, config, backend=select_backend("cuda"))


def test_a_step_waits_for_the_gpu_once():
    pipe = cuda_pipeline()
    pipe.train_step()  # the first step initialises kernels and optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any other synchronising call raises
    try:
        metrics = [pipe.train_step() for _ in range(2)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(m.loss > 0 and m.grad_norm > 0 for m in metrics)


def test_the_optimizer_is_fused_on_cuda():
    pipe = cuda_pipeline(grad_accum=1)
    assert pipe.optimizer.defaults["fused"] is True
    before = [p.detach().clone() for p in pipe.student.parameters()]
    pipe.train_step()
    assert all(not torch.equal(a, p) for a, p in zip(before, pipe.student.parameters()))


def test_rng_state_resumes_on_a_host_with_another_gpu_count():
    from apr_cli.distill.pipeline import rng_state, set_rng_state

    state = rng_state()
    expected = torch.rand(4, device="cuda")
    # As an older checkpoint from a host with one GPU more than this one recorded it.
    state["cuda"] = [state["cuda"]] * (torch.cuda.device_count() + 1)
    set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), expected)
    assert rng_state()["cuda"].dim() == 1  # one GPU's state, whatever the count
