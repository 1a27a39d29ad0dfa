"""Second moments of MLP keys, C = E[k kᵀ], of many layers, in as few passes over a corpus as
memory allows.

    stats = layer_stats(handle, [3, 4, 5])            # the organism's corpus.txt by default
    C = stats[4].mom2                                 # (d_ff, d_ff) float64, uncentered
    stats[4].count                                    # number of tokens averaged

k is the input of the edited matrix W (hook ``blocks.L.mlp.hook_post``), read at every non-pad
token; each batch's Σ k kᵀ is formed in float32 (≤ batch_tokens terms), 256 rows at a time,
and added to float64 sums that keep only the upper block triangle of the symmetric result
(:class:`memlens.gram.GramSum`: half of d_ff² values). One pass sums as many layers as fit in
``max_pass_bytes`` (default 512 MiB: every layer of the organisms, three of GPT-2 XL's
170 MB, one of Llama-3-8B's 0.8 GB); more layers take more passes, each stopping at its
deepest layer. Results are cached atomically, in the same packed form, under
``$MEMLENS_HOME/stats/<model fingerprint>/<corpus>-n<samples>-len<max_len>/layer<L>.safetensors``;
when all requested C's together (d_ff² float64 each) exceed ``max_pass_bytes``, they stay
there and each is read when it is looked up (:class:`StatsFiles`), so a MEMIT band of a large
model holds one C at a time. A run checkpoints its partial sums every few batches and resumes
after an interrupt.
Under ``torchrun`` (torch.distributed initialised) each rank sums every world-size-th batch and
one all-reduce adds the ranks' sums: the result equals the single-process one.
A corpus is a text file (one sample per non-empty line), JSON/JSONL (strings or {"text": ...}),
a parquet file (its "text" column),
an organism directory (its corpus.txt), a saved ``datasets`` directory, or a HF dataset name
(``datasets`` imported only then).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import ChainMap
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memlens.cache import cache_dir
from memlens.errors import EmptyInput, MemlensError, NumericalError
from memlens.files import read_text
from memlens.gram import BLOCK, GramSum, packed_numel, symmetric_from_blocks
from memlens.offload import execution_device
from memlens.tokens import pad_id, pad_rows

DEFAULT_SAMPLES = 1000  # corpus samples (texts)
DEFAULT_MAX_LEN = 256  # tokens per sample, further capped by the model's context
DEFAULT_BATCH_TOKENS = 2048  # padded tokens per forward pass
CHECKPOINT_EVERY = 20  # batches between checkpoints of the partial sums
DEFAULT_PASS_BYTES = 1 << 29  # packed float64 sums one corpus pass holds (GPT-2 XL: 3 layers)
#: :meth:`KeyStats.meta`'s fields and their types (cache files keep them as text).
META_FIELDS = {"layer": int, "count": int, "corpus": str, "n_samples": int, "fingerprint": str,
               "d_ff": int, "trace": float}


@dataclass
class KeyStats:
    """Uncentered second moment of the keys of one layer: C = (1/N) Σ_t k_t k_tᵀ."""

    layer: int
    mom2: torch.Tensor  # C, (d_ff, d_ff) float64
    count: int  # N, tokens averaged
    corpus: str = ""  # corpus key (name + content hash)
    n_samples: int = 0  # samples requested
    fingerprint: str = ""  # model fingerprint the keys were read from
    disposable: bool = False  # mom2 was read for this lookup alone: its user may overwrite it

    def check_finite(self) -> None:
        """Raise NumericalError if C holds NaN/inf (e.g. a corrupted cache or model). Checked
        256 rows at a time: ``isfinite`` of the whole C takes another C-sized temporary."""
        if not all(bool(torch.isfinite(rows).all()) for rows in self.mom2.split(256)):
            raise NumericalError(f"key statistics of layer {self.layer} contain NaN/inf "
                                 f"(corpus {self.corpus!r}); no weights were changed")

    def meta(self) -> dict[str, Any]:
        return {"layer": self.layer, "count": self.count, "corpus": self.corpus,
                "n_samples": self.n_samples, "fingerprint": self.fingerprint,
                "d_ff": int(self.mom2.shape[0]), "trace": float(self.mom2.trace())}


# ── corpora ──────────────────────────────────────────────────────────────────


def load_corpus(handle: Any, corpus: str | Path | None, n_samples: int) -> tuple[list[str], str]:
    """The first ``n_samples`` texts of ``corpus`` and a key naming its content."""
    if corpus is None:
        if handle.source_dir is None or not (handle.source_dir / "corpus.txt").is_file():
            raise MemlensError(f"model {handle.ref!r} has no corpus.txt; pass a corpus "
                               "(--corpus FILE, a dataset directory or a HF dataset name)")
        corpus = handle.source_dir / "corpus.txt"
    path = Path(corpus).expanduser()
    if path.is_dir() and (path / "corpus.txt").is_file():
        path = path / "corpus.txt"
    if path.is_file():
        texts = _read_text_file(path, n_samples)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        key = f"{path.stem}-{digest}"
    elif path.is_dir():
        texts = _dataset_texts(str(path), n_samples, local=True)
        key = f"{path.name}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"
    else:
        texts = _dataset_texts(str(corpus), n_samples, local=False)
        key = str(corpus).replace("/", "_").replace(":", "_")
    if not texts:
        raise EmptyInput(f"corpus {str(corpus)!r} holds no text")
    return texts, key


def _read_text_file(path: Path, n_samples: int) -> list[str]:
    if path.suffix == ".parquet":  # a "text" column, read one row group at a time
        import pyarrow.parquet as pq

        texts: list[str] = []
        parquet = pq.ParquetFile(path)
        if "text" not in parquet.schema_arrow.names:
            raise MemlensError(f"corpus {path}: no 'text' column "
                               f"(columns: {parquet.schema_arrow.names})")
        for group in range(parquet.num_row_groups):
            column = parquet.read_row_group(group, columns=["text"]).column("text")
            texts += [t for t in column.to_pylist() if t and t.strip()]
            if len(texts) >= n_samples:
                break
        return texts[:n_samples]
    if path.suffix in (".json", ".jsonl"):
        try:
            if path.suffix == ".jsonl":
                records = [json.loads(x) for x in read_text(path, "corpus").splitlines()
                           if x.strip()]
            else:
                records = json.loads(read_text(path, "corpus"))
        except json.JSONDecodeError as exc:
            raise MemlensError(f"corpus {path}: invalid JSON ({exc})") from None
        if not isinstance(records, list):
            raise MemlensError(f"corpus {path}: expected a list of texts or {{'text': ...}}")
        texts = [r if isinstance(r, str) else r.get("text", "") for r in records]
    else:
        texts = read_text(path, "corpus").splitlines()
    return [t for t in texts if t.strip()][:n_samples]


def _dataset_texts(name: str, n_samples: int, *, local: bool) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise MemlensError(f"corpus {name!r} is not a file; reading Hugging Face datasets needs "
                           "`pip install datasets` (or pass a text/JSONL file)") from None
    try:
        if local:
            ds = datasets.load_from_disk(name)
            ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            repo, _, config = name.partition(":")
            ds = datasets.load_dataset(repo, config or None, split="train", streaming=True)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; report one line
        raise MemlensError(f"cannot load dataset {name!r}: {str(exc).splitlines()[0]}") from None
    texts = []
    for row in ds:
        if row.get("text", "").strip():
            texts.append(row["text"])
        if len(texts) >= n_samples:
            break
    return texts


def token_batches(tokenizer, texts: Sequence[str], max_len: int,
                  batch_tokens: int) -> list[list[list[int]]]:
    """Tokenize (truncating to ``max_len``) and group consecutive samples into batches whose
    padded size (rows × longest row) stays within ``batch_tokens``."""
    batches: list[list[list[int]]] = []
    current: list[list[int]] = []
    width = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_len]
        if not ids:
            continue
        new_width = max(width, len(ids))
        if current and new_width * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, new_width = [], len(ids)
        current.append(ids)
        width = new_width
    if current:
        batches.append(current)
    return batches


# ── the pass ─────────────────────────────────────────────────────────────────


class _StopForward(Exception):
    """Raised by the hook of the deepest requested layer: later layers need not run."""


def layer_stats(
    handle: Any,
    layers: Iterable[int],
    *,
    corpus: str | Path | None = None,
    n_samples: int = DEFAULT_SAMPLES,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    max_len: int = DEFAULT_MAX_LEN,
    progress: bool = True,
    cache: bool = True,
    checkpoint_every: int = CHECKPOINT_EVERY,
    max_pass_bytes: int = DEFAULT_PASS_BYTES,
) -> Mapping[int, KeyStats]:
    """C = E[k kᵀ] of the edited matrix's input for each of ``layers``, layer → KeyStats.

    Cached layers are loaded; the missing ones are summed as many per corpus pass as their
    packed float64 sums fit in ``max_pass_bytes``, with partial sums checkpointed every
    ``checkpoint_every`` batches (an interrupted run resumes). A dict, or, when the requested
    C's together exceed ``max_pass_bytes`` and the cache is on, a :class:`StatsFiles` that
    reads each from the cache when it is looked up.

        stats = layer_stats(handle, range(3, 9), corpus="wiki.txt", n_samples=5000)
        C_inv_k = torch.linalg.solve(stats[5].mom2, k_star.double())
    """
    layers = sorted(set(int(layer) for layer in layers))
    if not layers:
        raise EmptyInput("no layers requested")
    for layer in layers:
        handle.arch.module_name(layer, "mlp_out")  # range check with a clear message
    if n_samples < 1 or batch_tokens < 1 or max_len < 1 or max_pass_bytes < 1:
        raise MemlensError("n_samples, batch_tokens, max_len and max_pass_bytes must be "
                           "positive")
    max_len = min(max_len, handle.max_length or max_len)
    texts, corpus_key = load_corpus(handle, corpus, n_samples)
    fingerprint = handle.fingerprint()
    directory = cache_dir("stats") / fingerprint / f"{corpus_key}-n{n_samples}-len{max_len}"
    on_disk = cache and _data_parallel()[1] == 1 \
        and len(layers) * handle.d_ff ** 2 * 8 > max_pass_bytes
    held: dict[int, KeyStats] = {}
    if on_disk:
        missing = [layer for layer in layers
                   if not (directory / f"layer{layer}.safetensors").is_file()]
    else:
        for layer in layers if cache else []:
            cached = _load(directory, layer)
            if cached is not None:
                held[layer] = cached
        missing = [layer for layer in layers if layer not in held]
    per_pass = max(1, max_pass_bytes // (packed_numel(handle.d_ff) * 8))
    for start in range(0, len(missing), per_pass):
        group = missing[start:start + per_pass]
        computed = _collect(handle, group, texts, max_len, batch_tokens, progress,
                            directory if cache else None, checkpoint_every)
        for layer in group:
            gram, count = computed.pop(layer)
            gram.flat.div_(count)  # C, in place
            meta = {"layer": layer, "count": count, "corpus": corpus_key,
                    "n_samples": n_samples, "fingerprint": fingerprint, "d_ff": gram.d,
                    "trace": gram.trace()}
            if not gram.is_finite():
                raise NumericalError(f"key statistics of layer {layer} contain NaN/inf "
                                     f"(corpus {corpus_key!r}); no weights were changed")
            if cache and _data_parallel()[0] == 0:  # under torchrun rank 0 writes the cache
                _save(directory, gram, meta)
            if not on_disk:
                held[layer] = KeyStats(layer, gram.full(), count, corpus_key, n_samples,
                                       fingerprint)
            del gram
    if on_disk:
        return StatsFiles(directory, layers)
    for stats in held.values():
        stats.check_finite()
    return dict(sorted(held.items()))


class StatsFiles(Mapping[int, KeyStats]):
    """Cached key statistics of several layers, each read from its file when it is looked up
    and not kept: ``stats[layer]`` is a fresh, checked :class:`KeyStats` (``disposable``)."""

    def __init__(self, directory: Path, layers: Sequence[int]):
        self.directory, self.layers = directory, sorted(layers)

    def __getitem__(self, layer: int) -> KeyStats:
        if layer not in self.layers:
            raise KeyError(layer)
        stats = _load(self.directory, layer)
        if stats is None:
            raise MemlensError(f"the cached key statistics of layer {layer} are gone from "
                               f"{self.directory}; compute them again")
        stats.check_finite()
        stats.disposable = True
        return stats

    def __contains__(self, layer: object) -> bool:  # Mapping's would read C
        return layer in self.layers

    def __iter__(self) -> Iterator[int]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def meta(self, layer: int) -> dict[str, Any]:
        """:meth:`KeyStats.meta` of ``layer`` from its file's header, without reading C."""
        from safetensors import safe_open

        if layer not in self.layers:
            raise KeyError(layer)
        with safe_open(str(self.directory / f"layer{layer}.safetensors"), framework="pt") as f:
            header = f.metadata()
        return {key: kind(header[key]) for key, kind in META_FIELDS.items()}


