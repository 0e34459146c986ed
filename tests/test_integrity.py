"""Issue 13 item 5: corrupt data is detected, not rendered.

Every case damages a private copy of the tiny base (never the session's
``tiny_workspace``) and checks: CLI exit 2 with one ``error:`` line naming the file and
the fix, nothing rendered; the Python API raises :class:`BadFileError`. A damaged
``.ort`` cache is rebuilt instead. docs/base-layout.md and docs/lora-format.md describe
the checks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx
import pytest

import loramgr.integrity as integrity
from loramgr.adapter_file import CHECKSUM_KEY, load_adapter
from loramgr.adapters import AdapterSet
from loramgr.backends.onnxruntime import OrtRunner
from loramgr.bases import VERIFIED_CACHE, OpenBase
from loramgr.convert import convert_adapter
from loramgr.errors import BadFileError
from loramgr.manifest import GRAPHS, TEXT_ENCODER, UNET, VAE_DECODER, Manifest
from loramgr.samples import write_kohya_lora
from loramgr.workspace import Workspace

from cli_support import cli, one_error_line, run_args


@pytest.fixture(scope="module")
def source_lora(tiny_workspace, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "good.safetensors"
    write_kohya_lora(path, Manifest.load(tiny_workspace.base_dir("tiny")).param_shapes(), seed=7)
    return path


@pytest.fixture
def ws(tiny_workspace, source_lora, tmp_path) -> Workspace:
    """A private workspace: a copy of the tiny base (safe to damage) and one adapter, ``good``."""
    ws = Workspace.resolve(tmp_path / "ws")
    shutil.copytree(tiny_workspace.base_dir("tiny"), ws.base_dir("tiny"))
    convert_adapter(ws, source_lora, name="good")
    return ws


@pytest.fixture
def hashes(monkeypatch) -> list[Path]:
    """Every file hashed by the base check, in order."""
    calls: list[Path] = []
    real = integrity.sha256_with_progress

    def counting(path, on_progress=None):
        calls.append(Path(path))
        return real(path, on_progress)

    monkeypatch.setattr(integrity, "sha256_with_progress", counting)
    return calls


def graph_file(ws: Workspace, graph: str, kind: str) -> Path:
    info = Manifest.load(ws.base_dir("tiny")).graphs[graph]
    return ws.base_dir("tiny") / (info.data if kind == "data" else info.path)


def flip(path: Path, offset: int, count: int) -> None:
    """Invert ``count`` bytes of ``path`` from ``offset``, in place (size unchanged)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        block = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in block))


def assert_refused(ws: Workspace, image: Path, tmp_path: Path, capsys, path: Path, *needles: str) -> None:
    """``run`` and ``bake`` exit 2 with one line naming ``path``; nothing is rendered or written."""
    out = tmp_path / "out"
    assert cli(ws, *run_args(image, out, "--lora", "good")) == 2
    one_error_line(capsys, str(path), *needles)
    assert not out.exists() or not any(out.iterdir())
    baked = tmp_path / "baked.lora"
    assert cli(ws, "bake", "--lora", "good", "-o", str(baked), "-o", f"text_encoder={tmp_path / 'te.lora'}") == 2
    one_error_line(capsys, str(path), *needles)
    assert not baked.exists()
    with pytest.raises(BadFileError) as caught:
        OpenBase.resolve(ws, "tiny")
    assert caught.value.path == path


def test_a_good_base_runs(ws, input_png, tmp_path, capsys):
    """The control for every case below: the same commands on the undamaged copy succeed."""
    assert cli(ws, *run_args(input_png, tmp_path / "out", "--lora", "good")) == 0
    assert len(list((tmp_path / "out").glob("*-0.png"))) == 1
    assert cli(ws, "bake", "--lora", "good", "-o", str(tmp_path / "baked.lora"),
               "-o", f"text_encoder={tmp_path / 'te.lora'}") == 0
    assert load_adapter(tmp_path / "baked.lora").kind == "baked"


