"""ModelHandle: a Hugging Face causal LM with its tokenizer, adapter and fingerprint.

    handle = load_model("organism:facts-gpt2")         # or "gpt2-xl", or a local directory
    handle.n_layers, handle.d_model, handle.d_ff
    logits = handle.logits(["The Eiffel Tower is in"])  # (B, T, vocab)
    organism_file("organism:tiny", "counterfact.json")  # an organism's data files

**Loading an organism may start a long build.** ``organism:NAME`` resolves to the shipped copy
or the cached build of organism NAME; when neither exists, the organisms layer trains it first
(minutes for ``tiny``, up to ~2 hours on 2 cores for ``facts-gpt2`` built from scratch). That
is :func:`resolve_organism`, the one late-bound call from this core module up to
:mod:`memlens.organisms.registry` — the only exception to the import contract
(docs/architecture.md).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from memlens.arch import ArchAdapter, adapter_for
from memlens.cache import BUILDING
from memlens.errors import (
    HubUnreachable,
    InputFileError,
    InvalidArgument,
    InvalidModelFiles,
    MemlensError,
    ModelNotFound,
)
from memlens.offload import execution_device, materialised_state_dict
from memlens.tokens import Batch, encode

ORGANISM_PREFIX = "organism:"  # model references "organism:NAME" name a model organism


def organism_name(ref: str | os.PathLike) -> str | None:
    """NAME of an ``organism:NAME`` reference; None for a hub id or a directory."""
    text = str(ref)
    return text.removeprefix(ORGANISM_PREFIX) if text.startswith(ORGANISM_PREFIX) else None


def resolve_organism(ref: str | os.PathLike, *, progress: bool = False) -> Path:
    """The directory of ``organism:NAME`` (or of a bare organism name, or a directory itself):
    the shipped copy or the cache build, **built first (possibly for hours) if neither
    exists**. The one call from the core up to the organisms layer, bound late so that
    ``import memlens`` never imports the organisms (docs/architecture.md).

        resolve_organism("organism:tiny")          # ~/.cache/memlens/organisms/tiny-<key>
    """
    from memlens.organisms.registry import resolve  # the contract's one exception

    return resolve(ref, progress=progress)


def organism_file(ref: str | os.PathLike, filename: str) -> Path:
    """Path of one of an organism's data files (counterfact.json, known_facts.json,
    paragraphs.jsonl, corpus.txt, reference_texts.json, organism.json) for ``organism:NAME``
    or an organism directory, building the organism if needed."""
    path = resolve_organism(ref) / filename
    if not path.exists():
        raise MemlensError(f"{path} does not exist; is {ref!s} an organism directory?")
    return path


def _contiguous_args(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def contiguous_unembedding(model: nn.Module) -> None:
    """Give the unembedding (``lm_head``) a contiguous input; idempotent, exact.

    With ``logits_to_keep`` (the traces, the edit passes, ``generate``) transformers hands the
    unembedding a strided view of the last positions. torch 2.13's CPU bfloat16 ``linear`` on a
    strided input takes a path about 1,000× slower whose memory grows from call to call:
    GPT-2 XL's unembedding on 30 such rows took 25.8 s instead of 0.03 s, and the bfloat16 scale
    benchmark's causal trace was OOM-killed at 21.5 GiB. A copy of those few rows avoids it.
    """
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(unembed, nn.Module) and not getattr(unembed, "_memlens_contiguous", False):
        unembed.register_forward_pre_hook(_contiguous_args)
        unembed._memlens_contiguous = True


@dataclass
class ModelHandle:
    """A loaded model and everything memlens needs to know about it."""

    model: nn.Module
    tokenizer: Any
    arch: ArchAdapter
    ref: str  # what the user asked for: hub id, directory or organism:NAME
    source_dir: Path | None = None  # directory the weights came from, if local
    _fingerprint: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        contiguous_unembedding(self.model)

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def d_ff(self) -> int:
        return int(self.arch.get_edit_weight(self.model, 0).shape[1])

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first parameter's device, or with a device map the model's
        execution device (its first parameter may be offloaded, on ``meta``)."""
        return execution_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_length(self) -> int | None:
        for key in ("n_positions", "max_position_embeddings"):
            value = getattr(self.config, key, None)
            if isinstance(value, int):
                return value
        return None

    def fingerprint(self, *, refresh: bool = False) -> str:
        """A stable hash of the current weights (names, shapes, dtypes, bytes) for cache keys.

        Cached after the first call; pass ``refresh=True`` after changing weights by hand
        (memlens' own editors refresh it for you).
        """
        if self._fingerprint is None or refresh:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    def encode(self, prompts: list[str]) -> Batch:
        """Right-padded token batch of ``prompts`` on the model's device."""
        return encode(self.tokenizer, prompts, max_length=self.max_length).to(self.device)

    @torch.no_grad()
    def logits(self, prompts: list[str]) -> torch.Tensor:
        """Logits (B, T, vocab) of right-padded ``prompts``."""
        batch = self.encode(prompts)
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          use_cache=False).logits

    def info(self) -> dict[str, Any]:
        """Summary used by ``memlens info``."""
        return {
            "ref": self.ref,
            "model_type": self.arch.model_type,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "n_params": self.n_params,
            "vocab_size": int(self.config.vocab_size),
            "edit_module_template": self.arch.edit_module_template(),
            "edit_matrix_layout": "transposed (Conv1D: d_ff x d_model)"
            if self.arch.spec.mlp_out_transposed else "Linear (d_model x d_ff)",
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
        }


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, shape, dtype, raw bytes), first 16 hex."""
    digest = hashlib.sha256()
    for name, tensor in materialised_state_dict(model):  # offloaded weights from their maps
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())  # no copy
    return digest.hexdigest()[:16]


def kv_cache_of(output: Any) -> Any:
    """The KV cache an HF forward returned: ``output.cache`` (transformers ≥ 5.2x), else
    ``output.past_key_values`` (earlier 5.x)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


