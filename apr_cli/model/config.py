"""Model shapes: a dataclass read from and written to Hugging Face `config.json`, and presets."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from apr_cli.errors import AprError


@dataclass(frozen=True)
class Architecture:
    """What sets one architecture of the family apart; the block is the same otherwise."""

    model_type: str  # config.json's model_type
    attention_bias: bool  # default for biases on q/k/v
    qk_norm: bool  # RMSNorm over each head's q and k before RoPE (Qwen3)
    moe: bool  # sparse expert MLPs in some or all layers (Qwen3-MoE)


# The one place per architecture.
ARCHITECTURES = {
    "Qwen2ForCausalLM": Architecture("qwen2", attention_bias=True, qk_norm=False, moe=False),
    "LlamaForCausalLM": Architecture("llama", attention_bias=False, qk_norm=False, moe=False),
    "Qwen3ForCausalLM": Architecture("qwen3", attention_bias=False, qk_norm=True, moe=False),
    "Qwen3MoeForCausalLM": Architecture("qwen3_moe", attention_bias=False, qk_norm=True, moe=True),
}
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
    # Width of one attention head when it is not hidden_size / num_attention_heads (Qwen3: 128).
    explicit_head_dim: int | None = None
    # Qwen3-MoE: layer i is sparse unless i is in mlp_only_layers or (i + 1) % decoder_sparse_step.
    num_experts: int = 0
    num_experts_per_tok: int = 0  # top-k experts per token
    moe_intermediate_size: int = 0  # SwiGLU inner width of one expert
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities to sum to 1
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()  # dense layers among the sparse ones
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss when training

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise AprError(f"config: unknown architecture {self.architecture!r}")
        # A manifest's JSON gives a list; the frozen config needs a hashable tuple.
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        if self.arch.moe and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise AprError(
                f"config: num_experts_per_tok {self.num_experts_per_tok} must be in "
                f"1..num_experts {self.num_experts}"
            )
        if self.explicit_head_dim is None and self.hidden_size % self.num_attention_heads:
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
        return self.explicit_head_dim or self.hidden_size // self.num_attention_heads

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.architecture]

    def is_sparse(self, layer: int) -> bool:
        """Whether layer `layer` has routed experts rather than a dense MLP (Qwen3-MoE rule)."""
        return (
            self.arch.moe
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        """A preset by name (shapes only, no weights)."""
        if name not in PRESETS:
            raise AprError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read a Hugging Face config dict (any architecture in ARCHITECTURES)."""
        archs = hf.get("architectures") or ["Qwen2ForCausalLM"]
        arch = archs[0] if isinstance(archs, list) else archs
        if not isinstance(arch, str) or arch not in ARCHITECTURES:
            raise AprError(
                f"{source}: architecture {arch!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        traits = ARCHITECTURES[arch]
        required = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ]
        if traits.moe:
            if "num_local_experts" in hf:  # transformers 5 writes the attribute's other name
                hf = {"num_experts": hf["num_local_experts"], **hf}
            required += ["num_experts", "num_experts_per_tok", "moe_intermediate_size"]
        missing = [k for k in required if k not in hf]
        if missing:
            raise AprError(f"{source}: missing {', '.join(missing)}")
        validate_config(hf, source)
        head_dim = hf.get("head_dim")
        if traits.qk_norm:  # Qwen3 sets head_dim on its own; 128 is transformers' default
            head_dim = head_dim or 128
        elif head_dim is not None and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
            raise AprError(f"{source}: head_dim {head_dim} != hidden_size / num_attention_heads")
        rope_type = (hf.get("rope_parameters") or {}).get("rope_type", "default")
        if hf.get("rope_scaling") or rope_type != "default":
            raise AprError(f"{source}: rope scaling ({rope_type}) is not supported")
        if hf.get("use_sliding_window"):
            raise AprError(f"{source}: use_sliding_window is not supported")
        if hf.get("mlp_bias"):
            raise AprError(f"{source}: mlp_bias is not supported")
        if traits.qk_norm and hf.get("attention_bias"):
            raise AprError(f"{source}: attention_bias is not supported for {arch}")
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:  # newer transformers nest it under rope_parameters
            rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        moe = {}
        if traits.moe:
            moe = dict(
                num_experts=int(hf["num_experts"]),
                num_experts_per_tok=int(hf["num_experts_per_tok"]),
                moe_intermediate_size=int(hf["moe_intermediate_size"]),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
                mlp_only_layers=tuple(int(i) for i in hf.get("mlp_only_layers") or ()),
                router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
            )
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
                attention_bias=bool(hf.get("attention_bias", traits.attention_bias)),
                architecture=arch,
                torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
                explicit_head_dim=int(head_dim) if traits.qk_norm else None,
                **moe,
            )
        except (TypeError, ValueError) as e:
            raise AprError(f"{source}: invalid value ({e})") from None

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face config dict that `transformers` and our loader both read."""
        hf = {
            "architectures": [self.architecture],
            "model_type": self.arch.model_type,
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
        if self.architecture != "Qwen2ForCausalLM":
            hf["attention_bias"] = self.attention_bias
        if self.arch.moe:
            hf.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
                router_aux_loss_coef=self.router_aux_loss_coef,
            )
        return hf

    def with_(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_QWEN = ModelConfig()
_QWEN3 = _QWEN.with_(
    architecture="Qwen3ForCausalLM",
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    explicit_head_dim=128,
    attention_bias=False,
    max_position_embeddings=40960,
)
_QWEN3_MOE = _QWEN3.with_(
    architecture="Qwen3MoeForCausalLM",
    hidden_size=2048,
    intermediate_size=6144,  # dense layers' width; every layer is sparse in these checkpoints
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    tie_word_embeddings=False,
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
    norm_topk_prob=True,
)
_TINY = _QWEN.with_(
    vocab_size=512,
    max_position_embeddings=2048,
    num_attention_heads=4,
    num_key_value_heads=2,
    torch_dtype="float32",
)
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
    # Qwen3: head_dim 128 whatever the width; the same BPE vocabulary as Qwen2.5.
    "qwen3-0.6b": _QWEN3,
    "qwen3-1.7b": _QWEN3.with_(hidden_size=2048, intermediate_size=6144),
    "qwen3-4b": _QWEN3.with_(
        hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32
    ),
    "qwen3-8b": _QWEN3.with_(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        tie_word_embeddings=False,
    ),
    "qwen3-30b-a3b": _QWEN3_MOE,
    # Same shapes; a longer context on a larger RoPE base.
    "qwen3-coder-30b-a3b": _QWEN3_MOE.with_(
        rope_theta=10_000_000.0, max_position_embeddings=262144
    ),
    # Small models that train on a laptop CPU; the built-in teacher and student.
    "tiny-teacher": _TINY.with_(hidden_size=256, intermediate_size=704, num_hidden_layers=4),
    "tiny-student": _TINY.with_(hidden_size=128, intermediate_size=352, num_hidden_layers=2),
    "tiny-qwen3": _TINY.with_(
        architecture="Qwen3ForCausalLM",
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        explicit_head_dim=48,
        attention_bias=False,
    ),
    "tiny-qwen3-moe": _TINY.with_(
        architecture="Qwen3MoeForCausalLM",
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=3,
        explicit_head_dim=48,
        attention_bias=False,
        tie_word_embeddings=False,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=96,
        norm_topk_prob=True,
        mlp_only_layers=(1,),
    ),
}
