"""Models in and out: Hugging Face folders, presets, hub ids from the cache; student init."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from apr_cli.errors import AprError
from apr_cli.fsutil import follow_umask
from apr_cli.model.config import PRESETS, ModelConfig
from apr_cli.model.gguf import find_gguf, load_gguf
from apr_cli.model.qwen2 import Qwen2ForCausalLM, build_model, count_parameters, meta_model

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}
DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


def load_model(
    spec: str,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[Qwen2ForCausalLM, dict[str, Any]]:
    """A model from a local folder, a GGUF file (or a folder holding one), a preset name or a
    cached hub id, and its description.

    On the `meta` device every check runs but no weight is read or made: shapes for a plan.
    """
    path = Path(spec).expanduser()
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        model = load_gguf(gguf_file, dtype=dtype, device=device)
        return model, describe(model, spec, "gguf", gguf_file)
    if path.is_dir():
        kind, folder = "local", path
    elif spec in PRESETS:
        if torch.device(device).type == "meta":
            model = meta_model(PRESETS[spec]).to(dtype or torch.float32)
        else:
            model = build_model(PRESETS[spec], seed).to(device=device, dtype=dtype or torch.float32)
        return model, describe(model, spec, "preset", None)
    elif path.exists():
        raise AprError(
            f"model {spec}: is a file; pass the folder holding {CONFIG}, or a .gguf file"
        )
    elif HUB_ID.match(spec):
        kind, folder = "hub", hub_snapshot(spec)
    else:
        raise AprError(
            f"model {spec}: no such folder, and not a preset ({', '.join(sorted(PRESETS))}) "
            "or a hub id (org/name)"
        )
    model = load_checkpoint(folder, dtype=dtype, device=device)
    return model, describe(model, spec, kind, folder)


def describe(model: Qwen2ForCausalLM, spec: str, kind: str, path: Path | None) -> dict[str, Any]:
    """What the run manifest records about a model."""
    return {
        "spec": spec,
        "kind": kind,
        "path": str(path.resolve()) if path is not None else None,
        "config": model.config.to_dict(),
        "parameters": count_parameters(model),
        "dtype": DTYPE_NAMES.get(model.output_weight.dtype, str(model.output_weight.dtype)),
    }


def hub_cache_dir() -> Path:
    """The hub cache, read from the environment now rather than when huggingface_hub loaded."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_snapshot(repo_id: str) -> Path:
    """The cached snapshot folder of a hub model; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except HFValidationError as e:
        raise AprError(f"model {repo_id}: no such folder, and not a valid hub id ({e})") from None
    except (LocalEntryNotFoundError, FileNotFoundError):
        raise AprError(
            f"model {repo_id}: not a local folder, and not in the hub cache {cache}; download it "
            f"first with `hf download {repo_id}` (or `huggingface-cli download {repo_id}`), "
            "then run again (HF_HUB_OFFLINE=1 is fine)"
        ) from None


def read_config(folder: Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face folder's config.json."""
    path = folder / CONFIG
    if not path.is_file():
        raise AprError(f"{path}: missing (a model folder needs {CONFIG})")
    try:
        hf = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AprError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise AprError(f"{path}: expected a JSON object")
    return ModelConfig.from_hf(hf, source=str(path))


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder (one file, or every shard its index names)."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise AprError(f"{index}: not a valid safetensors index ({e})") from None
        if not isinstance(weight_map, dict):
            raise AprError(f"{index}: weight_map must be an object of tensor name -> file")
        shards = sorted({resolve_shard_path(index, name) for name in weight_map.values()})
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise AprError(
                f"{index}: shard {missing[0]} is missing from {folder}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        return [folder / s for s in shards]
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AprError(
            f"{folder}: only pickle checkpoints ({', '.join(pickles)}); refusing to load them "
            "because unpickling can run arbitrary code. Convert to safetensors first"
        )
    raise AprError(f"{folder}: no {WEIGHTS} or {INDEX}")


def resolve_shard_path(index: Path, name: Any) -> str:
    """A weight_map file name, confined to the index's folder (no absolute path, no `..`).

    Lexical on purpose: the hub cache's shard files are symlinks into its blob store.
    """
    if not isinstance(name, str) or not name:
        raise AprError(f"{index}: weight_map entry {name!r} is not a file name")
    if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
        raise AprError(f"{index}: weight_map entry {name!r} is outside the model folder")
    return name


def read_headers(files: list[Path]) -> dict[str, tuple[Path, list[int], str]]:
    """Every tensor name in the files, with its file, shape and safetensors dtype."""
    found: dict[str, tuple[Path, list[int], str]] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    sl = f.get_slice(name)
                    found[name] = (file, list(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError) as e:
            raise AprError(f"{file}: not a readable safetensors file ({e})") from None
    return found


def check_header_sizes(
    cfg: ModelConfig, found: dict[str, tuple[Path, list[int], str]], folder: Path
) -> None:
    """The config's sizes against the file headers, before a model of that size is built.

    A config.json claiming a billion layers must fail here, not while building them.
    """
    layers = {int(m[1]) for m in map(LAYER_NAME.match, found) if m}
    if cfg.num_hidden_layers > len(layers):
        raise AprError(
            f"{folder / CONFIG}: num_hidden_layers {cfg.num_hidden_layers}, but the weights "
            f"hold {len(layers)} layers"
        )
    embed = found.get("model.embed_tokens.weight")
    if embed is not None and embed[1] != [cfg.vocab_size, cfg.hidden_size]:
        raise AprError(
            f"{folder / CONFIG}: vocab_size x hidden_size is {cfg.vocab_size} x "
            f"{cfg.hidden_size}, but {embed[0]} holds model.embed_tokens.weight of {embed[1]}"
        )


def load_checkpoint(
    folder: Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Qwen2ForCausalLM:
    """A model from a Hugging Face folder, every tensor name and shape checked first."""
    cfg = read_config(folder)
    found = read_headers(weight_files(folder))
    check_header_sizes(cfg, found, folder)
    model = meta_model(cfg)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise AprError(f"{folder}: tensor {missing[0]} is missing{more}")
    # A tied lm_head is the embedding again; rotary inv_freq is recomputed from the config.
    extra = [
        k
        for k in found
        if k not in expected
        and not (k == "lm_head.weight" and cfg.tie_word_embeddings)
        and not k.endswith("rotary_emb.inv_freq")
    ]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise AprError(f"{found[extra[0]][0]}: unexpected tensor {extra[0]}{more}")
    for name, shape in expected.items():
        file, got, _ = found[name]
        if got != shape:
            raise AprError(f"{file}: tensor {name} has shape {got}, expected {shape}")
    if dtype is None:
        file_dtype = found["model.embed_tokens.weight"][2]
        if file_dtype not in SAFETENSORS_DTYPES:
            raise AprError(f"{folder}: weights are {file_dtype}; pass a float dtype to load them")
        dtype = SAFETENSORS_DTYPES[file_dtype]

    device = torch.device(device)
    if device.type == "meta":
        return model.to(dtype)
    # Tensor by tensor, straight into the target dtype and device: the only full copy in memory
    # is the model itself.
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(found[name][0], []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in names:
                state[name] = f.get_tensor(name).to(dtype)
    model.load_state_dict(state, assign=True)
    return model


def save_model(
    model: Qwen2ForCausalLM,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write a model in Hugging Face layout, atomically; returns the folder."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG).is_file())):
        raise AprError(f"{out}: exists and is not a model folder; refusing to overwrite it")
    # The tied lm_head is not in the state dict.
    tensors = {
        k: v.detach().to(device="cpu", dtype=dtype or v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }
    saved_dtype = dtype or model.output_weight.dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf = model.config.to_hf()
        hf["torch_dtype"] = DTYPE_NAMES[saved_dtype]
        (tmp / CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], tmp / WEIGHTS, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    except SafetensorError as e:  # it reports the OS's error only in its message
        shutil.rmtree(tmp, ignore_errors=True)
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise AprError(f"{out}: could not be written ({e})") from None
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(out)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    follow_umask(tmp)
    # Swap in the finished folder: a crash before this leaves only the temp folder behind, and
    # the previous model stays whole until the new one is in place.
    if out.exists():
        old = out.with_name(f"{tmp.name}.old")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out


def parse_teacher_layers(value: str, num_layers: int) -> list[int]:
    """Teacher layer indices from `teacher-layers:0,2,4` or `teacher-layers:every-other`."""
    prefix = "teacher-layers:"
    if not value.startswith(prefix):
        raise AprError(
            f"--student-init {value!r}: expected {prefix}0,2,4,... or {prefix}every-other"
        )
    body = value[len(prefix) :].strip()
    if body == "every-other":
        return list(range(0, num_layers, 2))
    try:
        layers = [int(x) for x in body.split(",")]
    except ValueError:
        raise AprError(
            f"--student-init {value!r}: layers must be comma-separated integers"
        ) from None
    check_layers(layers, num_layers, f"--student-init {value!r}")
    return layers


def check_layers(layers: list[int], num_layers: int, source: str) -> None:
    """Layers must be distinct teacher layers in increasing order."""
    if not layers:
        raise AprError(f"{source}: no layers given")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise AprError(f"{source}: layer {bad[0]} is out of range (teacher has {num_layers})")
    if any(b <= a for a, b in zip(layers[:-1], layers[1:], strict=True)):
        raise AprError(f"{source}: layers must be distinct and increasing, got {layers}")


def init_student_from_teacher(teacher: Qwen2ForCausalLM, layers: list[int]) -> Qwen2ForCausalLM:
    """A student that keeps `layers` of the teacher and copies its embeddings, norm and head."""
    check_layers(layers, teacher.config.num_hidden_layers, "teacher-layers")
    t = teacher.config
    # Each kept layer stays dense or sparse as it was: the student lists its dense layers.
    dense = tuple(i for i, layer in enumerate(layers) if not t.is_sparse(layer))
    sparse_layout = {"decoder_sparse_step": 1, "mlp_only_layers": dense} if t.arch.moe else {}
    cfg = t.with_(num_hidden_layers=len(layers), **sparse_layout)
    src = teacher.state_dict()
    state = {}
    for name in src:
        parts = name.split(".")
        if name.startswith("model.layers."):
            teacher_layer = int(parts[2])
            if teacher_layer not in layers:
                continue
            parts[2] = str(layers.index(teacher_layer))
        # clone: training the student must not move the teacher's weights.
        state[".".join(parts)] = src[name].detach().clone()
    student = meta_model(cfg)
    student.load_state_dict(state, assign=True)
    return student.train(teacher.training)