def test_flipped_bits_in_a_data_file_are_refused_even_after_a_checked_open(ws, input_png, tmp_path, capsys):
    OpenBase.resolve(ws, "tiny")  # hashed and remembered: the damage comes after
    data = graph_file(ws, UNET, "data")
    flip(data, data.stat().st_size // 2, 3)
    assert_refused(ws, input_png, tmp_path, capsys, data, "content changed", "re-export base 'tiny'")


def test_a_truncated_data_file_is_refused(ws, input_png, tmp_path, capsys):
    data = graph_file(ws, TEXT_ENCODER, "data")
    size = data.stat().st_size
    os.truncate(data, size - 1000)
    assert_refused(ws, input_png, tmp_path, capsys, data, f"is {size - 1000:,} bytes, {size:,} were written",
                   "truncated", "re-export")


def test_a_missing_graph_file_is_refused(ws, input_png, tmp_path, capsys):
    model = graph_file(ws, VAE_DECODER, "model")
    model.unlink()
    assert_refused(ws, input_png, tmp_path, capsys, model, "missing", "re-export")


def test_a_manifest_without_recorded_sizes_still_refuses_a_truncated_file(ws):
    """Bases exported before sizes were recorded: the end of the last tensor is the lower bound."""
    path = ws.base_dir("tiny") / "manifest.json"
    raw = json.loads(path.read_text())
    for graph in raw["graphs"].values():
        for key in ("data_size", "model_size", "model_sha256"):
            del graph[key]
    path.write_text(json.dumps(raw))
    OpenBase.resolve(ws, "tiny")
    data = graph_file(ws, UNET, "data")
    os.truncate(data, data.stat().st_size - 4)
    with pytest.raises(BadFileError, match=r"its tensors need [\d,]+ \(truncated file\): re-export") as caught:
        OpenBase.resolve(ws, "tiny")
    assert caught.value.path == data


def test_an_unchanged_base_is_hashed_once(ws, hashes):
    folder = ws.base_dir("tiny")
    everything = {folder / p for g in Manifest.load(folder).graphs.values() for p in (g.path, g.data)}
    assert len(everything) == 2 * len(GRAPHS)
    (folder / VERIFIED_CACHE).unlink(missing_ok=True)  # the copy may carry the fixture's cache
    OpenBase.resolve(ws, "tiny")
    assert set(hashes) == everything and len(hashes) == len(everything)
    cache = json.loads((folder / VERIFIED_CACHE).read_text())
    data = graph_file(ws, UNET, "data")
    entry = cache[data.relative_to(folder).as_posix()]
    assert entry["size"] == data.stat().st_size and entry["inode"] == data.stat().st_ino
    assert entry["sha256"] == Manifest.load(folder).graphs[UNET].data_sha256
    hashes.clear()
    OpenBase.resolve(ws, "tiny")
    assert hashes == []
    # a write (here only a new mtime) means a new hash of that file only
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 1))
    OpenBase.resolve(ws, "tiny")
    assert hashes == [data]
    # a damaged cache only costs a re-hash
    hashes.clear()
    (folder / VERIFIED_CACHE).write_bytes(b"\x00{not json")
    OpenBase.resolve(ws, "tiny")
    assert len(hashes) == len(everything)
    hashes.clear()
    OpenBase.resolve(ws, "tiny")
    assert hashes == []


def test_a_copied_base_is_hashed_again(ws, tmp_path, hashes):
    """The cache travels with a copy, but the copy's inodes differ: its files are checked again."""
    OpenBase.resolve(ws, "tiny")
    hashes.clear()
    copy = tmp_path / "copy" / "tiny"
    shutil.copytree(ws.base_dir("tiny"), copy)
    OpenBase.open(copy)
    assert len(hashes) == 2 * len(GRAPHS)


def test_64_flipped_bytes_in_a_lora_are_refused(ws, input_png, tmp_path, capsys):
    """Flipped inside the largest tensor's bytes, so the file still parses: only the checksum sees it."""
    path = ws.adapter_path("good")
    assert CHECKSUM_KEY in load_adapter(path).metadata
    largest = max(onnx.load(str(path)).graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    assert len(largest) > 256
    start = path.read_bytes().find(largest)
    flip(path, start + len(largest) // 2, 64)
    with pytest.raises(BadFileError, match="content changed since it was written") as caught:
        load_adapter(path)
    assert caught.value.path == path
    out = tmp_path / "out"
    assert cli(ws, *run_args(input_png, out, "--lora", "good")) == 2
    one_error_line(capsys, str(path), "content changed", "convert its source again")
    assert not out.exists() or not any(out.iterdir())
    assert cli(ws, "verify", "good", "--checks", "tensors") == 2
    one_error_line(capsys, str(path), "content changed")


def test_a_lora_with_edited_metadata_is_refused(ws):
    path = ws.adapter_path("good")
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == "loramgr.default_weight":
            prop.value = "7.0"
    onnx.save(model, str(path))
    with pytest.raises(BadFileError, match="content changed since it was written"):
        load_adapter(path)


def test_a_lora_written_before_checksums_is_read_unchecked(ws):
    """Documented in docs/lora-format.md: such a file loads; converting it again adds the checksum."""
    path = ws.adapter_path("good")
    checked = load_adapter(path)
    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key != CHECKSUM_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(path))
    old = load_adapter(path)
    assert CHECKSUM_KEY not in old.metadata
    assert old.targets.keys() == checked.targets.keys()
    for name, target in checked.targets.items():
        for factor, array in target.tensors.items():
            assert (old.targets[name].tensors[factor] == array).all()


@pytest.mark.parametrize("damage", [b"", b"\x00\xff not json", b'["only", "names"]',
                                    b'{"kept": ["x"], "sha256": "0"}'])
def test_a_damaged_ort_cache_file_is_rebuilt(ws, damage):
    base = OpenBase.resolve(ws, "tiny")
    adapters = AdapterSet(((load_adapter(ws.adapter_path("good")), 1.0),))
    shutil.rmtree(base.dir / ".ort", ignore_errors=True)  # only the files this runner writes
    OrtRunner.open(base, adapters).close()
    files = sorted((base.dir / ".ort").glob("*.json"))
    assert files, "hot swap on CPU writes the .ort cache"
    good = {f: f.read_bytes() for f in files}
    assert all(set(json.loads(text)) == {"kept", "sha256"} for text in good.values())
    for f in files:
        f.write_bytes(damage)
    OrtRunner.open(base, adapters).close()
    assert {f: f.read_bytes() for f in files} == good
