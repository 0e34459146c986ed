"""loramgr.filechecks: one set of checks (and messages) for adapters, bases and ControlNets alike."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loramgr.errors import BadFileError
from loramgr.filechecks import load_safetensors, safetensors_shapes
from loramgr.formats.files import load_weight_file
from loramgr.models.loading import check_weights_file


def _good(path: Path) -> Path:
    save_file({"a.weight": torch.arange(1000, dtype=torch.float32), "b.weight": torch.ones(3, 4, dtype=torch.float16)},
              path, metadata={"ss_network_dim": "4"})
    return path


def _cut(path: Path, size: int) -> Path:
    data = _good(path).read_bytes()
    path.write_bytes(data[:size])
    return path


CASES = {  # name: (writer, reason pattern)
    "lfs pointer": (
        lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123abcd\nsize 4265146304\n"),
        r"is a Git LFS pointer \(79 bytes\) instead of the weights of the real 4,265,146,304-byte file; "
        r"run `git lfs pull`"),
    "lfs pointer without size": (
        lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\n"),
        r"is a Git LFS pointer \(43 bytes\) instead of the weights; run `git lfs pull`"),
    "empty": (lambda p: p.write_bytes(b""), r"empty file \(0 bytes\)"),
    "truncated data": (
        lambda p: _cut(p, -100),
        r"truncated: its header describes ([\d,]+) bytes but the file has ([\d,]+) \(truncated safetensors file: "
        r"its tensors need 100 bytes more\); the download was cut short"),
    "truncated header": (
        lambda p: _cut(p, 20),
        r"truncated: the file ends inside its [\d,]+-byte header after 20 bytes \(truncated or not a safetensors file\)"),
    "corrupt header": (
        lambda p: p.write_bytes((10).to_bytes(8, "little") + b'{"a": "b"}'), r"corrupt safetensors header \(invalid JSON"),
    "trailing bytes": (
        lambda p: p.write_bytes(_good(p).read_bytes() + b"\0" * 7), r"corrupt safetensors file \(incomplete metadata"),
}


@pytest.mark.parametrize("case", CASES)
def test_adapters_and_checkpoints_get_the_same_message(case, tmp_path):
    writer, reason = CASES[case]
    path = tmp_path / "weights.safetensors"
    writer(path)
    messages = []
    for read in (load_weight_file, lambda p: check_weights_file(p, (".safetensors",), "a .safetensors file"),
                 safetensors_shapes):
        with pytest.raises(BadFileError) as error:
            read(path)
        messages.append(str(error.value))
    assert messages[0] == messages[1] == messages[2]
    assert messages[0].startswith(f"{path}: ") and "\n" not in messages[0]
    assert re.search(reason, messages[0]), messages[0]


def test_truncated_data_message_counts_the_bytes(tmp_path):
    path = _cut(tmp_path / "w.safetensors", -100)
    size = path.stat().st_size
    with pytest.raises(BadFileError, match=rf"describes {size + 100:,} bytes but the file has {size:,} "):
        load_weight_file(path)


def test_not_safetensors_by_suffix_only(tmp_path):
    path = tmp_path / "page.safetensors"
    path.write_text("<!DOCTYPE html><html>login</html>")
    with pytest.raises(BadFileError, match=r"not a safetensors file \(it starts with b'<!DOCTYPE"):
        check_weights_file(path, (".safetensors",), "a .safetensors file")


def test_good_file_header_and_tensors(tmp_path):
    path = _good(tmp_path / "w.safetensors")
    assert safetensors_shapes(path) == {"a.weight": (1000,), "b.weight": (3, 4)}
    tensors, metadata = load_safetensors(path)
    assert metadata == {"ss_network_dim": "4"}
    assert torch.equal(tensors["a.weight"], torch.arange(1000, dtype=torch.float32))
    assert tensors["b.weight"].dtype == torch.float16
    check_weights_file(path, (".safetensors",), "a .safetensors file")
    assert load_weight_file(path).metadata == metadata
