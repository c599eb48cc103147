"""GGUF files from gguf's own writer load with the logits of transformers' GGUF loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from apr_cli.errors import AprError
from apr_cli.model.checkpoint import load_model
from apr_cli.model.config import ModelConfig
from apr_cli.model.gguf import gguf_name
from apr_cli.model.qwen2 import Qwen2ForCausalLM, build_model

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType

# transformers' loader reads no head_dim for qwen3 and no expert width for qwen3moe: it takes its
# defaults (128 and 768), so the test models use those.
BASE = ModelConfig(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    rope_theta=50000.0,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    torch_dtype="float32",
)
CONFIGS = {
    "qwen2": BASE.with_(hidden_size=128, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": BASE.with_(
        architecture="Qwen3ForCausalLM", explicit_head_dim=128, attention_bias=False
    ),
    "qwen3moe": BASE.with_(
        architecture="Qwen3MoeForCausalLM",
        explicit_head_dim=128,
        attention_bias=False,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=768,
        norm_topk_prob=True,
    ),
}
ARCH_OF = {cfg.architecture: arch for arch, cfg in CONFIGS.items()}
# A K-quant block covers 256 values of a row, so every matrix here is 256 wide.
K_QUANT = BASE.with_(
    architecture="Qwen3ForCausalLM",
    hidden_size=256,
    intermediate_size=256,
    explicit_head_dim=128,
    attention_bias=False,
)


def random_model(cfg: ModelConfig) -> Qwen2ForCausalLM:
    model = build_model(cfg, seed=2)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if "mlp.gate." in name else 0.1))
    return model


def random_blocks(qtype, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random but valid K-quant blocks: random codes, finite small scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(3e-4).tobytes(), dtype=np.uint8)
    if qtype == Q.Q6_K:
        data[..., -2:] = scale  # d is the block's last field
    else:  # Q4_K, Q5_K: d then dmin lead the block
        data[..., 0:2] = scale
        data[..., 2:4] = scale
    return data.reshape(rows, -1)


def encode(values: np.ndarray, qtype, seed: int) -> np.ndarray:
    if qtype == Q.F32:
        return values
    if qtype == Q.F16:
        return values.astype(np.float16)
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return random_blocks(qtype, int(np.prod(values.shape[:-1])), values.shape[-1], seed)
    return gguf.quants.quantize(values, qtype)


def write_gguf(path: Path, model: Qwen2ForCausalLM, quant, tokens: int | None = None) -> Path:
    """`model` as llama.cpp would write it; quant(name, shape) picks each tensor's type."""
    cfg = model.config
    arch = ARCH_OF[cfg.architecture]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch != "qwen2":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if arch == "qwen3moe":
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_token_list([f"t{i}" for i in range(tokens or cfg.vocab_size)])
    stacked: dict[str, list[np.ndarray]] = {}
    for name, t in model.state_dict().items():
        g, expert = gguf_name(name)
        stacked.setdefault(g, []).append(t.float().numpy())
        assert expert is None or expert == len(stacked[g]) - 1
    for i, (g, parts) in enumerate(stacked.items()):
        values = parts[0] if len(parts) == 1 else np.stack(parts)  # experts: (E, out, in)
        qtype = quant(g, values.shape)
        w.add_tensor(g, encode(values, qtype, seed=i), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def matrix_quant(qtype):
    """`qtype` for every matrix, F32 for norms (as llama.cpp's quantizer leaves them)."""
    return lambda name, shape: qtype if len(shape) > 1 else Q.F32


def hf_gguf_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return ref(input_ids=x).logits


def check_parity(path: Path, vocab: int) -> Qwen2ForCausalLM:
    ours, info = load_model(str(path), dtype=torch.float32)
    assert info["kind"] == "gguf"
    x = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (ours(x) - hf_gguf_logits(path, x)).abs().max().item()
    assert diff <= 1e-4
    return ours


@pytest.mark.parametrize("arch", CONFIGS)
@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0], ids=["F16", "Q8_0"])
def test_gguf_logits_equal_transformers_gguf_loader(tmp_path, arch, qtype):
    source = random_model(CONFIGS[arch])
    path = write_gguf(tmp_path / f"{arch}.gguf", source, matrix_quant(qtype))
    ours = check_parity(path, source.config.vocab_size)
    assert ours.config == source.config
    if qtype == Q.F16:  # close to the weights written, not merely to transformers' reading
        x = torch.arange(12)[None]
        with torch.no_grad():
            assert (ours(x) - source(x)).abs().max().item() < 5e-2


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q4_0, Q.BF16], ids=str)
def test_k_quants_and_others_match_transformers(tmp_path, qtype):
    source = random_model(K_QUANT)

    # A Q4_K_M-like mix: the tested type for matrices, Q6_K for the output, F32 norms.
    def quant(name, shape):
        return Q.Q6_K if name == "output.weight" else matrix_quant(qtype)(name, shape)

    path = write_gguf(tmp_path / "k.gguf", source, quant)
    check_parity(path, K_QUANT.vocab_size)


