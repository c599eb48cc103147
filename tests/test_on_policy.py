"""On-policy distillation: TRL's GKD loss on sampled tokens, batch building, options, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from apr_cli.cli import app
from apr_cli.data.shards import write_shard
from apr_cli.distill.losses import IGNORE_INDEX, distill_loss, token_divergence
from apr_cli.distill.on_policy import (
    JsonlPrompts,
    SampledBatches,
    kv_cache_bytes,
    sequences_batch,
)
from apr_cli.distill.options import OnPolicyOptions
from apr_cli.errors import AprError
from apr_cli.model.config import PRESETS, ModelConfig
from apr_cli.model.generate import generate_batch
from apr_cli.model.qwen2 import build_model

TEACHER_CFG = ModelConfig(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    torch_dtype="float32",
)
STUDENT_CFG = TEACHER_CFG.with_(hidden_size=32, intermediate_size=64, num_hidden_layers=1)


def trl_generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature):
    """TRL's GKDTrainer.generalized_jsd_loss (trl/trainer/gkd_trainer.py), reduction
    "batchmean" with labels, written from its source as the reference: per-token terms
    (N, V) summed and divided by the number of non-ignored tokens. torch's kl_div(input,
    target) is KL(target || input) per element."""
    s_logp = F.log_softmax(student_logits / temperature, dim=-1)
    t_logp = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s_logp, t_logp, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t_logp, s_logp, reduction="none", log_target=True)
    else:
        beta = torch.tensor(beta, dtype=s_logp.dtype)
        mixture = torch.logsumexp(
            torch.stack([s_logp + torch.log(1 - beta), t_logp + torch.log(beta)]), dim=0
        )
        kl_teacher = F.kl_div(mixture, t_logp, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture, s_logp, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    mask = labels != -100
    per_token = jsd[mask].sum(-1)  # (N,)
    return per_token, jsd[mask].sum() / mask.sum()


# TRL's beta against our loss kinds: 0 is KL(teacher || student), 1 is KL(student || teacher),
# between them the generalized JSD with the same beta on the teacher's side of the mixture.
TRL_BETAS = [(0.0, "forward-kl", 0.5), (0.5, "jsd", 0.5), (1.0, "reverse-kl", 0.5),
             (0.3, "jsd", 0.3)]  # fmt: skip


def sharpened(cfg, seed):
    m = build_model(cfg, seed=seed)
    with torch.no_grad():  # sharper logits than the 0.02 init, so the two models disagree
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return m


@pytest.fixture(scope="module")
def sampled():
    """Teacher, student, and a batch of ragged prompts continued by the student."""
    teacher, student = sharpened(TEACHER_CFG, 1), sharpened(STUDENT_CFG, 2)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (3, 7, 5)]
    new = generate_batch(student, prompts, 6, temperature=1.0, generator=g)
    inputs, labels = sequences_batch(prompts, new)
    return teacher, student, prompts, new, inputs, labels


@pytest.mark.parametrize("trl_beta,kind,beta", TRL_BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_loss_on_sampled_tokens_equals_trl_generalized_jsd(
    sampled, trl_beta, kind, beta, temperature
):
    teacher, student, _, _, inputs, labels = sampled
    with torch.no_grad():
        s_hidden, t_hidden = student.hidden_states(inputs), teacher.hidden_states(inputs)
    s_logits = F.linear(s_hidden, student.output_weight)  # (B, T, V)
    t_logits = F.linear(t_hidden, teacher.output_weight)
    ref_tokens, ref_mean = trl_generalized_jsd_loss(
        s_logits, t_logits, labels, trl_beta, temperature
    )
    keep = labels != IGNORE_INDEX
    ours_tokens = token_divergence(
        F.log_softmax(s_logits[keep] / temperature, -1),
        F.log_softmax(t_logits[keep] / temperature, -1),
        kind,
        beta,
    )
    torch.testing.assert_close(ours_tokens, ref_tokens, rtol=1e-5, atol=1e-7)
    # The training loss: chunked over hidden states (blocks of 4 tokens), KD only (alpha 1).
    parts = distill_loss(
        s_hidden,
        student.output_weight,
        t_hidden,
        teacher.output_weight,
        labels,
        kind=kind,
        temperature=temperature,
        alpha=1.0,
        beta=beta,
        chunk_tokens=4,
    )
    torch.testing.assert_close(parts.kd, ref_mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts.loss, temperature**2 * ref_mean, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("trl_beta,kind,beta", TRL_BETAS[:3])
def test_gradient_on_sampled_tokens_equals_trls(sampled, trl_beta, kind, beta):
    teacher, student, _, _, inputs, labels = sampled
    with torch.no_grad():
        t_hidden = teacher.hidden_states(inputs)
        s_hidden = student.hidden_states(inputs)
    h = s_hidden.clone().requires_grad_(True)
    _, ref = trl_generalized_jsd_loss(
        F.linear(h, student.output_weight),
        F.linear(t_hidden, teacher.output_weight),
        labels,
        trl_beta,
        1.0,
    )
    (ref_grad,) = torch.autograd.grad(ref, h)
    h = s_hidden.clone().requires_grad_(True)
    parts = distill_loss(
        h,
        student.output_weight,
        t_hidden,
        teacher.output_weight,
        labels,
        kind=kind,
        temperature=1.0,
        alpha=1.0,
        beta=beta,
        chunk_tokens=4,
    )
    (grad,) = torch.autograd.grad(parts.loss, h)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert grad[labels == IGNORE_INDEX].abs().max() == 0  # prompt positions learn nothing


def test_sequences_batch_labels_only_the_generated_tokens():
    inputs, labels = sequences_batch([[1, 2, 3], [4]], [[5, 6], [7, 8]])
    # rows: 1 2 3 5 6 | 4 7 8 (padded with 0); inputs drop the last column, labels the first.
    assert inputs.tolist() == [[1, 2, 3, 5], [4, 7, 8, 0]]
    assert labels.tolist() == [[-100, -100, 5, 6], [7, 8, -100, -100]]


def test_student_samples_continue_the_prompts(sampled):
    _, _, prompts, new, inputs, labels = sampled
    assert [len(c) for c in new] == [6, 6, 6]  # no early stop: every row samples max_new_tokens
    for row, (p, c) in enumerate(zip(prompts, new)):
        assert inputs[row, : len(p)].tolist() == p
        kept = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert kept == c


def test_which_steps_sample_is_seeded_and_follows_the_fraction():
    def steps(fraction, seed=0):
        o = OnPolicyOptions(on_policy_fraction=fraction)
        s = SampledBatches(o, None, seed, 0, 1, torch.device("cpu"))
        return [s.samples_at(i) for i in range(2000)]

    assert not any(steps(0.0)) and all(steps(1.0))
    half = steps(0.5)
    assert half == steps(0.5) and half != steps(0.5, seed=1)
    assert 0.45 < np.mean(half) < 0.55
    assert 0.2 < np.mean(steps(0.25)) < 0.3


class Tokens:
    """A tokenizer giving one id per character, offset so ids stay inside a small vocab."""

    def encode(self, text):
        return [ord(ch) - ord("a") for ch in text]


def test_jsonl_prompts_are_rank_striped_and_keep_their_last_tokens(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ["abc", "de", "fghij"]))
    g = torch.Generator()
    ranks = [JsonlPrompts(path, Tokens(), 26, rank, 2) for rank in (0, 1)]
    first = [r.next_prompts(2, 3, g) for r in ranks]
    assert first == [[[0, 1, 2], [7, 8, 9]], [[3, 4], [0, 1, 2]]]  # prompt 3 cut to its last 3
    assert ranks[0].state_dict() == {"consumed": 4}
    assert ranks[1].next_prompts(1, 3, g) == [[7, 8, 9]]  # global prompt 5 -> index 2


@pytest.mark.parametrize(
    "text,message",
    [("not json\n", "line 1 is not a JSON object"), ('{"text": "a"}\n', 'with a "prompt"'),
     ('{"prompt": ""}\n', "empty"), ('{"prompt": "z"}\n', "outside the models' shared vocab"),
     ("\n", "no prompts")],
)  # fmt: skip
def test_bad_jsonl_prompts_are_refused_naming_the_flag(tmp_path, text, message):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(AprError, match="--prompts") as e:
        JsonlPrompts(path, Tokens(), 25, 0, 1)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "options,message",
    [
        (OnPolicyOptions(on_policy_fraction=1.5), "--on-policy must be in [0, 1]"),
        (
            OnPolicyOptions(on_policy_fraction=1, max_new_tokens=41),
            "--max-new-tokens must be in [1",
        ),
        (OnPolicyOptions(on_policy_fraction=1, sample_top_p=0), "--sample-top-p"),
        (OnPolicyOptions(on_policy_fraction=1, sample_temperature=-1), "--sample-temperature"),
        (OnPolicyOptions(on_policy_fraction=1, on_policy_loss="kl"), "--on-policy-loss"),
        (OnPolicyOptions(teacher_samples=True), "--teacher-samples needs --on-policy"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(AprError) as e:
        options.validate(40, has_teacher=True, has_dataset=True)
    assert message in str(e.value)


def test_sampling_settings_bind_only_a_sampling_run():
    OnPolicyOptions(max_new_tokens=32).validate(16, has_teacher=False, has_dataset=False)


def test_on_policy_needs_a_teacher_and_prompts():
    with pytest.raises(AprError, match="needs a teacher"):
        OnPolicyOptions(on_policy_fraction=1).validate(64, has_teacher=False, has_dataset=True)
    with pytest.raises(AprError, match="needs --prompts"):
        OnPolicyOptions(on_policy_fraction=1).validate(64, has_teacher=True, has_dataset=False)


# --- the CLI, in process ---

ARGS = ["--steps", "4", "--seq-len", "16", "--batch-size", "4", "--teacher-warmup", "2",
        "--device", "cpu", "--max-new-tokens", "6"]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_shard(d / "a.bin", np.random.default_rng(0).integers(0, 256, 3000))
    (d / "meta.json").write_text(json.dumps({"tokenizer": "bytes"}))
    return d


def distill(*args):
    return CliRunner().invoke(app, ["distill", *map(str, args)])


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_on_policy_steps_train_on_student_samples(tmp_path, dataset):
    run = tmp_path / "run"
    r = distill(*ARGS, "--dataset", dataset, "--on-policy", 1, "--out", run)
    assert r.exit_code == 0, r.output
    rows = metrics(run)
    assert [m["kind"] for m in rows] == ["on-policy"] * 4
    assert all(m["generated"] == 6.0 and m["sample_s"] > 0 for m in rows)
    # KD only on the student's own tokens: loss = T^2 * kd, reverse KL by default.
    assert all(abs(m["loss"] - 9 * m["kd_loss"]) < 1e-5 * m["loss"] for m in rows)
    assert "kind=on-policy gen=6.0 sample_s=" in r.output
    manifest = json.loads((run / "dispatch.json").read_text())
    o = manifest["options"]["on_policy"]
    assert o["on_policy_fraction"] == 1 and o["on_policy_loss"] == "reverse-kl"
    assert manifest["on_policy"]["prompt_source"]["kind"] == "shard-windows"


def test_cli_teacher_samples_keep_the_runs_loss(tmp_path, dataset):
    run = tmp_path / "run"
    r = distill(
        *ARGS,
        "--dataset",
        dataset,
        "--on-policy",
        1,
        "--teacher-samples",
        "--alpha",
        "0.5",
        "--out",
        run,
    )
    assert r.exit_code == 0, r.output
    rows = metrics(run)
    assert [m["kind"] for m in rows] == ["teacher-samples"] * 4
    for m in rows:  # the mixed loss: CE on the teacher's tokens counts
        assert abs(m["loss"] - (0.5 * 9 * m["kd_loss"] + 0.5 * m["ce_loss"])) < 1e-4


def test_cli_jsonl_prompts_use_the_datasets_tokenizer(tmp_path, dataset):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "def f(x):\n    return x" * 3}) + "\n")
    run = tmp_path / "run"
    r = distill(*ARGS, "--dataset", dataset, "--on-policy", 0.5, "--prompts", prompts, "--out", run)
    assert r.exit_code == 0, r.output
    manifest = json.loads((run / "dispatch.json").read_text())
    assert manifest["on_policy"]["prompt_source"] == {
        "kind": "jsonl",
        "path": str(prompts),
        "prompts": 1,
    }
    kinds = [m["kind"] for m in metrics(run)]
    assert set(kinds) <= {"on-policy", "off-policy"}
    expected = [
        SampledBatches(OnPolicyOptions(0.5), None, 0, 0, 1, "cpu").samples_at(i) for i in range(4)
    ]
    assert [k == "on-policy" for k in kinds] == expected


def test_plan_counts_the_sampling_kv_cache(dataset):
    r = distill(*ARGS, "--dataset", dataset, "--on-policy", 0.5, "--plan", "--json")
    assert r.exit_code == 0, r.output
    mem = json.loads(r.stdout)["memory_estimate_bytes"]
    student = build_model(PRESETS["tiny-student"], seed=0)
    assert mem["sampling_kv_cache"] == kv_cache_bytes(student, 4, 16) > 0
    off = distill(*ARGS, "--dataset", dataset, "--plan", "--json")
    assert json.loads(off.stdout)["memory_estimate_bytes"]["sampling_kv_cache"] == 0


@pytest.mark.parametrize(
    "args,message",
    [(["--on-policy", "0.5"], "--on-policy needs --prompts"),
     (["--teacher-samples"], "--teacher-samples needs --on-policy"),
     (["--on-policy", "0.5", "--max-new-tokens", "40"], "--max-new-tokens")],
)  # fmt: skip
def test_cli_refuses_bad_on_policy_settings(tmp_path, args, message):
    r = distill(*ARGS, *args, "--out", tmp_path / "run")
    assert r.exit_code == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_new_on_policy_fraction(tmp_path, dataset):
    run = tmp_path / "run"
    assert distill(*ARGS, "--dataset", dataset, "--on-policy", 0.5, "--out", run).exit_code == 0
    r = distill("--resume", run, "--on-policy", 1)
    assert r.exit_code == 2
    assert "--on-policy 1.0 (the run used 0.5)" in r.stderr
