"""Qwen3-MoE forward speed against transformers' at equal shapes, and cached generation (by hand).

    python benchmarks/bench_moe.py [--tokens 1024,2048] [--threads N] [--repeats 5]

1. The whole model's forward (same weights in both) over 1-2k tokens: ours / transformers'
   tokens/s as a ratio from one process, alternating the two so machine load hits both alike.
2. Where our sparse layer's time goes: routing (router matmul, softmax, top-k) against the
   experts (grouping tokens by expert, the experts' SwiGLU matmuls, the weighted sum back).
3. Cached against uncached greedy generation of the MoE model at 128- and 512-token prompts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from bench_generate import compare

from apr_cli.model.config import ModelConfig
from apr_cli.model.qwen2 import Qwen2ForCausalLM, build_model, count_parameters

# 32 experts, top-4: a scaled-down Qwen3-30B-A3B (128 experts, top-8) that fits a CPU.
CONFIG = ModelConfig(
    architecture="Qwen3MoeForCausalLM",
    vocab_size=2048,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    explicit_head_dim=64,
    attention_bias=False,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
    num_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=256,
    norm_topk_prob=True,
    torch_dtype="float32",
)


def transformers_twin(model: Qwen2ForCausalLM, folder: str):
    """transformers' Qwen3MoeForCausalLM holding the same weights (read from our checkpoint)."""
    import transformers

    from apr_cli.model.checkpoint import save_model

    save_model(model, folder)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def timings(fn, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def forward_line(ours, theirs, tokens: int, repeats: int) -> str:
    """Both forwards in turn, the first of each pair alternating; median tok/s and the median of
    the pairs' ratios, and the largest logit difference."""
    x = torch.randint(0, CONFIG.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    runs = {"ours": lambda: ours(x), "theirs": lambda: theirs(input_ids=x)}
    seconds: dict[str, list[float]] = {"ours": [], "theirs": []}
    with torch.inference_mode():
        diff = (ours(x) - theirs(input_ids=x).logits).abs().max().item()
        for i in range(repeats):
            for name in ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours"):
                seconds[name] += timings(runs[name], 1)
    ratio = statistics.median(t / o for o, t in zip(seconds["ours"], seconds["theirs"]))
    o, t = statistics.median(seconds["ours"]), statistics.median(seconds["theirs"])
    return (
        f"forward {tokens:5d} tokens: ours {tokens / o:8.0f} tok/s, transformers "
        f"{tokens / t:8.0f} tok/s, ratio {ratio:4.2f}x (target >= 1.0x), max |logit diff| "
        f"{diff:.1e}"
    )


def split_line(model, tokens: int, repeats: int) -> str:
    """Median time of one sparse layer's routing and of its experts, on the same input."""
    moe = model.model.layers[0].mlp
    x = torch.randn(tokens, CONFIG.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        _, weights, chosen = moe.route(x)
        route_t = statistics.median(timings(lambda: moe.route(x), repeats))
        experts_t = statistics.median(timings(lambda: moe.run_experts(x, weights, chosen), repeats))
    total = route_t + experts_t
    return (
        f"sparse layer {tokens:5d} tokens: routing {route_t * 1e3:6.2f} ms "
        f"({100 * route_t / total:4.1f}%), experts {experts_t * 1e3:6.2f} ms "
        f"({100 * experts_t / total:4.1f}%)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1024,2048", help="forward lengths, one line each")
    parser.add_argument("--prompt-lens", default="128,512", help="generation prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ours = build_model(CONFIG, seed=0).eval()
    with tempfile.TemporaryDirectory() as folder:
        theirs = transformers_twin(ours, folder)
    print(
        f"model: {count_parameters(ours) / 1e6:.1f}M params, {CONFIG.num_hidden_layers} layers, "
        f"hidden {CONFIG.hidden_size}, {CONFIG.num_experts} experts, "
        f"top-{CONFIG.num_experts_per_tok}, of width {CONFIG.moe_intermediate_size}; "
        f"cpu, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}",
        flush=True,
    )
    for tokens in (int(t) for t in args.tokens.split(",")):
        print(forward_line(ours, theirs, tokens, args.repeats), flush=True)
        print(split_line(ours, tokens, args.repeats), flush=True)
    g = torch.Generator().manual_seed(0)
    for prompt_len in (int(x) for x in args.prompt_lens.split(",")):
        prompt = torch.randint(0, CONFIG.vocab_size, (1, prompt_len), generator=g)
        print(compare(ours, prompt, args.new_tokens, 2, compile=False), flush=True)


if __name__ == "__main__":
    main()