@functools.cache
def _cache_argument(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters \
        else "past_key_values"


def kv_cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, whichever ``model.forward`` takes,
    so that KV-cached forwards work on every transformers 5.x without deprecation warnings."""
    return {_cache_argument(type(model)): cache}


def load_model(
    ref: str,
    device: str | torch.device | Placement | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    device_map: str | os.PathLike | Mapping[str, str | int] | None = None,
    offload_folder: str | os.PathLike | None = None,
    max_memory: Mapping[str | int, str | int] | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> ModelHandle:
    """Load a causal LM by hub id, local directory or ``organism:NAME``.

    ``device``: cpu, cuda, cuda:1; None picks CUDA when present, else CPU. ``device_map``
    spreads the model with accelerate instead: ``"auto"``, ``"balanced"``, ``"sequential"``
    (over the GPUs, then CPU, then disk; ``max_memory`` caps each, e.g. ``{0: "10GiB",
    "cpu": "30GiB"}``), or a map of module names to devices (a dict, a JSON file or JSON text:
    ``{"transformer.h.0": "cpu", "transformer.h.1": "disk", ...}``, every module covered).
    Modules mapped to ``"disk"`` (and to ``"cpu"`` beside GPUs) are offloaded: loaded for each
    forward from the checkpoint (or ``offload_folder``, needed for non-safetensors weights).
    ``device="auto"`` is ``device_map="auto"``; a :class:`Placement` carries all of these (the
    CLI's --device, --device-map and --offload-folder). The map used is
    ``handle.model.hf_device_map`` (absent when everything sits on one device).

    ``dtype`` (float32, bfloat16, float16 or a torch dtype; None keeps the checkpoint's) sets
    the weights' precision; the numerics that need it stay in float32/float64 whatever it is
    (key statistics, the ROME/MEMIT solves, the v*/z optimisation). Use
    ``attn_implementation="eager"`` when attention weights are needed (sdpa returns none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    place = _placement(device, device_map, offload_folder, max_memory)
    torch_dtype = parse_dtype(dtype)
    source = _resolve_source(ref)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if place.device_map is not None:
        kwargs["device_map"] = _checked_device_map(source, place.device_map, trust_remote_code)
        if place.offload_folder is not None:
            kwargs["offload_folder"] = str(Path(place.offload_folder).expanduser())
        if place.max_memory is not None:
            kwargs["max_memory"] = dict(place.max_memory)
    from safetensors import SafetensorError

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise ModelNotFound(f"could not load model {ref!r}: {_first_line(exc)}") from None
    except (ValueError, TypeError, KeyError, AssertionError, SafetensorError) as exc:
        if place.device_map is not None and _from_device_map(exc):
            raise InvalidArgument(
                f"could not load model {ref!r} with device map {_shown(place.device_map)}: "
                f"{_first_line(exc)}") from None
        if isinstance(exc, AssertionError):
            raise
        raise InvalidModelFiles(
            f"could not load model {ref!r}: its files are incomplete or corrupt (expected a "
            f"config.json with a known model_type, a tokenizer and complete weights; "
            f"{type(exc).__name__}: {_first_line(exc)})") from None
    _reapply_extensions(model)
    if place.device_map is None:
        target = place.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(target)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    local = Path(source) if Path(source).is_dir() else None
    return ModelHandle(model=model, tokenizer=tokenizer, arch=adapter_for(model), ref=ref,
                       source_dir=local)


@dataclass(frozen=True)
class Placement:
    """Where :func:`load_model` puts a model: one ``device``, or accelerate's ``device_map``
    with ``offload_folder`` and ``max_memory``. The CLI hands its --device, --device-map and
    --offload-folder to ``load_model(ref, device=Placement(...))`` as one value."""

    device: str | torch.device | None = None
    device_map: str | os.PathLike | Mapping[str, str | int] | None = None
    offload_folder: str | os.PathLike | None = None
    max_memory: Mapping[str | int, str | int] | None = None


#: device_map strategies accelerate computes from the free memory of each device
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _placement(device: Any, device_map: Any, offload_folder: Any, max_memory: Any) -> Placement:
    """One Placement from load_model's arguments; InvalidArgument when they contradict."""
    if isinstance(device, Placement):
        if (device_map, offload_folder, max_memory) != (None, None, None):
            raise InvalidArgument("give a Placement or device_map/offload_folder/max_memory, "
                                  "not both")
        place = device
        device, device_map = place.device, place.device_map
        offload_folder, max_memory = place.offload_folder, place.max_memory
    if device == "auto":  # the older spelling of device_map="auto"
        if device_map is not None and device_map != "auto":
            raise InvalidArgument(f"device 'auto' is device_map 'auto'; it contradicts "
                                  f"device_map {_shown(device_map)}")
        device, device_map = None, "auto"
    if device_map is not None:
        if device is not None:
            raise InvalidArgument(f"give a device ({device}) or a device map "
                                  f"({_shown(device_map)}), not both: the map says where "
                                  "every module goes")
        if importlib.util.find_spec("accelerate") is None:
            raise MemlensError("device maps need accelerate: pip install accelerate")
        device_map = parse_device_map(device_map)
    elif offload_folder is not None or max_memory is not None:
        raise InvalidArgument("offload_folder (--offload-folder) and max_memory apply only with "
                              "a device map (--device-map)")
    return Placement(device, device_map, offload_folder, max_memory)


def parse_device_map(value: str | os.PathLike | Mapping[str, Any]) -> str | dict[str, Any]:
    """A device map from ``"auto" | "balanced" | "balanced_low_0" | "sequential"``, a dict,
    JSON text (``'{"": "cpu"}'``) or a JSON file of module names → devices ("cpu", "disk",
    "cuda:1", 0, ...). InvalidArgument or InputFileError (unreadable file) otherwise."""
    if isinstance(value, Mapping):
        mapping: Any = dict(value)
        origin = "device map"
    else:
        text = str(value).strip()
        if text.lower() in DEVICE_MAP_STRATEGIES:
            return text.lower()
        if text.startswith("{"):
            mapping, origin = _json(text, "device map"), "device map"
        elif text.endswith(".json") or Path(text).expanduser().exists():
            from memlens.files import read_text

            path = Path(text).expanduser()
            origin = f"device map file {str(path)!r}"
            mapping = _json(read_text(path, "device map file"), origin)
        else:
            raise InvalidArgument(
                f"unknown device map {text!r}: use {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON "
                'file mapping module names to devices, e.g. {"transformer.h.0": "cpu", '
                '"transformer.h.1": "disk"}')
    if not isinstance(mapping, dict) or not mapping:
        raise InvalidArgument(f"{origin} must be a non-empty JSON object of module name → device")
    for name, where in mapping.items():
        if not isinstance(name, str):
            raise InvalidArgument(f"{origin}: module names must be strings, not {name!r}")
        mapping[name] = _checked_device(where, f"{origin}: module {name!r}")
    return mapping


def _json(text: str, origin: str) -> Any:
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFileError(f"{origin} is not valid JSON: {exc}") from None


def _checked_device(where: Any, what: str) -> str | int:
    """A device map value: "cpu", "disk", "meta", a GPU ("cuda", "cuda:N" or N) that exists,
    or another torch device type ("mps", "xpu", ...)."""
    if isinstance(where, bool) or not isinstance(where, str | int):
        raise InvalidArgument(f"{what} maps to {where!r}; use \"cpu\", \"disk\", \"cuda:N\" or "
                              "a GPU number")
    if where in ("disk", "cpu", "meta"):
        return where
    try:
        device = torch.device(where if isinstance(where, str) else f"cuda:{where}")
    except (RuntimeError, ValueError):
        raise InvalidArgument(f"{what} maps to unknown device {where!r}; use \"cpu\", \"disk\", "
                              "\"cuda:N\" or a GPU number") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise InvalidArgument(f"{what} maps to {where!r}, but this machine has "
                                  f"{count} CUDA device(s)")
        return device.index if device.index is not None else 0
    return where


def _checked_device_map(source: str, device_map: str | dict[str, Any],
                        trust_remote_code: bool) -> str | dict[str, Any]:
    """``device_map`` after checking an explicit one against the model's modules (built on
    the meta device, no weights read): every name must be a module ("" is the whole model) and
    every parameter and buffer must fall under one of them."""
    if isinstance(device_map, str):
        return device_map
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InvalidModelFiles(f"could not read the configuration of {source!r} to check the "
                                f"device map: {_first_line(exc)}") from None
    modules = {name for name, _ in skeleton.named_modules()}
    unknown = sorted(name for name in device_map if name not in modules)
    if unknown:
        examples = ", ".join(sorted((n for n in modules if n.count(".") <= 2 and n), key=len)[:6])
        raise InvalidArgument(f"device map names module(s) the model does not have: "
                              f"{', '.join(unknown)} (its modules include {examples}, ...)")
    tensors = [n for n, _ in skeleton.named_parameters()] + \
              [n for n, _ in skeleton.named_buffers()]
    uncovered = sorted({n.rpartition(".")[0] for n in tensors
                        if not any(n.startswith(f"{m}.") or m == "" for m in device_map)})
    if uncovered:
        shown = ", ".join(uncovered[:8]) + (", ..." if len(uncovered) > 8 else "")
        raise InvalidArgument(f"device map leaves module(s) without a device: {shown}; map "
                              "them (or a parent module) too")
    return device_map


def _from_device_map(exc: BaseException) -> bool:
    """Whether a loading error comes from the device map (accelerate's dispatch, offload)."""
    import traceback

    text = str(exc).lower()
    return "device_map" in text or "offload" in text or "cuda" in text or any(
        "accelerate" in frame.filename for frame in traceback.extract_tb(exc.__traceback__))


def _shown(device_map: Any) -> str:
    text = device_map if isinstance(device_map, str) else str(device_map)
    return repr(text) if len(text) <= 80 else repr(text[:77] + "...")


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16}  # names --dtype accepts


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch floating dtype from ``"float32" | "bfloat16" | "float16"`` (or fp32/bf16/fp16,
    or a torch dtype); None stays None (the checkpoint's own dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise InvalidArgument(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return DTYPES[key]


def _reapply_extensions(model: nn.Module) -> None:
    """Re-install memlens modules recorded in the saved config (e.g. TopK activations)."""
    if getattr(model.config, "topk", None):
        from memlens.topk_mlp import apply_topk_from_config

        apply_topk_from_config(model)


def _resolve_source(ref: str) -> str:
    """Map a reference to something ``from_pretrained`` accepts, failing fast and clearly."""
    if not ref or not ref.strip():
        raise ModelNotFound("the model reference is empty: give a hub id, a directory or "
                            "organism:NAME")
    if organism_name(ref) is not None:
        return str(resolve_organism(ref, progress=True))
    path = Path(ref).expanduser()
    if path.is_dir():
        if is_partial_save(path):
            raise ModelNotFound(f"{ref!r} is the temporary folder of an unfinished save, not a "
                                "model; load the directory the save was writing to")
        if path.name.startswith(BUILDING):
            raise ModelNotFound(f"{ref!r} is the temporary folder of an unfinished or killed "
                                "organism build, not a model; load organism:NAME instead")
        if not (path / "config.json").exists():
            raise ModelNotFound(f"directory {str(path)!r} has no config.json: not a HF model")
        return str(path)
    if path.exists() or ref.startswith((".", "/", "~")):
        raise ModelNotFound(f"{ref!r} is not a model directory")
    if _in_hub_cache(ref):
        return ref
    if os.environ.get("HF_HUB_OFFLINE") or not _hub_reachable():
        raise HubUnreachable(
            f"cannot download {ref!r}: the Hugging Face hub is unreachable from here and the model "
            "is not in the local cache; pass a local directory (--model path/to/model) or a "
            "model organism (--model organism:facts-gpt2)."
        )
    return ref


PARTIAL_SAVE = re.compile(r"^\.(?P<name>.+)\.tmp-(?:(?P<pid>\d+)-)?[^.]+$")  # .NAME.tmp-PID-XXXX


def is_partial_save(path: Path) -> bool:
    """Whether ``path`` is the temporary folder of a save (finished saves are renamed to NAME;
    see :func:`memlens.edit.save.save_edited`)."""
    return PARTIAL_SAVE.match(path.name) is not None


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
