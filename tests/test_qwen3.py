"""Qwen3 and Qwen3-MoE against transformers' own classes on tiny random checkpoints, both ways."""

from __future__ import annotations

import json

import pytest
import torch

from apr_cli.errors import AprError
from apr_cli.model.checkpoint import init_student_from_teacher, load_model, save_model
from apr_cli.model.config import PRESETS, ModelConfig
from apr_cli.model.generate import generate
from apr_cli.model.mlp import MLP, RouterStats, SparseMoE
from apr_cli.model.qwen2 import Qwen2ForCausalLM, build_model, count_parameters

transformers = pytest.importorskip("transformers")

VOCAB = 97
# head_dim 24 with hidden 32 and 2 heads: Qwen3's head width is not hidden / heads.
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=24,
    rope_theta=50000.0,  # not the default, so it must be read
    max_position_embeddings=256,
)
# mlp_only_layers and decoder_sparse_step both make dense layers among sparse ones.
MOE = {
    "dense-layer-1-norm": dict(mlp_only_layers=[1], norm_topk_prob=True),
    "dense-layer-1-no-norm": dict(mlp_only_layers=[1], norm_topk_prob=False),
    "sparse-step-2": dict(decoder_sparse_step=2, norm_topk_prob=True),
}


def randomize(model):
    """Norms, routers and weights far enough from HF's init that every part shows in logits."""
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):  # distinct routing, no near-ties
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


def hf_qwen3(tie: bool):
    cfg = transformers.Qwen3Config(**COMMON, tie_word_embeddings=tie)
    return randomize(transformers.Qwen3ForCausalLM(cfg))


def hf_moe(**moe):
    cfg = transformers.Qwen3MoeConfig(
        **COMMON, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, **moe
    )
    return randomize(transformers.Qwen3MoeForCausalLM(cfg))


def ids(seed: int = 1, length: int = 13) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def max_diff(ours: Qwen2ForCausalLM, ref, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(x) - ref(input_ids=x).logits).abs().max().item()


def hf_greedy(ref, x: torch.Tensor, n: int) -> torch.Tensor:
    out = ref.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, x.shape[1] :]


def check_both_ways(ref, tmp_path) -> Qwen2ForCausalLM:
    """transformers' checkpoint -> ours and ours -> transformers: same logits and greedy tokens."""
    ref.save_pretrained(tmp_path / "hf")
    ours, info = load_model(str(tmp_path / "hf"))
    assert info["parameters"] == sum(p.numel() for p in ref.parameters())
    x = ids()
    assert max_diff(ours, ref, x) <= 1e-4
    prompt = ids(seed=2, length=5)
    assert torch.equal(generate(ours, prompt, 32), hf_greedy(ref, prompt, 32))

    out = save_model(ours, tmp_path / "ours")
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(again) is type(ref)
    assert max_diff(ours, again, x) <= 1e-4
    return ours


@pytest.mark.parametrize("tie", [True, False])
def test_qwen3_both_ways(tmp_path, tie):
    ours = check_both_ways(hf_qwen3(tie), tmp_path)
    cfg = ours.config
    assert cfg.architecture == "Qwen3ForCausalLM" and cfg.head_dim == 24
    assert not cfg.attention_bias and cfg.tie_word_embeddings == tie
    assert ours.model.layers[0].self_attn.q_proj.weight.shape == (48, 32)


@pytest.mark.parametrize("name", MOE)
def test_qwen3_moe_both_ways(tmp_path, name):
    ours = check_both_ways(hf_moe(**MOE[name]), tmp_path)
    kinds = [type(block.mlp) for block in ours.model.layers]
    expected = [SparseMoE, MLP, SparseMoE] if "dense-layer-1" in name else [MLP, SparseMoE, MLP]
    assert kinds == expected
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["norm_topk_prob"] == MOE[name]["norm_topk_prob"]


def test_norm_topk_prob_changes_the_output(tmp_path):
    """The flag is read and used: the same weights give other logits without it."""
    ref = hf_moe(mlp_only_layers=[1], norm_topk_prob=True)
    ref.save_pretrained(tmp_path)
    ours, _ = load_model(str(tmp_path))
    flipped = Qwen2ForCausalLM(ours.config.with_(norm_topk_prob=False))
    flipped.load_state_dict(ours.state_dict())
    x = ids()
    with torch.no_grad():
        assert (ours(x) - flipped(x)).abs().max().item() > 1e-3