def stats_meta(stats: Mapping[int, KeyStats]) -> dict[str, dict[str, Any]]:
    """layer → :meth:`KeyStats.meta` of every layer of ``stats`` (a dict, a
    :class:`StatsFiles`, or a ChainMap of them), reading no C from a StatsFiles."""
    maps = stats.maps if isinstance(stats, ChainMap) else [stats]
    out = {}
    for layer in sorted(stats):
        source = next(m for m in maps if layer in m)
        out[str(layer)] = source.meta(layer) if isinstance(source, StatsFiles) \
            else source[layer].meta()
    return out


def _collect(handle: Any, layers: list[int], texts: list[str], max_len: int,
             batch_tokens: int, progress: bool, directory: Path | None,
             checkpoint_every: int) -> dict[int, tuple[GramSum, int]]:
    """Run the corpus once with a key-reading hook on every layer of ``layers``; return
    (Σ k kᵀ, N) per layer."""
    from memlens import hooks

    model, arch, tok = handle.model, handle.arch, handle.tokenizer
    batches = token_batches(tok, texts, max_len, batch_tokens)
    pad = pad_id(tok)
    names = {layer: arch.module_name(layer, "mlp_out") for layer in layers}
    devices = {layer: execution_device(model.get_submodule(name), model, name)
               for layer, name in names.items()}  # where it computes (offloaded: on meta)
    d_ff = handle.d_ff
    sums = {layer: GramSum(d_ff, device=devices[layer]) for layer in layers}
    count, start = 0, 0
    rank, world = _data_parallel()
    shard = f"-rank{rank}of{world}" if world > 1 else ""
    partial = directory / f"partial-L{'-'.join(map(str, layers))}{shard}.pt" if directory \
        else None
    if partial is not None and partial.is_file():
        saved = torch.load(partial, weights_only=True, map_location="cpu")
        if saved["n_batches"] == len(batches) and saved.get("block") == BLOCK:
            sums = {layer: GramSum(d_ff, flat=saved["sums"][layer].to(devices[layer]))
                    for layer in layers}
            count, start = int(saved["count"]), int(saved["done"])

    mask_flat: dict[str, torch.Tensor] = {}
    deepest = layers[-1]

    def reader(layer: int):
        def read(k: torch.Tensor) -> None:  # k: (B, T, d_ff)
            keys = k.reshape(-1, k.shape[-1])[mask_flat["m"].to(k.device)].float()
            sums[layer].add(keys)  # Σ k kᵀ: float32 per batch, float64 total
            if layer == deepest:
                raise _StopForward

        return read

    bar = _progress(progress and rank == 0, f"key statistics, layers {_ranges(layers)}",
                    len(batches), start)
    try:
        with torch.no_grad(), hooks.hooked(model, {f"blocks.{layer}.mlp.hook_post": reader(layer)
                                                   for layer in layers}):
            for index in range(start, len(batches)):
                if index % world != rank:  # under torchrun each rank sums its own shard
                    continue
                ids, mask = pad_rows(batches[index], pad)
                mask_flat["m"] = mask.reshape(-1).bool()
                try:
                    model(input_ids=ids.to(handle.device), attention_mask=mask.to(handle.device),
                          use_cache=False)
                except _StopForward:
                    pass
                count += int(mask.sum())
                if bar is not None:
                    bar.advance()
                if partial is not None and (index + 1) % checkpoint_every == 0 \
                        and index + 1 < len(batches):
                    _atomic_torch_save(partial, {"sums": {k: s.flat.cpu()
                                                          for k, s in sums.items()},
                                                 "block": BLOCK, "count": count,
                                                 "done": index + 1, "n_batches": len(batches)})
    finally:
        if bar is not None:
            bar.close()
    if world > 1:
        sums, count = _all_reduce(sums, count, layers)
    if count == 0:
        raise EmptyInput("the corpus produced no tokens")
    if partial is not None:
        partial.unlink(missing_ok=True)
    return {layer: (sums[layer], count) for layer in layers}


