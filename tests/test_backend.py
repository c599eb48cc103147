"""Matmul dtype selection: --dtype auto|bf16|fp32."""

import pytest
import torch

from apr_cli.distill.backend import select_backend
from apr_cli.errors import AprError


@pytest.mark.parametrize("dtype,expected", [("bf16", torch.bfloat16), ("fp32", None)])
def test_explicit_dtype_sets_autocast_and_teacher_dtype(dtype, expected):
    backend = select_backend("cpu", dtype)
    assert backend.autocast_dtype is expected
    assert backend.teacher_dtype == (expected or torch.float32)
    assert backend.describe()["dtype"] == ("bfloat16" if expected else "float32")


def test_auto_is_fp32_on_the_cpu():
    assert select_backend("cpu", "auto").autocast_dtype is None


def test_unknown_dtype_names_the_flag():
    with pytest.raises(AprError, match="--dtype"):
        select_backend("cpu", "fp16")
