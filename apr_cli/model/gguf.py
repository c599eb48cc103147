"""Models from llama.cpp's GGUF files: the config from metadata, tensors dequantized one by one.

Read with the `gguf` package (maintained with llama.cpp); its own dequantization turns each
tensor into fp32 numpy, which becomes the run's dtype before the next tensor is read, so only
one tensor is ever held in fp32. llama.cpp's converter permutes nothing for qwen2/qwen3 (unlike
llama's q/k), so tensors map to ours by name alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from apr_cli.errors import AprError
from apr_cli.model.config import ModelConfig
from apr_cli.model.qwen2 import Qwen2ForCausalLM, meta_model

SUFFIX = ".gguf"
ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
}
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")
TOP_LEVEL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# Our name inside model.layers.N -> llama.cpp's inside blk.N.
IN_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",  # the router
}
# Experts are stacked in one (experts, out, in) tensor per projection.
EXPERT = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def find_gguf(path: Path) -> Path | None:
    """The GGUF file that `path` names: the file itself, or the one .gguf in a folder."""
    if path.is_file():
        return path if path.suffix == SUFFIX else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob(f"*{SUFFIX}"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise AprError(f"model {path}: holds several GGUF files ({names}); pass one of them")
    return found[0] if found else None


def gguf_name(name: str) -> tuple[str, int | None]:
    """llama.cpp's tensor name for one of ours, and the expert's row in a stacked tensor."""
    if name in TOP_LEVEL:
        return TOP_LEVEL[name], None
    _, _, layer, rest = name.split(".", 3)  # model.layers.N.rest
    if rest.startswith("mlp.experts."):
        _, _, expert, proj, _ = rest.split(".")  # mlp.experts.E.proj.weight
        return f"blk.{layer}.{EXPERT[proj]}.weight", int(expert)
    return f"blk.{layer}.{IN_BLOCK[rest]}", None


class Metadata:
    """Typed reads of a GGUF file's key-value metadata, errors naming the file and key."""

    def __init__(self, reader: Any, source: Path):
        self.reader, self.source = reader, source

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def float32(self, key: str, default: float) -> float:
        """A float32 value as the decimal it was written from (1e-06, not 9.9999997e-07)."""
        return float(str(np.float32(self.get(key, default))))

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise AprError(f"{self.source}: GGUF metadata {key} is missing")
        return value


def read_config(reader: Any, source: Path) -> ModelConfig:
    """A ModelConfig from the file's `general.architecture` and `<arch>.*` metadata."""
    meta = Metadata(reader, source)
    arch = meta.require("general.architecture")
    if arch not in ARCHITECTURES:
        raise AprError(
            f"{source}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise AprError(f"{source}: rope scaling ({scaling}) is not supported")
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise AprError(f"{source}: tensor token_embd.weight is missing")
    embedding_rows = int(names["token_embd.weight"].shape[1])  # GGUF shapes are (in, out)
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch}.vocab_size") or (len(tokens) if tokens else embedding_rows)
    if vocab != embedding_rows:
        raise AprError(
            f"{source}: vocabulary has {vocab} tokens but token_embd has {embedding_rows} rows"
        )
    heads = int(meta.require(f"{arch}.attention.head_count"))
    hidden = int(meta.require(f"{arch}.embedding_length"))
    moe = {}
    if arch == "qwen3moe":
        moe = dict(
            num_experts=int(meta.require(f"{arch}.expert_count")),
            num_experts_per_tok=int(meta.require(f"{arch}.expert_used_count")),
            moe_intermediate_size=int(meta.require(f"{arch}.expert_feed_forward_length")),
            norm_topk_prob=True,  # llama.cpp's qwen3moe always renormalises the top-k weights
        )
    try:
        return ModelConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            # qwen3moe files may lack it: every layer there is sparse.
            intermediate_size=int(meta.get(f"{arch}.feed_forward_length", 0)),
            num_hidden_layers=int(meta.require(f"{arch}.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
            max_position_embeddings=int(meta.get(f"{arch}.context_length", 32768)),
            rope_theta=meta.float32(f"{arch}.rope.freq_base", 10000.0),
            rms_norm_eps=meta.float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            architecture=ARCHITECTURES[arch],
            torch_dtype="float32",
            explicit_head_dim=(
                int(meta.get(f"{arch}.attention.key_length", hidden // heads))
                if arch != "qwen2"
                else None
            ),
            **moe,
        )
    except (TypeError, ValueError) as e:
        raise AprError(f"{source}: invalid GGUF metadata ({e})") from None


def load_gguf(
    path: Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Qwen2ForCausalLM:
    """A model from a GGUF file, every tensor's name, type and shape checked before any is read."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(path)  # memory-maps the file; tensor data is read on access
    except (OSError, ValueError) as e:
        raise AprError(f"{path}: not a readable GGUF file ({e})") from None
    cfg = read_config(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    bad = [t for t in reader.tensors if t.tensor_type.name not in QUANT_TYPES]
    if bad:
        raise AprError(
            f"{path}: tensor {bad[0].name} has quant type {bad[0].tensor_type.name}, "
            f"which is not supported (supported: {', '.join(QUANT_TYPES)})"
        )
    model = meta_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sources = {name: gguf_name(name) for name in expected}
    used = {g for g, _ in sources.values()}
    missing = sorted(used - set(tensors))
    if missing:
        raise AprError(f"{path}: tensor {missing[0]} is missing")
    extra = sorted(set(tensors) - used)
    if extra:
        raise AprError(f"{path}: unexpected tensor {extra[0]} for {cfg.architecture}")
    by_tensor: dict[str, list[tuple[str, int | None]]] = {}
    for name, (g, expert) in sources.items():
        by_tensor.setdefault(g, []).append((name, expert))

    dtype = dtype or torch.float32
    if torch.device(device).type == "meta":  # checked; shapes only
        return model.to(dtype)
    state: dict[str, torch.Tensor] = {}
    for g, targets in by_tensor.items():
        t = tensors[g]
        # (out, in) or (experts, out, in): GGUF lists dimensions innermost first.
        values = dequantize(t.data, t.tensor_type)
        if not values.flags.writeable:  # F32 comes back as a view of the read-only file map
            values = values.copy()
        values = torch.from_numpy(values).to(device=device, dtype=dtype)
        for name, expert in targets:
            # An expert's clone owns its storage: safetensors refuses tensors that share one.
            part = values if expert is None else values[expert].clone()
            if tuple(part.shape) != expected[name]:
                raise AprError(
                    f"{path}: tensor {g} has shape {list(part.shape)}, "
                    f"expected {list(expected[name])} for {name}"
                )
            state[name] = part
    model.load_state_dict(state, assign=True)
    return model
