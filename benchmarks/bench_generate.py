"""Greedy generation, tokens/s in the same run (run by hand): cached vs. uncached, and batched.

    python benchmarks/bench_generate.py [--prompt-lens 32,128,512] [--batch-sizes 1,4,16]
                                        [--device cpu] [--compile]

Uncached generation re-runs the whole prefix for every new token, so its cost grows with the
sequence; the KV cache makes each step one token. The original tool reported 19x; target >= 10x.
The ratio depends on the prompt length (the prefix each uncached step re-reads), so every run
prints one line per prompt length.

Batched generation decodes several prompts of different lengths at once (left-padded, as
`apr humaneval` does); one line per batch size gives the total new tokens/s and the ratio to
batch 1 (target: batch 16 >= 5x batch 1 on a CPU).
"""

from __future__ import annotations

import argparse
import time

import torch

from apr_cli.model.config import ModelConfig
from apr_cli.model.generate import generate, generate_batch
from apr_cli.model.qwen2 import build_model, count_parameters

# A few layers at hidden 512: small enough for a CPU, big enough that a forward pass over the
# prefix is real work rather than Python overhead.
CONFIG = ModelConfig(
    vocab_size=2048,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    torch_dtype="float32",
)


def timed_generate(
    model, prompt: torch.Tensor, new_tokens: int, use_cache: bool, compile: bool = False
):
    """Greedy tokens (B, new_tokens) and the seconds they took, after a short warm-up."""
    generate(model, prompt, 4, use_cache=use_cache, compile=compile)
    start = time.perf_counter()
    out = generate(model, prompt, new_tokens, use_cache=use_cache, compile=compile)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def compare(model, prompt: torch.Tensor, new_tokens: int, repeats: int, compile: bool) -> str:
    """One result line: cached and uncached tokens/s, their ratio, and whether tokens agree."""
    # Alternate the two and keep each one's best time, so load from other processes on a shared
    # machine skews the ratio less.
    cached_s = uncached_s = float("inf")
    for _ in range(repeats):
        cached, seconds = timed_generate(model, prompt, new_tokens, True, compile)
        cached_s = min(cached_s, seconds)
        uncached, seconds = timed_generate(model, prompt, new_tokens, False, compile)
        uncached_s = min(uncached_s, seconds)
    return (
        f"prompt {prompt.shape[1]:4d}: cached {new_tokens / cached_s:7.1f} tokens/s, "
        f"uncached {new_tokens / uncached_s:6.1f} tokens/s, speedup {uncached_s / cached_s:5.1f}x "
        f"(target >= 10x), same tokens: {torch.equal(cached, uncached)}"
    )


def batch_lines(
    model, sizes: list[int], prompt_len: int, new_tokens: int, repeats: int, compile: bool
) -> list[str]:
    """One line per batch size: new tokens/s over the whole batch and the ratio to the first."""
    g = torch.Generator().manual_seed(1)
    device = model.output_weight.device
    # Mixed lengths (half to all of prompt_len), so the padding and the mask are exercised.
    lengths = torch.randint(prompt_len // 2, prompt_len + 1, (max(sizes),), generator=g).tolist()
    prompts = [
        torch.randint(0, CONFIG.vocab_size, (int(n),), generator=g).tolist() for n in lengths
    ]
    best = dict.fromkeys(sizes, float("inf"))
    for _ in range(repeats):  # alternate the sizes, so machine load skews the ratios less
        for size in sizes:
            generate_batch(model, prompts[:size], 4, compile=compile)  # warm-up
            start = time.perf_counter()
            generate_batch(model, prompts[:size], new_tokens, compile=compile)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[size] = min(best[size], time.perf_counter() - start)
    rate = {size: size * new_tokens / seconds for size, seconds in best.items()}
    return [
        f"batch {size:3d}: {rate[size]:8.1f} new tokens/s, {rate[size] / rate[sizes[0]]:5.1f}x "
        f"batch {sizes[0]} (prompts of {prompt_len // 2}..{prompt_len} tokens)"
        for size in sizes
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument(
        "--prompt-lens", default="32,128,512", help="comma-separated prompt lengths, one line each"
    )
    parser.add_argument(
        "--batch-sizes", default="1,4,16", help="comma-separated batch sizes, one line each"
    )
    parser.add_argument(
        "--batch-prompt-len", type=int, default=128, help="longest prompt of the batch lines"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile both (warm-up pays)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; the best counts")
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="CPU threads; 1 on a machine shared with other jobs, where an oversubscribed "
        "thread pool stalls the many small ops of cached decoding",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model(CONFIG, seed=0).to(args.device)
    print(
        f"model: {count_parameters(model) / 1e6:.1f}M params, {CONFIG.num_hidden_layers} layers, "
        f"hidden {CONFIG.hidden_size}; {args.new_tokens} new tokens, {args.device}, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}"
        f"{', compiled' if args.compile else ''}"
    )
    g = torch.Generator().manual_seed(0)
    for prompt_len in (int(x) for x in args.prompt_lens.split(",") if x):
        prompt = torch.randint(0, CONFIG.vocab_size, (1, prompt_len), generator=g)
        line = compare(model, prompt.to(args.device), args.new_tokens, args.repeats, args.compile)
        print(line, flush=True)
    sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    if sizes:
        lines = batch_lines(
            model, sizes, args.batch_prompt_len, args.new_tokens, args.repeats, args.compile
        )
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