def test_aux_loss_matches_transformers(tmp_path):
    ref = hf_moe(mlp_only_layers=[1], norm_topk_prob=True)
    ref.save_pretrained(tmp_path)
    ours, _ = load_model(str(tmp_path))
    x = ids()
    with torch.no_grad():
        expected = ref(input_ids=x, output_router_logits=True).aux_loss
        stats = RouterStats()
        ours.hidden_states(x, router=stats)
    assert stats.tokens == 2 * x.numel()  # two sparse layers
    assert abs(stats.loss().item() - expected.item()) <= 1e-5
    assert RouterStats().loss().item() == 0.0


def test_aux_loss_has_gradient_to_the_router():
    model = build_model(PRESETS["tiny-qwen3-moe"], seed=1)
    stats = RouterStats()
    model.hidden_states(ids(), router=stats)
    stats.loss().backward()
    gate = model.model.layers[0].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_only_experts_with_tokens_run():
    """Tokens routed to two experts: at inference the other experts' forward is never called;
    in training they run on zero rows, so each has a zero gradient (DDP and FSDP2 need one)."""
    model = build_model(PRESETS["tiny-qwen3-moe"], seed=1)
    moe = model.model.layers[0].mlp
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[3] = 1.0  # every token's two largest logits: experts 3 and 5
        moe.gate.weight[5] = 0.5
    calls = []
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, i, o, e=e: calls.append((e, i[0].shape[0])))
    x = torch.randn(2, 7, 128).abs()  # positive, so expert 3 > 5 > the rest for every token
    with torch.no_grad():
        moe(x)
    assert sorted(calls) == [(3, 14), (5, 14)]
    moe(x).sum().backward()
    grads = [expert.up_proj.weight.grad for expert in moe.experts]
    assert all(g is not None for g in grads)
    assert [e for e, g in enumerate(grads) if g.abs().sum() > 0] == [3, 5]


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-qwen3-moe"])
def test_cached_greedy_equals_recomputation(preset):
    model = build_model(PRESETS[preset], seed=4)
    prompt = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(3))
    cached = generate(model, prompt, 24, use_cache=True)
    assert torch.equal(cached, generate(model, prompt, 24, use_cache=False))


def test_preset_sizes_match_the_published_ones():
    """Parameter counts of the real shapes (built on the meta device: no memory)."""

    def billions(name: str) -> float:
        with torch.device("meta"):
            return count_parameters(Qwen2ForCausalLM(PRESETS[name])) / 1e9

    assert 0.59 < billions("qwen3-0.6b") < 0.61  # 0.6B, tied
    assert 8.1 < billions("qwen3-8b") < 8.3  # 8.2B, untied
    assert 30.4 < billions("qwen3-30b-a3b") < 30.6  # 30.5B total, 3.3B active
    assert PRESETS["qwen3-coder-30b-a3b"].rope_theta == 10_000_000.0


def test_moe_config_needs_its_fields_and_reads_num_local_experts():
    hf = ModelConfig.from_name("tiny-qwen3-moe").to_hf()
    assert ModelConfig.from_hf(hf) == ModelConfig.from_name("tiny-qwen3-moe")
    renamed = {k: v for k, v in hf.items() if k != "num_experts"} | {"num_local_experts": 8}
    assert ModelConfig.from_hf(renamed).num_experts == 8
    del hf["moe_intermediate_size"]
    with pytest.raises(AprError, match="missing moe_intermediate_size"):
        ModelConfig.from_hf(hf, source="c.json")
    with pytest.raises(AprError, match="num_experts_per_tok 9 must be in 1..num_experts 8"):
        ModelConfig.from_name("tiny-qwen3-moe").with_(num_experts_per_tok=9)


def test_student_from_moe_teacher_layers_keeps_each_layer_kind():
    teacher = build_model(PRESETS["tiny-qwen3-moe"], seed=2)  # layer 1 dense, 0 and 2 sparse
    student = init_student_from_teacher(teacher, [1, 2])
    assert [type(b.mlp) for b in student.model.layers] == [MLP, SparseMoE]
    assert student.config.mlp_only_layers == (0,)
    whole = init_student_from_teacher(teacher, [0, 1, 2])
    x = ids()
    with torch.no_grad():
        assert torch.equal(whole(x), teacher(x))
