"""Model shapes: a dataclass read from and written to Hugging Face `config.json`, and presets."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from apr_cli.errors import AprError

# Architectures we can load: Qwen2 (q/k/v biases) and Llama (no biases); same block otherwise.
ARCHITECTURES = {"Qwen2ForCausalLM": True, "LlamaForCausalLM": False}
# config.json fields we read, with their JSON type; sizes must be >= 1, floats finite and > 0.
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "head_dim",
)
POSITIVE_FLOAT_FIELDS = ("rope_theta", "rms_norm_eps")
BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "use_sliding_window", "mlp_bias")


def validate_config(hf: dict[str, Any], source: str) -> None:
    """Refuse a config.json value of the wrong type or range before any model is built.

    Python's json reads NaN and Infinity, and int() would truncate 32.7: check the raw values.
    """
    for key in SIZE_FIELDS:
        value = hf.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise AprError(f"{source}: {key} must be a positive integer, got {value!r}")
    for key in POSITIVE_FLOAT_FIELDS:
        value = hf.get(key)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not (is_number and 0 < value < math.inf):
            raise AprError(f"{source}: {key} must be a finite number > 0, got {value!r}")
    for key in BOOL_FIELDS:
        value = hf.get(key)
        if value is not None and not isinstance(value, bool):
            raise AprError(f"{source}: {key} must be true or false, got {value!r}")
    for key in ("torch_dtype", "dtype"):
        value = hf.get(key)
        if value is not None and not isinstance(value, str):
            raise AprError(f"{source}: {key} must be a string, got {value!r}")
    if not isinstance(hf.get("rope_parameters") or {}, dict):
        raise AprError(f"{source}: rope_parameters must be an object")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864  # SwiGLU inner width
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2  # GQA: each kv head serves heads / kv_heads query heads
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True  # lm_head shares embed_tokens' weight
    attention_bias: bool = True  # biases on q/k/v (Qwen2); Llama has none
    architecture: str = "Qwen2ForCausalLM"
    torch_dtype: str = "bfloat16"  # dtype of the weights on disk

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise AprError(
                f"config: hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise AprError(
                f"config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        """A preset by name (shapes only, no weights)."""
        if name not in PRESETS:
            raise AprError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read a Hugging Face config dict (Qwen2 or Llama)."""
        archs = hf.get("architectures") or ["Qwen2ForCausalLM"]
        arch = archs[0] if isinstance(archs, list) else archs
        if not isinstance(arch, str) or arch not in ARCHITECTURES:
            raise AprError(
                f"{source}: architecture {arch!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        required = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ]
        missing = [k for k in required if k not in hf]
        if missing:
            raise AprError(f"{source}: missing {', '.join(missing)}")
        validate_config(hf, source)
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
            raise AprError(f"{source}: head_dim {head_dim} != hidden_size / num_attention_heads")
        rope_type = (hf.get("rope_parameters") or {}).get("rope_type", "default")
        if hf.get("rope_scaling") or rope_type != "default":
            raise AprError(f"{source}: rope scaling ({rope_type}) is not supported")
        if hf.get("use_sliding_window"):
            raise AprError(f"{source}: use_sliding_window is not supported")
        if hf.get("mlp_bias"):
            raise AprError(f"{source}: mlp_bias is not supported")
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:  # newer transformers nest it under rope_parameters
            rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        try:
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=int(hf["num_attention_heads"]),
                num_key_value_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
                max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
                rope_theta=float(rope_theta),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=bool(hf.get("attention_bias", ARCHITECTURES[arch])),
                architecture=arch,
                torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
            )
        except (TypeError, ValueError) as e:
            raise AprError(f"{source}: invalid value ({e})") from None

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face config dict that `transformers` and our loader both read."""
        model_type = "qwen2" if self.architecture == "Qwen2ForCausalLM" else "llama"
        hf = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
        }
        if model_type == "llama":
            hf["attention_bias"] = self.attention_bias
        return hf

    def with_(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_QWEN = ModelConfig()
PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-coder-0.5b": _QWEN,
    "qwen2.5-coder-1.5b": _QWEN.with_(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12
    ),
    "qwen2.5-coder-7b": _QWEN.with_(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    # Small models that train on a laptop CPU; the built-in teacher and student.
    "tiny-teacher": _QWEN.with_(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        torch_dtype="float32",
    ),
    "tiny-student": _QWEN.with_(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        torch_dtype="float32",
    ),
}