def test_folder_holding_one_gguf_loads_and_tied_head_is_read(tmp_path):
    source = random_model(CONFIGS["qwen3"].with_(tie_word_embeddings=True))
    write_gguf(tmp_path / "m.gguf", source, matrix_quant(Q.F32))
    ours, info = load_model(str(tmp_path))
    assert info["path"] == str((tmp_path / "m.gguf").resolve())
    assert ours.config.tie_word_embeddings and ours.lm_head is None
    for name, t in source.state_dict().items():
        assert torch.equal(ours.state_dict()[name], t), name
    write_gguf(tmp_path / "n.gguf", source, matrix_quant(Q.F32))
    with pytest.raises(AprError, match="several GGUF files"):
        load_model(str(tmp_path))


def test_run_dtype_applies(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", random_model(CONFIGS["qwen3moe"]), matrix_quant(Q.Q8_0))
    ours, info = load_model(str(path), dtype=torch.bfloat16)
    assert info["dtype"] == "bfloat16"
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}


def test_unknown_quant_type_is_refused(tmp_path):
    def quant(name, shape):
        return Q.Q5_0 if name == "blk.1.attn_q.weight" else Q.F32

    path = write_gguf(tmp_path / "m.gguf", random_model(CONFIGS["qwen3"]), quant)
    with pytest.raises(AprError, match=r"blk.1.attn_q.weight has quant type Q5_0, which is not"):
        load_model(str(path))


def test_unknown_architecture_is_refused(tmp_path):
    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(AprError, match="GGUF architecture 'llama' is not supported"):
        load_model(str(path))


def test_vocab_size_is_checked(tmp_path):
    path = write_gguf(
        tmp_path / "m.gguf", random_model(CONFIGS["qwen3"]), matrix_quant(Q.F32), tokens=90
    )
    with pytest.raises(AprError, match="vocabulary has 90 tokens but token_embd has 96 rows"):
        load_model(str(path))


def test_not_a_gguf_file_is_one_line(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not gguf at all")
    with pytest.raises(AprError, match="not a readable GGUF file"):
        load_model(str(path))


@pytest.mark.slow
def test_gguf_teacher_distills_a_student(tmp_path):
    from typer.testing import CliRunner

    from apr_cli.cli import app

    teacher = random_model(CONFIGS["qwen3moe"].with_(vocab_size=512))
    path = write_gguf(tmp_path / "teacher.gguf", teacher, matrix_quant(Q.Q8_0))
    out = tmp_path / "run"
    args = ["distill", "--teacher", path, "--student", "tiny-student", "--steps", 4, "--seq-len",
            16, "--batch-size", 4, "--out", out]  # fmt: skip
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "dispatch.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["teacher"]["kind"] == "gguf"
    assert manifest["teacher"]["config"]["architecture"] == "Qwen3MoeForCausalLM"
    kd = [json.loads(line)["kd_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(kd) == 4 and all(k > 0 for k in kd)
