"""Every way a model spec can be wrong gives an AprError that names the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from apr_cli.errors import AprError
from apr_cli.model.checkpoint import load_model, save_model
from apr_cli.model.config import ModelConfig
from apr_cli.model.qwen2 import build_model

TINY = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    torch_dtype="float32",
)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A valid single-file checkpoint to break."""
    return save_model(build_model(TINY, seed=0), tmp_path / "model")


def rewrite(path: Path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def load_error(spec) -> str:
    with pytest.raises(AprError) as e:
        load_model(str(spec))
    return str(e.value)


def test_valid_checkpoint_loads(ckpt):
    model, info = load_model(str(ckpt))
    assert info["kind"] == "local" and info["path"] == str(ckpt.resolve())
    assert info["config"] == TINY.to_dict()
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(model(x), build_model(TINY, seed=0)(x))


def test_missing_path(tmp_path):
    msg = load_error(tmp_path / "nope")
    assert "nope" in msg and "no such folder" in msg


def test_a_file_is_not_a_model(ckpt):
    assert "pass the folder" in load_error(ckpt / "model.safetensors")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    assert "config.json: missing" in load_error(ckpt)


def test_invalid_config_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in load_error(ckpt)


def test_config_missing_a_field(ckpt):
    hf = json.loads((ckpt / "config.json").read_text())
    del hf["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(hf))
    assert "missing hidden_size" in load_error(ckpt)


def test_missing_safetensors(ckpt):
    (ckpt / "model.safetensors").unlink()
    assert "no model.safetensors or model.safetensors.index.json" in load_error(ckpt)


def test_missing_tensor(ckpt):
    rewrite(ckpt / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert "tensor model.layers.1.mlp.up_proj.weight is missing" in load_error(ckpt)


def test_missing_untied_lm_head(ckpt):
    rewrite(ckpt / "model.safetensors", lambda t: t.pop("lm_head.weight"))
    assert "tensor lm_head.weight is missing" in load_error(ckpt)


def test_wrong_shape(ckpt):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)

    rewrite(ckpt / "model.safetensors", shrink)
    msg = load_error(ckpt)
    assert "model.layers.0.self_attn.k_proj.weight has shape [8, 32], expected [16, 32]" in msg


def test_unexpected_tensor(ckpt):
    rewrite(ckpt / "model.safetensors", lambda t: t.update({"model.layers.2.mlp.x": torch.ones(1)}))
    assert "unexpected tensor model.layers.2.mlp.x" in load_error(ckpt)


def test_tied_lm_head_and_inv_freq_are_tolerated(tmp_path):
    cfg = TINY.with_(tie_word_embeddings=True)
    out = save_model(build_model(cfg, seed=0), tmp_path / "tied")

    def add(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)

    rewrite(out / "model.safetensors", add)
    model, _ = load_model(str(out))
    assert model.lm_head is None


def test_corrupt_header(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 8 + b"garbage")
    msg = load_error(ckpt)
    assert "model.safetensors: not a readable safetensors file" in msg


def test_truncated_file(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "not a readable safetensors file" in load_error(ckpt)


def test_missing_shard_of_an_index(tmp_path):
    out = save_model(build_model(TINY, seed=0), tmp_path / "sharded", max_shard_bytes=8_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    msg = load_error(out)
    assert f"shard {shards[1].name} is missing" in msg


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    out = save_model(build_model(TINY, seed=0), tmp_path / "sharded", max_shard_bytes=8_000)
    first = sorted(out.glob("model-*.safetensors"))[0]
    name = next(iter(load_file(first)))
    rewrite(first, lambda t: t.pop(name))
    assert f"tensor {name} is missing" in load_error(out)


def test_invalid_index(tmp_path):
    out = save_model(build_model(TINY, seed=0), tmp_path / "sharded", max_shard_bytes=8_000)
    (out / "model.safetensors.index.json").write_text('{"metadata": {}}')
    assert "not a valid safetensors index" in load_error(out)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_only_pickle_is_refused(ckpt, name):
    (ckpt / "model.safetensors").unlink()
    (ckpt / name).write_bytes(b"\x80\x04not loaded")
    msg = load_error(ckpt)
    assert name in msg and "pickle" in msg and "arbitrary code" in msg


def test_preset(tmp_path):
    a, info = load_model("tiny-student", seed=1)
    b, _ = load_model("tiny-student", seed=1)
    c, _ = load_model("tiny-student", seed=2, dtype=torch.bfloat16)
    assert info["kind"] == "preset" and info["path"] is None and info["dtype"] == "float32"
    assert torch.equal(a.output_weight, b.output_weight)
    assert c.output_weight.dtype == torch.bfloat16
    assert not torch.equal(a.output_weight, c.output_weight.float())


def test_unknown_name_that_is_not_a_hub_id():
    msg = load_error("tiny-teachr")
    assert "tiny-teachr" in msg and "tiny-teacher" in msg


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf-home" / "hub"
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so "org/name" is not also a local folder
    return cache


def test_hub_id_not_cached(hub_cache):
    msg = load_error("Qwen/Qwen2.5-Coder-0.5B")
    assert "not in the hub cache" in msg and str(hub_cache) in msg
    assert "hf download Qwen/Qwen2.5-Coder-0.5B" in msg


def test_invalid_hub_id(hub_cache):
    assert "not a valid hub id" in load_error("acme/bad..name")


def cache_model(cache: Path, repo: str, rev: str = "0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub writes: refs/main names a snapshot folder."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    return save_model(build_model(TINY, seed=4), root / "snapshots" / rev)


def test_hub_id_in_cache_resolves(hub_cache):
    snapshot = cache_model(hub_cache, "acme/tiny-coder")
    model, info = load_model("acme/tiny-coder")
    assert info["kind"] == "hub" and info["path"] == str(snapshot.resolve())
    assert torch.equal(model.output_weight, build_model(TINY, seed=4).output_weight)


def test_hub_cache_dir_from_hf_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    cache_model(tmp_path / "elsewhere", "acme/tiny-coder")
    assert load_model("acme/tiny-coder")[1]["kind"] == "hub"


def test_incomplete_hub_snapshot_is_caught(hub_cache):
    snapshot = cache_model(hub_cache, "acme/tiny-coder")
    (snapshot / "model.safetensors").unlink()
    assert "no model.safetensors" in load_error("acme/tiny-coder")


def test_save_refuses_to_overwrite_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(AprError, match="not a model folder"):
        save_model(build_model(TINY), tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_save_replaces_a_model_and_leaves_no_temp_folders(tmp_path):
    save_model(build_model(TINY, seed=0), tmp_path / "m", max_shard_bytes=8_000)
    save_model(build_model(TINY, seed=1), tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    model, _ = load_model(str(tmp_path / "m"))
    assert torch.equal(model.output_weight, build_model(TINY, seed=1).output_weight)


def test_tied_head_is_not_written(tmp_path):
    out = save_model(build_model(TINY.with_(tie_word_embeddings=True)), tmp_path / "tied")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
