"""The workspace's adapters as the service sees them: listing, cached loading, uploads.

Files are read again only when their size or modification time changes, so adapters
dropped into ``adapters/`` (or converted by ``loramgr convert`` while the server runs)
are picked up by the next request without a restart. Loaded adapters are kept in an LRU
bounded in bytes, so a request does not re-read a 1.4 GB ControlNet.

Uploads go through :func:`loramgr.convert.convert_adapter`, the call behind
``loramgr convert``, so they get exactly the CLI's checks; safetensors bytes are accepted,
and pickles (``.pt``/``.bin``) only as textual-inversion embeddings, read by torch's
``weights_only`` loader, which refuses any pickle that needs code. The source is written to
a private temporary folder that is removed afterwards, so a refused file leaves nothing behind;
a folder left by a killed process (its pid is in the name) is removed when the next server starts.

A damaged ``.lora`` never breaks a listing: it is left out of ``adapters`` and named, with
the reason, in ``problems`` (as ``loramgr list`` does).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..adapter_file import AdapterFile, embedding_index, load_adapter, parse_targets, read_metadata
from ..errors import LoramgrError, finite32, parse_weight
from ..filechecks import looks_like_safetensors
from ..manifest import Manifest
from ..workspace import Workspace, check_name, sha256_file
from .config import MAX_LORA_WEIGHT

logger = logging.getLogger("loramgr.serve")

UPLOAD_PREFIX = "loramgr-upload-"  # + pid + "-": the temporary folder of one upload


PICKLED_EMBEDDINGS = (".pt", ".bin")  # A1111 and diffusers textual-inversion files


class CatalogError(Exception):
    """A request-level problem with an adapter: HTTP ``status``, the request ``field`` and the reason."""

    def __init__(self, status: int, field: str | None, reason: str):
        super().__init__(reason)
        self.status, self.field, self.reason = status, field, reason


@dataclass(frozen=True)
class _Stamp:
    size: int
    mtime_ns: int


@dataclass
class _Entry:
    stamp: _Stamp
    metadata: dict[str, str]
    sha256: str


class AdapterCatalog:
    """Adapters of ``workspace`` for the base described by ``manifest``."""

    def __init__(self, workspace: Workspace, manifest: Manifest, cache_bytes: int = 3 << 30):
        self.workspace = workspace
        self.manifest = manifest
        self.cache_bytes = cache_bytes
        self._entries: dict[str, _Entry] = {}
        self._loaded: OrderedDict[str, tuple[_Stamp, AdapterFile, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._upload_lock = threading.Lock()

    # -- reading --------------------------------------------------------------------------

    def names(self) -> list[str]:
        return self.workspace.adapter_names()

    def _stamp(self, path: Path) -> _Stamp:
        st = path.stat()
        return _Stamp(st.st_size, st.st_mtime_ns)

    def entry(self, name: str, field: str | None = None) -> _Entry:
        """Metadata and sha256 of adapter ``name``; a :class:`CatalogError` (422) when unknown or bad."""
        try:
            path = self.workspace.adapter_path(name)
        except LoramgrError as exc:
            raise CatalogError(422, field, str(exc)) from None
        if not path.is_file():
            available = ", ".join(self.names()) or "none"
            raise CatalogError(422, field, f"unknown adapter {name!r} (adapters: {available})")
        stamp = self._stamp(path)
        with self._lock:
            cached = self._entries.get(name)
        if cached is not None and cached.stamp == stamp:
            return cached
        try:
            metadata = read_metadata(path)
        except LoramgrError as exc:
            raise CatalogError(422, field, f"adapter {name!r} cannot be read: {exc}") from None
        entry = _Entry(stamp, metadata, sha256_file(path))
        with self._lock:
            self._entries[name] = entry
        return entry

    def kind(self, name: str, field: str | None = None) -> str:
        return self.entry(name, field).metadata.get("loramgr.kind", "")

    def fits(self, name: str) -> bool:
        """Converted for this base; an embedding only needs the base's text width (docs/lora-format.md)."""
        entry = self.entry(name)
        if entry.metadata.get("loramgr.kind") == "embedding":
            width = self.manifest.configs["text_encoder"]["hidden_size"]
            return all(e["dim"] == width for e in self.embeddings(name).values())
        return entry.metadata.get("loramgr.base_fingerprint") == self.manifest.fingerprint

    def embeddings(self, name: str) -> dict[str, dict]:
        """Trigger -> ``{vectors, dim}`` (and A1111's step, sd_checkpoint, sd_checkpoint_name for a
        file of kind ``embedding``) of the textual-inversion embeddings adapter ``name`` holds."""
        try:
            return embedding_index(self.workspace.adapter_path(name), self.entry(name).metadata)
        except LoramgrError as exc:
            raise CatalogError(422, None, f"adapter {name!r} cannot be read: {exc}") from None

    def info(self, name: str) -> dict:
        """What the listings show of adapter ``name``; a :class:`CatalogError` when its metadata is damaged."""
        entry = self.entry(name)
        meta = entry.metadata
        try:
            default_weight = parse_weight(meta.get("loramgr.default_weight", "1.0"), "loramgr.default_weight")
            return {
                "name": name, "kind": meta.get("loramgr.kind", ""),
                "rank": _json_list(meta, "loramgr.ranks", int),
                "trigger_words": _json_list(meta, "loramgr.trigger_words", str),
                "default_weight": default_weight,
                "base": meta.get("loramgr.base_name", ""), "fits": self.fits(name), "sha256": entry.sha256,
                "size_bytes": entry.stamp.size, "format": meta.get("loramgr.source_format", ""),
                "embeddings": self.embeddings(name),
            }
        except LoramgrError as exc:
            raise CatalogError(422, None, f"adapter {name!r}: damaged metadata ({exc})") from None

    def listing(self) -> dict[str, list[dict]]:
        """``adapters``: every readable adapter; ``problems``: ``{name, reason}`` of each one that is not."""
        adapters, problems = [], []
        for name in self.names():
            try:
                adapters.append(self.info(name))
            except (CatalogError, OSError) as exc:  # damaged, unreadable, or being replaced: named, not listed
                reason = exc.reason if isinstance(exc, CatalogError) else f"{type(exc).__name__}: {exc}"
                problems.append({"name": name, "reason": reason})
        return {"adapters": adapters, "problems": problems}

    def list(self) -> list[dict]:
        """The readable adapters (:meth:`listing` without the problems)."""
        return self.listing()["adapters"]

    def touched(self, name: str) -> dict[str, set[str]]:
        """Graph -> initializer names the adapter changes, from its metadata (no tensors read)."""
        path = self.workspace.adapter_path(name)
        try:
            targets = parse_targets(path, self.entry(name).metadata)
        except LoramgrError as exc:
            raise CatalogError(422, None, str(exc).replace(str(path), name)) from None
        touched: dict[str, set[str]] = {}
        for initializer, target in targets.items():
            touched.setdefault(target["graph"], set()).add(initializer)
        return touched

    def buffer_bytes(self, touched: dict[str, set[str]]) -> int:
        """Bytes the base tensors named in ``touched`` take as swappable buffers."""
        total = 0
        for graph, names in touched.items():
            by_init = self.manifest.graphs[graph].by_initializer()
            weights = self.manifest.graphs[graph].weights
            for initializer in names:
                entry = weights[by_init[initializer]]
                total += math.prod(entry.shape) * np.dtype(entry.dtype).itemsize
        return total

    def load(self, name: str, field: str | None = None) -> tuple[AdapterFile, str]:
        """The adapter's tensors (cached while the file is unchanged) and its sha256."""
        entry = self.entry(name, field)
        with self._lock:
            cached = self._loaded.get(name)
            if cached is not None and cached[0] == entry.stamp:
                self._loaded.move_to_end(name)
                return cached[1], entry.sha256
        try:
            adapter = load_adapter(self.workspace.adapter_path(name))
        except LoramgrError as exc:
            raise CatalogError(422, field, f"adapter {name!r} cannot be read: {exc}") from None
        size = sum(a.nbytes for t in adapter.targets.values() for a in t.tensors.values())
        with self._lock:
            self._loaded[name] = (entry.stamp, adapter, size)
            while len(self._loaded) > 1 and sum(s for _, _, s in self._loaded.values()) > self.cache_bytes:
                self._loaded.popitem(last=False)
        return adapter, entry.sha256

    # -- uploads ----------------------------------------------------------------------------

    def upload(self, stream, filename: str, *, name: str | None, kind: str | None, strict: bool,
               default_weight: float, overwrite: bool, max_bytes: int) -> dict:
        """Convert an uploaded ``.safetensors`` (or an embedding's ``.pt``/``.bin``) into
        ``adapters/NAME.lora`` with the CLI's checks.

        ``stream`` is a binary file object. Raises :class:`CatalogError` (413 too large,
        409 name taken, 422 bad name or file, with the CLI's one-line reason); on any
        error nothing is written to the workspace.
        """
        from ..convert import convert_adapter

        source_name = Path(filename or "upload.safetensors").name
        suffix = Path(source_name).suffix
        if suffix not in (".safetensors", *PICKLED_EMBEDDINGS):
            raise CatalogError(422, "file", f"{source_name!r}: only .safetensors uploads are accepted, and .pt/.bin "
                                            "for textual-inversion embeddings (.pth/.ckpt pickles are never opened)")
        if suffix in PICKLED_EMBEDDINGS:
            if kind not in (None, "embedding"):
                raise CatalogError(422, "kind", f"{source_name!r}: a pickled upload can only be an embedding, "
                                                f"not kind {kind!r}")
            kind = "embedding"
        stem = source_name[: -len(suffix)]
        name = name or stem
        try:
            check_name(name, "adapter")
        except LoramgrError as exc:
            raise CatalogError(422, "name" if name != stem else "file", str(exc)) from None
        if kind not in (None, "lora", "controlnet", "embedding"):
            raise CatalogError(422, "kind", f"kind {kind!r}: choose lora, controlnet or embedding")
        if not finite32(default_weight) or abs(default_weight) > MAX_LORA_WEIGHT:
            raise CatalogError(422, "default_weight", f"must be a finite number in [{-MAX_LORA_WEIGHT:g}, "
                                                      f"{MAX_LORA_WEIGHT:g}], got {default_weight:g}")
        tmp = Path(tempfile.mkdtemp(prefix=f"{UPLOAD_PREFIX}{os.getpid()}-"))
        try:
            # the file keeps its uploaded name: convert records it as the source
            source = tmp / (stem if check_name_ok(stem) else "upload")
            source = source.with_name(source.name + suffix)
            written = 0
            with source.open("wb") as out:
                while chunk := stream.read(1 << 20):
                    written += len(chunk)
                    if written > max_bytes:
                        raise CatalogError(413, "file", f"upload larger than the limit of {max_bytes:,} bytes "
                                                        "(loramgr serve --max-upload-mb)")
                    out.write(chunk)
            with source.open("rb") as f:
                head = f.read(16)
            if suffix == ".safetensors" and not looks_like_safetensors(head):
                raise CatalogError(422, "file", f"{source_name}: not a safetensors file "
                                                f"(it starts with {head[:16]!r}); only safetensors bytes are read")
            with self._upload_lock:  # the existence check and the write are one step
                target = self.workspace.adapter_path(name)
                replaced = target.exists()
                if replaced and not overwrite:
                    raise CatalogError(409, "name", f"adapter {name!r} already exists; send overwrite=true to replace it")
                try:
                    report = convert_adapter(self.workspace, source, base=self.manifest.name, name=name, kind=kind,
                                             strict=strict, default_weight=default_weight)
                except LoramgrError as exc:
                    reason = str(exc).replace(str(source), source_name)
                    raise CatalogError(422, "file", reason) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        info = self.info(name)
        return {"name": name, "kind": report.kind, "format": report.format, "base": report.base,
                "rank": report.ranks, "trigger_words": report.trigger_words, "keys_used": report.keys_used,
                "keys_total": report.keys_total, "unknown_keys": report.unknown_keys[:50],
                "size_bytes": report.size_bytes, "sha256": info["sha256"], "replaced": replaced,
                "embeddings": report.embeddings}


def remove_stale_uploads(folder: Path | None = None) -> list[Path]:
    """Remove the upload folders of processes that are gone (killed mid-upload); returns them.

    Only folders named with a pid that no longer runs: another live server's upload is left alone.
    """
    removed = []
    for entry in Path(folder or tempfile.gettempdir()).glob(f"{UPLOAD_PREFIX}*"):
        pid = entry.name[len(UPLOAD_PREFIX):].partition("-")[0]
        if entry.is_dir() and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    if removed:
        logger.info("removed %d upload folder(s) left by killed servers: %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _json_list(metadata: dict[str, str], key: str, kind: type) -> list:
    """A metadata field that is a JSON list of ``kind`` (a :class:`LoramgrError` naming it otherwise)."""
    try:
        value = json.loads(metadata.get(key, "[]"))
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise LoramgrError(f"metadata {key} is not a JSON list of {kind.__name__}")
    return value


def check_name_ok(name: str) -> bool:
    try:
        check_name(name, "adapter")
        return True
    except LoramgrError:
        return False