def _data_parallel() -> tuple[int, int]:
    """(rank, world size) when torch.distributed is initialised (torchrun), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(sums: dict[int, GramSum], count: int, layers: list[int]
                ) -> tuple[dict[int, GramSum], int]:
    """Σ over ranks of every layer's float64 sums and the token count: ONE all-reduce of one
    flat buffer (on the first sum's device: CPU under gloo, the GPU under nccl)."""
    import torch.distributed as dist

    device = sums[layers[0]].flat.device
    flat = torch.cat([sums[layer].flat.to(device) for layer in layers]
                     + [torch.tensor([float(count)], dtype=torch.float64, device=device)])
    dist.all_reduce(flat)
    out, offset = {}, 0
    for layer in layers:
        gram = sums[layer]
        n = gram.flat.numel()
        out[layer] = GramSum(gram.d, flat=flat[offset:offset + n].to(gram.flat.device))
        offset += n
    return out, int(round(float(flat[-1])))


class ProgressBar:
    """A rich progress bar over batches (no-op wrapper so callers stay simple)."""

    def __init__(self, title: str, total: int, done: int):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
        self._task = self._progress.add_task(title, total=total, completed=done)
        self._progress.start()

    def advance(self) -> None:
        self._progress.advance(self._task)

    def close(self) -> None:
        self._progress.stop()


def _progress(enabled: bool, title: str, total: int, done: int) -> ProgressBar | None:
    return ProgressBar(title, total, done) if enabled else None


def _ranges(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) \
        else ",".join(map(str, layers))


MAX_LAYERS = 10_000  # more than any model has: bounds the ranges parse_layers expands


def parse_layers(spec: str) -> list[int]:
    """"3-8" → [3..8]; "2,5,7" → [2, 5, 7]; "4" → [4]."""
    layers: list[int] = []
    try:
        for part in spec.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                if int(hi) - int(lo) > MAX_LAYERS:
                    raise MemlensError(f"layer range {part!r} spans more layers than any model "
                                       f"has (at most {MAX_LAYERS})")
                layers.extend(range(int(lo), int(hi) + 1))
            elif part.strip():
                layers.append(int(part))
    except ValueError:
        raise MemlensError(f"cannot parse layers {spec!r}; use e.g. 3-8 or 2,5,7") from None
    if not layers:
        raise MemlensError(f"no layers in {spec!r}")
    return sorted(set(layers))


# ── cache files (atomic) ─────────────────────────────────────────────────────


def _atomic_torch_save(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _save(directory: Path, gram: GramSum, meta: dict[str, Any]) -> None:
    """Write C of ``meta["layer"]`` packed (``mom2_upper``: the flat upper block triangle)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"layer{meta['layer']}.safetensors"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({"mom2_upper": gram.flat.cpu()}, tmp,
                  metadata={k: str(v) for k, v in {**meta, "block": gram.block}.items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(directory: Path, layer: int) -> KeyStats | None:
    """The cached C of ``layer``, unpacked one row block at a time (cache files written before
    the packed layout hold the full ``mom2`` and are read as they are)."""
    from safetensors import safe_open

    path = directory / f"layer{layer}.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        if "mom2" in f.keys():
            mom2 = f.get_tensor("mom2")
        else:
            packed = f.get_slice("mom2_upper")
            mom2 = symmetric_from_blocks(int(meta["d_ff"]), int(meta["block"]),
                                         lambda offset, size: packed[offset:offset + size])
    return KeyStats(layer, mom2, int(meta["count"]), meta["corpus"], int(meta["n_samples"]),
                    meta["fingerprint"])
