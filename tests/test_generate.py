"""Generation: the KV cache changes nothing but speed; sampling is seeded; the CLI prints ids."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from apr_cli.cli import app
from apr_cli.data.tokenizer import ByteTokenizer, train_bpe
from apr_cli.errors import AprError
from apr_cli.model.checkpoint import load_model, save_model
from apr_cli.model.config import ModelConfig
from apr_cli.model.generate import Stop, generate, generate_batch, next_token
from apr_cli.model.qwen2 import KVCache, build_model

CFG = ModelConfig(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    torch_dtype="float32",
)


@pytest.fixture(scope="module")
def model():
    m = build_model(CFG, seed=0)
    with torch.no_grad():  # sharper logits than the 0.02 init, so greedy paths are not all ties
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return m


def prompts(batch: int = 2, length: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, CFG.vocab_size, (batch, length), generator=g)


def test_cached_logits_match_full_forward(model):
    x = prompts(2, 20)
    with torch.no_grad():
        full = model(x)  # (B, T, V)
        cache = KVCache(model, 2, 20)
        parts = [
            model(x[:, :12], 0, cache),
            *(model(x[:, t : t + 1], t, cache) for t in range(12, 20)),
        ]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5


def test_greedy_with_cache_equals_rerunning_the_prefix(model):
    x = prompts()
    cached = generate(model, x, 64)
    uncached = generate(model, x, 64, use_cache=False)
    assert cached.shape == (2, 64) and cached.dtype == torch.long
    assert torch.equal(cached, uncached)
    assert len(set(cached[0].tolist())) > 5  # not one token repeated: the check means something


def test_sampling_is_seeded(model):
    x = prompts()

    def run(seed: int, use_cache: bool = True) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return generate(model, x, 24, temperature=1.0, generator=g, use_cache=use_cache)

    assert torch.equal(run(1), run(1))
    assert torch.equal(run(1), run(1, use_cache=False))
    assert not torch.equal(run(1), run(2))
    assert not torch.equal(run(1), generate(model, x, 24))


def test_tiny_top_p_is_greedy(model):
    x = prompts()
    g = torch.Generator().manual_seed(0)
    sampled = generate(model, x, 16, temperature=1.0, top_p=1e-6, generator=g)
    assert torch.equal(sampled, generate(model, x, 16))


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.3, 0.1]])).expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(next_token(logits, 1.0, 0.5, g).tolist()) == {1}
    drawn = next_token(logits, 1.0, 0.7, g)
    assert set(drawn.tolist()) == {1, 2}
    assert 0.55 < (drawn == 1).float().mean().item() < 0.70  # renormalised: 0.5 / 0.8
    assert set(next_token(logits, 1.0, 1.0, g).tolist()) == {0, 1, 2, 3}


def test_zero_new_tokens(model):
    assert generate(model, prompts(), 0).shape == (2, 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_ids=torch.tensor([[1, 320]])), "token 320 is outside"),
        (dict(prompt_ids=torch.tensor([1, 2])), "(batch, length)"),
        (dict(top_p=0.0), "--top-p"),
        (dict(temperature=-1.0), "--temperature"),
        (dict(max_new_tokens=300), "max_position_embeddings 256"),
    ],
)
def test_bad_arguments(model, kwargs, message):
    args = dict(prompt_ids=torch.tensor([[1, 2]]), max_new_tokens=4) | kwargs
    with pytest.raises(AprError, match=message.replace("(", r"\(").replace(")", r"\)")):
        generate(model, args.pop("prompt_ids"), args.pop("max_new_tokens"), **args)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return save_model(model, tmp_path_factory.mktemp("gen") / "model")


@pytest.mark.parametrize("extra", [[], pytest.param(["--compile"], marks=pytest.mark.slow)])
def test_cli_prints_the_new_ids(model, saved, extra):
    result = CliRunner().invoke(
        app, ["generate", str(saved), "--prompt-ids", "5,17,42", "--max-new-tokens", "10", *extra]
    )
    assert result.exit_code == 0, result.output
    expected = generate(model, torch.tensor([[5, 17, 42]]), 10)[0].tolist()
    assert result.stdout == "new token ids: " + " ".join(map(str, expected)) + "\n"
    # Compiling takes a while: a start line says so when no terminal shows the spinner.
    compiling = "generate: compiling the forward passes (the first calls wait)\n"
    assert result.stderr == (compiling if extra else "")


def test_cli_json_sampling_is_seeded(saved):
    args = ["generate", str(saved), "--prompt-ids", "1,2", "--max-new-tokens", "12", "--json"]
    args += ["--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]
    first = json.loads(CliRunner().invoke(app, args).stdout)
    second = json.loads(CliRunner().invoke(app, args).stdout)
    assert first == second
    assert first["prompt_ids"] == [1, 2] and len(first["new_token_ids"]) == 12
    assert first["text"] is None


def test_cli_preset_model():
    result = CliRunner().invoke(
        app, ["generate", "tiny-student", "--prompt-ids", "7", "--max-new-tokens", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["new_token_ids"]) == 3


def test_cli_prompt_text_with_byte_tokenizer(saved):
    args = ["generate", str(saved), "--prompt", "def f(", "--tokenizer", "bytes"]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "5", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["prompt_ids"] == list(b"def f(")
    assert out["text"] == ByteTokenizer().decode(out["new_token_ids"])


def test_cli_refuses_a_tokenizer_bigger_than_the_vocab(tmp_path):
    out = save_model(build_model(CFG.with_(vocab_size=200)), tmp_path / "small-vocab")
    args = ["generate", str(out), "--prompt", "x", "--tokenizer", "bytes"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "257 tokens, more than the model's vocab 200" in result.stderr


def test_cli_finds_the_model_folders_tokenizer(tmp_path):
    model, _ = load_model("tiny-student")
    out = save_model(model, tmp_path / "model")
    tok = train_bpe(["def add(a, b):\n    return a + b\n"] * 20, 300, out / "tokenizer.json")
    result = CliRunner().invoke(
        app, ["generate", str(out), "--prompt", "def add", "--max-new-tokens", "4"]
    )
    assert result.exit_code == 0, result.output
    ids_line, text_line = result.stdout.splitlines()
    new = [int(i) for i in ids_line.removeprefix("new token ids: ").split()]
    assert text_line == "text: " + tok.decode(new)


@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/model", "--prompt-ids", "1"], "no such folder"),
        (["tiny-student"], "exactly one of --prompt-ids and --prompt"),
        (["tiny-student", "--prompt-ids", "1", "--prompt", "hi"], "exactly one of"),
        (["tiny-student", "--prompt-ids", "1,x"], "comma-separated integers"),
        (["tiny-student", "--prompt-ids", "9999"], "token 9999 is outside"),
        (["tiny-student", "--prompt", "hi"], "--prompt needs --tokenizer"),
        (["tiny-student", "--prompt", "hi", "--tokenizer", "/no/tok.json"], "not found"),
        (["tiny-student", "--prompt-ids", "1", "--device", "cuda:0"], "--device"),
    ],
)
def test_cli_errors_are_one_line(args, message):
    if "cuda:0" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(app, ["generate", *args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1


@pytest.mark.slow
def test_compiled_generation_matches_eager_and_does_not_recompile(model):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x = prompts()
    for use_cache in (True, False):
        eager = generate(model, x, 12, use_cache=use_cache)
        assert torch.equal(generate(model, x, 12, use_cache=use_cache, compile=True), eager)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 3  # prefill, decode, uncached forward
    # Other prompt and output lengths (so other cache lengths and positions) reuse them.
    generate(model, prompts(2, 5), 20, compile=True)
    generate(model, prompts(2, 5), 20, compile=True, use_cache=False)
    assert counters["stats"]["unique_graphs"] == graphs


def test_batched_greedy_equals_each_prompt_alone(model):
    g = torch.Generator().manual_seed(5)
    batch = [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in (3, 17, 1, 9)]
    together = generate_batch(model, batch, 24)
    alone = [generate(model, torch.tensor([p]), 24)[0].tolist() for p in batch]
    assert together == alone
    assert len({tuple(row) for row in together}) == 4  # distinct rows: the check means something


def test_each_row_stops_on_its_own(model):
    batch = [[5, 17, 42], [8, 1], [100, 3, 3, 9]]
    free = generate_batch(model, batch, 30)
    eos = free[1][4]  # a token row 1 produces, so it ends there; the others run on
    stopped = generate_batch(model, batch, 30, stop=Stop(eos_ids=frozenset({eos})))
    for full, row in zip(free, stopped):
        cut = full.index(eos) if eos in full else len(full)
        assert row == full[:cut]
    assert len(stopped[1]) <= 4 < max(len(r) for r in stopped)


def test_stop_text_ends_a_row_with_the_token_that_completes_it(model):
    tok = ByteTokenizer()
    batch = [[5, 17, 42], [8, 1]]
    free = generate_batch(model, batch, 40)
    text = tok.decode(free[0][6:8])  # two bytes row 0 produces after its sixth token
    stopped = generate_batch(model, batch, 40, stop=Stop(texts=(text,), decode=tok.decode))
    assert stopped[0] == free[0][: len(stopped[0])] and text in tok.decode(stopped[0])
    assert text not in tok.decode(stopped[0][:-1])


def test_generate_defaults_to_auto_like_every_other_command():
    result = CliRunner().invoke(
        app, ["generate", "tiny-student", "--prompt-ids", "1", "--max-new-tokens", "2", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert json.loads(result.stdout)["device"] == expected
    assert "default: auto" in " ".join(
        CliRunner().invoke(app, ["generate", "--help"]).stdout.split()
    )
