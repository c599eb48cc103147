"""Matmul dtype selection: --dtype auto|bf16|fp32 and the AMX probe behind auto."""

import pytest
import torch

from apr_cli.distill.backend import cpu_has_bf16_matrix_units, select_backend
from apr_cli.errors import AprError


def test_amx_flag_is_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    assert cpu_has_bf16_matrix_units(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert not cpu_has_bf16_matrix_units(cpuinfo)
    assert not cpu_has_bf16_matrix_units(tmp_path / "missing")


@pytest.mark.parametrize("dtype,expected", [("bf16", torch.bfloat16), ("fp32", None)])
def test_explicit_dtype_sets_autocast_and_teacher_dtype(dtype, expected):
    backend = select_backend("cpu", dtype)
    assert backend.autocast_dtype is expected
    assert backend.teacher_dtype == (expected or torch.float32)
    assert backend.describe()["dtype"] == ("bfloat16" if expected else "float32")


def test_auto_follows_the_cpu_probe():
    want = torch.bfloat16 if cpu_has_bf16_matrix_units() else None
    assert select_backend("cpu", "auto").autocast_dtype is want


def test_unknown_dtype_names_the_flag():
    with pytest.raises(AprError, match="--dtype"):
        select_backend("cpu", "fp16")
