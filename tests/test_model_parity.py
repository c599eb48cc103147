"""Our Qwen2 module against transformers' on tiny random checkpoints, in both directions."""

from __future__ import annotations

import json

import pytest
import torch

from apr_cli.model.checkpoint import load_model, save_model
from apr_cli.model.config import ModelConfig
from apr_cli.model.qwen2 import build_model

transformers = pytest.importorskip("transformers")

# GQA, odd head counts (3 heads of 16, 5 heads of 8 with no GQA), tied and untied heads.
SHAPES = {
    "gqa-tied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, tie=True),
    "odd-heads-untied": dict(
        hidden_size=48, num_attention_heads=3, num_key_value_heads=1, tie=False
    ),
    "mha-odd-untied": dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=5, tie=False),
}


def hf_model(shape: dict, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random transformers Qwen2ForCausalLM with biases that are not zero."""
    cfg = transformers.Qwen2Config(
        vocab_size=97,
        hidden_size=shape["hidden_size"],
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        tie_word_embeddings=shape["tie"],
        rope_theta=50000.0,  # not the default, so it must be read
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # HF zero-inits biases and sets norms to one; random values make both count.
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.to(dtype)


def ids(vocab: int = 97, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def ours_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", SHAPES)
def test_transformers_checkpoint_loads_with_same_logits(tmp_path, name):
    ref = hf_model(SHAPES[name])
    ref.save_pretrained(tmp_path, safe_serialization=True)
    model, info = load_model(str(tmp_path))
    assert info["kind"] == "local" and info["dtype"] == "float32"
    assert info["parameters"] == sum(p.numel() for p in ref.parameters())
    x = ids()
    diff = (ours_logits(model, x) - hf_logits(ref, x)).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("name", SHAPES)
def test_our_checkpoint_loads_into_transformers(tmp_path, name):
    shape = SHAPES[name]
    cfg = ModelConfig(
        vocab_size=97,
        hidden_size=shape["hidden_size"],
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        tie_word_embeddings=shape["tie"],
        rope_theta=50000.0,  # not the default, so it must be read
        max_position_embeddings=256,
        torch_dtype="float32",
    )
    model = build_model(cfg, seed=3)
    out = save_model(model, tmp_path / "student")
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["Qwen2ForCausalLM"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = ids()
    diff = (ours_logits(model, x) - hf_logits(ref, x)).abs().max().item()
    assert diff <= 1e-4


def test_llama_checkpoint_loads_with_same_logits(tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        rope_theta=50000.0,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path))
    assert not model.config.attention_bias
    x = ids()
    assert (ours_logits(model, x) - hf_logits(ref, x)).abs().max().item() <= 1e-4
    again = transformers.AutoModelForCausalLM.from_pretrained(save_model(model, tmp_path / "ours"))
    assert (hf_logits(again.eval(), x) - hf_logits(ref, x)).abs().max().item() <= 1e-4


def test_sharded_round_trip_and_transformers_reads_the_shards(tmp_path):
    model, _ = load_model("tiny-student", seed=5)
    out = save_model(model, tmp_path / "sharded", max_shard_bytes=200_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert set(index["weight_map"].values()) == set(shards)

    again, _ = load_model(str(out))
    for name, t in model.state_dict().items():
        assert torch.equal(t, again.state_dict()[name]), name
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = ids(vocab=512)
    assert (ours_logits(again, x) - hf_logits(ref, x)).abs().max().item() <= 1e-4


def test_bf16_checkpoint_loads_in_bf16_by_default(tmp_path):
    ref = hf_model(SHAPES["gqa-tied"], dtype=torch.bfloat16)
    ref.save_pretrained(tmp_path)
    model, info = load_model(str(tmp_path))
    assert info["dtype"] == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    x = ids()
    ours = ours_logits(model, x).float()
    theirs = hf_logits(ref, x).float()
    assert (ours - theirs).abs().max().item() <= 0.05  # bf16 rounding, not a layout error

    # The same bf16 weights upcast to fp32 on load agree with transformers in fp32.
    model32, info32 = load_model(str(tmp_path), dtype=torch.float32)
    assert info32["dtype"] == "float32"
    diff = (ours_logits(model32, x) - hf_logits(ref.float(), x)).abs().max().item()
    assert diff <= 1e-4


def test_save_writes_a_chosen_dtype(tmp_path):
    model, _ = load_model("tiny-student")
    out = save_model(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again, info = load_model(str(out))
    assert info["dtype"] == "bfloat16"
    w = model.model.embed_tokens.weight
    assert torch.equal(again.model.embed_tokens.weight, w.to(torch.bfloat16))
