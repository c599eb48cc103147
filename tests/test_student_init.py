"""Students cut from the teacher's layers, and the vocab alignment rule."""

from __future__ import annotations

import pytest
import torch

from apr_cli.errors import AprError
from apr_cli.model.checkpoint import (
    init_student_from_teacher,
    load_model,
    parse_teacher_layers,
    save_model,
)
from apr_cli.model.config import ModelConfig
from apr_cli.model.qwen2 import build_model
from apr_cli.model.vocab import shared_vocab_size

TEACHER = ModelConfig(
    vocab_size=80,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    torch_dtype="float32",
)


@pytest.mark.parametrize("tied", [False, True])
def test_student_keeps_the_chosen_layers(tied):
    teacher = build_model(TEACHER.with_(tie_word_embeddings=tied), seed=0)
    student = init_student_from_teacher(teacher, [0, 2, 5])
    assert student.config == teacher.config.with_(num_hidden_layers=3)
    t, s = teacher.state_dict(), student.state_dict()
    for i, j in enumerate([0, 2, 5]):
        for name, tensor in t.items():
            if name.startswith(f"model.layers.{j}."):
                twin = name.replace(f"model.layers.{j}.", f"model.layers.{i}.")
                assert torch.equal(s[twin], tensor), twin
    for name in ["model.embed_tokens.weight", "model.norm.weight"]:
        assert torch.equal(s[name], t[name])
    assert torch.equal(student.output_weight, teacher.output_weight)
    assert (student.lm_head is None) == tied
    assert len(s) == len(t) - 3 * len([k for k in t if k.startswith("model.layers.0.")])


def test_student_owns_its_weights():
    teacher = build_model(TEACHER, seed=0)
    before = teacher.output_weight.clone()
    student = init_student_from_teacher(teacher, [1, 3])
    assert all(p.requires_grad for p in student.parameters())
    loss = student(torch.tensor([[1, 2, 3]])).sum()
    loss.backward()
    with torch.no_grad():
        for p in student.parameters():
            p.sub_(p.grad)
    assert torch.equal(teacher.output_weight, before)


def test_keeping_every_layer_reproduces_the_teacher(tmp_path):
    teacher = build_model(TEACHER, seed=0)
    student = init_student_from_teacher(teacher, list(range(6)))
    x = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))
    again, _ = load_model(str(save_model(student, tmp_path / "s")))
    with torch.no_grad():
        assert torch.equal(again(x), teacher(x))


@pytest.mark.parametrize(
    "value, layers",
    [
        ("teacher-layers:0,2,4", [0, 2, 4]),
        ("teacher-layers: 1, 5", [1, 5]),
        ("teacher-layers:every-other", [0, 2, 4]),
    ],
)
def test_parse_teacher_layers(value, layers):
    assert parse_teacher_layers(value, 6) == layers


def test_every_other_of_an_odd_count():
    assert parse_teacher_layers("teacher-layers:every-other", 5) == [0, 2, 4]


@pytest.mark.parametrize(
    "value, message",
    [
        ("layers:0,1", "expected teacher-layers:0,2,4"),
        ("teacher-layers:", "comma-separated integers"),
        ("teacher-layers:0,a", "comma-separated integers"),
        ("teacher-layers:0,6", "layer 6 is out of range (teacher has 6)"),
        ("teacher-layers:-1,2", "layer -1 is out of range"),
        ("teacher-layers:2,1", "distinct and increasing"),
        ("teacher-layers:1,1", "distinct and increasing"),
    ],
)
def test_parse_teacher_layers_errors(value, message):
    with pytest.raises(AprError) as e:
        parse_teacher_layers(value, 6)
    assert message in str(e.value) and "--student-init" in str(e.value)


def test_init_checks_layers():
    with pytest.raises(AprError, match="out of range"):
        init_student_from_teacher(build_model(TEACHER), [0, 9])
    with pytest.raises(AprError, match="no layers"):
        init_student_from_teacher(build_model(TEACHER), [])


@pytest.mark.parametrize(
    "teacher, student, shared",
    [
        (152064, 151936, 151936),  # Qwen2.5-Coder-7B and 0.5B: padding only
        (151936, 152064, 151936),
        (512, 512, 512),
        (50_000, 48_976, 48_976),  # 1024 rows: the floor of the rule
        (300_000, 297_000, 297_000),  # 1% of the larger vocab
    ],
)
def test_vocab_padding_is_aligned(teacher, student, shared):
    assert shared_vocab_size(teacher, student) == shared


@pytest.mark.parametrize(
    "teacher, student", [(152064, 512), (512, 151936), (50_000, 48_975), (300_000, 296_999)]
)
def test_vocab_mismatch_is_an_error(teacher, student):
    with pytest.raises(AprError) as e:
        shared_vocab_size(teacher, student)
    msg = str(e.value)
    assert f"teacher vocab {teacher} and student vocab {student} cannot be aligned" in msg


def test_vocab_sizes_must_be_positive():
    with pytest.raises(AprError, match="positive"):
        shared_vocab_size(0, 512)
