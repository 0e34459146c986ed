"""Issue 13 items 4, 6-11: every bad input is refused with one line and exit code 2, before it does harm.

Each case checks the exit code, that stderr is one ``error:`` line naming the problem,
and that nothing was written (no adapter, no base, no output folder). The workspace is
a copy of the session's tiny base, so broken entries added here never reach other tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from loramgr.adapter_file import load_adapter, save_adapter
from loramgr.convert import convert_adapter
from loramgr.errors import LoramgrError, parse_weight
from loramgr.manifest import Manifest
from loramgr.pipeline.outputs import claim_stems, default_stem
from loramgr.pipeline.settings import GenerationSettings, check_inputs
from loramgr.samples import write_kohya_lora
from loramgr.workspace import Workspace, atomic_dir, atomic_path, check_name, clean_stale_temps

from cli_support import cli, one_error_line, run_args


@pytest.fixture(scope="module")
def ws(tiny_workspace, tmp_path_factory) -> Workspace:
    """A workspace of its own holding a copy of the tiny base and one good adapter (``good``)."""
    ws = Workspace.resolve(tmp_path_factory.mktemp("bad-input"))
    shutil.copytree(tiny_workspace.base_dir("tiny"), ws.base_dir("tiny"))
    return ws


@pytest.fixture(scope="module")
def lora_file(ws, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "good.safetensors"
    write_kohya_lora(path, Manifest.load(ws.base_dir("tiny")).param_shapes(), seed=7)
    convert_adapter(ws, path, name="good")
    return path


# 4. Weights that are not finite numbers.


@pytest.mark.parametrize("spec", ["good:nan", "good:1e309", "good:inf", "good:-inf", "good:NaN"])
@pytest.mark.parametrize("option", ["--lora", "--sweep"])
def test_run_refuses_non_finite_weights(ws, lora_file, input_png, tmp_path, capsys, spec, option):
    assert cli(ws, *run_args(input_png, tmp_path / "out", option, spec)) == 2
    one_error_line(capsys, "not a finite number")
    assert not (tmp_path / "out").exists()


def test_parse_weight():
    assert parse_weight("0.8", "x") == 0.8 and parse_weight("-1e3", "x") == -1000.0
    for text in ("nan", "inf", "-Infinity", "1e309", "abc", ""):
        with pytest.raises(LoramgrError):
            parse_weight(text, "x")


def test_convert_refuses_non_finite_default_weight(ws, lora_file, capsys):
    assert cli(ws, "convert", str(lora_file), "--name", "dw", "--default-weight", "nan") == 2
    one_error_line(capsys, "--default-weight", "not a finite number")
    assert not ws.adapter_path("dw").exists()


def _poisoned(lora_file: Path, folder: Path, key_end: str, value: float) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(lora_file)
    key = next(k for k in sorted(tensors) if k.endswith(key_end))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    path = folder / f"poisoned_{key_end.strip('.')}_{value}.safetensors"
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("key_end, value, message", [
    (".lora_up.weight", float("nan"), "NaN or infinite"),
    (".lora_down.weight", float("inf"), "NaN or infinite"),
    (".alpha", float("nan"), "not a finite number"),
    (".alpha", float("-inf"), "not a finite number"),
])
def test_convert_refuses_non_finite_tensors_and_alpha(ws, lora_file, tmp_path, capsys, key_end, value, message):
    source = _poisoned(lora_file, tmp_path, key_end, value)
    assert cli(ws, "convert", str(source), "--name", "poisoned") == 2
    one_error_line(capsys, source.name, message)
    assert not ws.adapter_path("poisoned").exists()


def test_run_refuses_an_adapter_with_a_non_finite_default_weight(ws, lora_file, input_png, tmp_path, capsys):
    adapter = load_adapter(ws.adapter_path("good"))
    meta = {k: v for k, v in adapter.metadata.items() if not k.startswith(("loramgr.format_version", "loramgr.kind"))}
    save_adapter(tmp_path / "nandw.lora", "lora", {**meta, "loramgr.default_weight": "nan"},
                 list(adapter.targets.values()))
    assert cli(ws, *run_args(input_png, tmp_path / "out", "--lora", str(tmp_path / "nandw.lora"))) == 2
    one_error_line(capsys, "default weight", "not a finite number")


# 6. No tracebacks for user errors.


def _broken_folder(tiny_folder: Path, tmp_path: Path, how: str) -> Path:
    folder = tmp_path / f"model-{how}"
    shutil.copytree(tiny_folder, folder)
    unet = folder / "unet"
    if how in ("corrupt-bin", "malicious-bin"):
        for f in unet.glob("*.safetensors"):
            f.unlink()
        target = unet / "diffusion_pytorch_model.bin"
        if how == "corrupt-bin":
            target.write_bytes(os.urandom(4096))
        else:
            marker = tmp_path / "PWNED"
            target.write_bytes(_evil_pickle(marker))
    elif how == "config":
        (unet / "config.json").write_text("{not json")
    elif how == "scheduler":
        (folder / "scheduler" / "scheduler_config.json").write_text("[1, 2")
    return folder


def _evil_pickle(marker: Path) -> bytes:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps(Evil())


@pytest.mark.parametrize("how, needle", [
    ("corrupt-bin", "unet"), ("malicious-bin", "unet"), ("config", "unet"), ("scheduler", "scheduler_config.json"),
])
def test_export_refuses_a_broken_diffusers_folder(ws, tiny_folder, tmp_path, capsys, how, needle):
    folder = _broken_folder(tiny_folder, tmp_path, how)
    assert cli(ws, "export", "--name", "broken", "--model", str(folder)) == 2
    one_error_line(capsys, needle)
    assert not ws.base_dir("broken").exists() and not (tmp_path / "PWNED").exists()
    assert not [p for p in ws.base_models.iterdir() if p.name.startswith(".broken")]


@pytest.mark.parametrize("opset", ["99", "5", "13"])
def test_export_refuses_an_unsupported_opset(ws, capsys, opset):
    assert cli(ws, "export", "--name", "op", "--arch", "tiny", "--random", "--opset", opset) == 2
    one_error_line(capsys, f"--opset {opset}", "choose an opset from 14")
    assert not ws.base_dir("op").exists()


def _long_image(tmp_path: Path, width: int, height: int) -> Path:
    path = tmp_path / f"long-{width}x{height}.png"
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(path)
    return path


@pytest.mark.parametrize("resolution, size", [(100000, (64, 64)), (512, (4000, 8)), (64, (8, 30000))])
def test_run_refuses_huge_outputs(ws, tmp_path, capsys, resolution, size):
    image = _long_image(tmp_path, *size)
    args = run_args(image, tmp_path / "out")
    args[args.index("--resolution") + 1] = str(resolution)
    assert cli(ws, *args) == 2
    one_error_line(capsys, "over the limit", "--max-pixels")
    assert not (tmp_path / "out").exists()


def test_max_pixels_is_overridable():
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(LoramgrError, match="over the limit"):
        check_inputs(image, GenerationSettings(prompt="x", resolution=4096))
    check_inputs(image, GenerationSettings(prompt="x", resolution=4096, max_pixels=4096 * 4096))


def test_verify_refuses_a_huge_image_size(ws, lora_file, capsys):
    assert cli(ws, "verify", "good", "--size", "100032") == 2
    one_error_line(capsys, "over the limit")


def _with_metadata(source: Path, target: Path, **changes: str) -> Path:
    model = onnx.load(str(source))
    for prop in model.metadata_props:
        if prop.key in changes:
            prop.value = changes[prop.key]
    onnx.save(model, str(target))
    return target


@pytest.fixture
def broken_targets(ws, lora_file):
    """``bad_meta``: targets metadata is not JSON; ``bad_entry``: an entry lacks its kind; ``bad_shape``: a factor
    of the wrong shape. Removed afterwards so the other tests see a clean workspace."""
    good = ws.adapter_path("good")
    _with_metadata(good, ws.adapter_path("bad_meta"), **{"loramgr.targets": '{"a": [1, 2'})
    index = json.loads({p.key: p.value for p in onnx.load(str(good)).metadata_props}["loramgr.targets"])
    first = next(iter(index))
    del index[first]["kind"]
    _with_metadata(good, ws.adapter_path("bad_entry"), **{"loramgr.targets": json.dumps(index)})
    adapter = load_adapter(good)
    target = next(t for t in adapter.targets.values() if t.kind == "lora")
    target.tensors["down"] = target.tensors["down"][:, :-1].copy()
    meta = {k: v for k, v in adapter.metadata.items() if k not in ("loramgr.format_version", "loramgr.kind")}
    save_adapter(ws.adapter_path("bad_shape"), "lora", meta, list(adapter.targets.values()))
    yield ["bad_meta", "bad_entry", "bad_shape"]
    for name in ("bad_meta", "bad_entry", "bad_shape"):
        ws.adapter_path(name).unlink()


@pytest.mark.parametrize("name, needle", [
    ("bad_meta", "not valid JSON"), ("bad_entry", "no valid 'kind'"), ("bad_shape", "do not make its shape"),
])
def test_damaged_lora_is_refused_by_run_and_verify(ws, broken_targets, input_png, tmp_path, capsys, name, needle):
    assert cli(ws, *run_args(input_png, tmp_path / "out", "--lora", name)) == 2
    one_error_line(capsys, name, needle)
    assert not (tmp_path / "out").exists()
    assert cli(ws, "verify", name, "--checks", "tensors") == 2
    one_error_line(capsys, name, needle)


@pytest.mark.parametrize("name", ["bad_meta", "bad_entry"])
def test_damaged_lora_metadata_is_refused_by_inspect(ws, broken_targets, capsys, name):
    assert cli(ws, "inspect", name) == 2
    one_error_line(capsys, name, "loramgr.targets")


# 8. A workspace with one bad entry still lists.


def test_list_marks_broken_entries_and_lists_the_rest(ws, lora_file, broken_targets, capsys):
    garbage = ws.adapter_path("garbage")
    garbage.write_bytes(b"\x00not an onnx file" * 10)
    damaged = ws.base_dir("damaged")
    damaged.mkdir()
    (damaged / "manifest.json").write_text("{broken")
    evil = ws.adapters / "evil\n.lora"  # written by an older loramgr that accepted the name
    shutil.copy(ws.adapter_path("good"), evil)
    try:
        assert cli(ws, "list", "--json") == 0
        data = json.loads(capsys.readouterr().out)
        assert [b["name"] for b in data["bases"]] == ["tiny"]
        assert {a["name"] for a in data["adapters"]} == {"good", "bad_shape"}  # shapes need the base: run refuses
        problems = {p["name"]: p["reason"] for p in data["problems"]}
        assert set(problems) == {"damaged", "garbage", "bad_meta", "bad_entry", "evil\n"}
        assert "not a readable .lora" in problems["garbage"] and "not valid JSON" in problems["bad_meta"]
        assert cli(ws, "list") == 0
        out = capsys.readouterr().out
        assert "garbage" in out and "good" in out and "cannot be used" in out
    finally:
        garbage.unlink()
        evil.unlink()
        shutil.rmtree(damaged)


# 7. Names.


@pytest.mark.parametrize("name", ["evil\n", "", "a/b", ".hidden", "x" * 101])
def test_convert_refuses_bad_names(ws, lora_file, capsys, name):
    before = {p.name: p.stat().st_ino for p in ws.adapters.iterdir()}
    assert cli(ws, "convert", str(lora_file), "--name", name) == 2
    one_error_line(capsys, "invalid adapter name")
    assert {p.name: p.stat().st_ino for p in ws.adapters.iterdir()} == before  # "good" (the stem) untouched


def test_check_name_matches_the_whole_name():
    assert check_name("a.b-c_1", "x") == "a.b-c_1"
    for bad in ("evil\n", "evil\r", "a\nb", " a", "a "):
        with pytest.raises(LoramgrError):
            check_name(bad, "x")


# 9. Interrupted writes leave nothing behind.


def _killed_write(target: Path, folder: bool) -> Path:
    """Start a write of ``target`` in another process, kill -9 it mid-write, return the temporary it left."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from loramgr.workspace import atomic_dir, atomic_path
        with ({'atomic_dir' if folder else 'atomic_path'})(Path({str(target)!r})) as tmp:
            (tmp / "part").write_bytes(b"x" * 1000) if tmp.is_dir() else tmp.write_bytes(b"x" * 1000)
            print(tmp, flush=True)
            time.sleep(60)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    left = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert left.exists()
    return left


def test_interrupted_writes_are_listed_and_cleaned_on_the_next_write(ws, lora_file, capsys):
    left_file = _killed_write(ws.adapter_path("good"), folder=False)
    left_dir = _killed_write(ws.base_dir("tiny2"), folder=True)
    live = ws.adapters / f".good.lora.{os.getpid()}-abcd1234.tmp"  # a write in progress (this process)
    live.write_bytes(b"x")
    try:
        assert cli(ws, "list", "--json") == 0
        problems = {p["name"]: p for p in json.loads(capsys.readouterr().out)["problems"]}
        assert set(problems) == {left_file.name, left_dir.name}
        assert "interrupted" in problems[left_file.name]["reason"] and problems[left_dir.name]["size_bytes"] == 1000
        assert cli(ws, "convert", str(lora_file), "--name", "good") == 0
        assert not left_file.exists() and live.exists()
        with atomic_dir(ws.base_dir("tiny2")):
            pass  # a write of that name, even one that fails or writes nothing, cleans its leftovers
        assert not left_dir.exists()
        shutil.rmtree(ws.base_dir("tiny2"))
    finally:
        live.unlink()


def test_cleaning_touches_only_the_same_target(tmp_path):
    other = tmp_path / ".other.lora.999999999-abc.tmp"
    mine = tmp_path / ".mine.lora.999999999-abc.tmp"
    unrelated = tmp_path / "notes.tmp"
    for p in (other, mine, unrelated):
        p.write_bytes(b"x")
    assert clean_stale_temps(tmp_path / "mine.lora") == [mine]
    assert other.exists() and unrelated.exists()


# 10. Files are readable as the user expects.


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                         (0o002, 0o664, 0o775)])
def test_written_files_and_folders_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "a.lora") as tmp:
            tmp.write_bytes(b"x")
        with atomic_dir(tmp_path / "base") as tmp:
            (tmp / "f").write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.lora").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "base").stat().st_mode) == dir_mode


def test_converted_adapter_is_readable_by_the_group(ws, lora_file):
    old = os.umask(0o022)
    try:
        convert_adapter(ws, lora_file, name="modes")
    finally:
        os.umask(old)
    assert stat.S_IMODE(ws.adapter_path("modes").stat().st_mode) == 0o644
    ws.adapter_path("modes").unlink()


# 11. Two runs into one folder.


def test_output_stems_are_unique_and_checked_before_generating(ws, lora_file, input_png, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert cli(ws, *run_args(input_png, out, "--json")) == 0
    assert cli(ws, *run_args(input_png, out, "--json")) == 0  # same second, same process: another stem
    assert len(list(out.glob("*.json"))) == 2
    capsys.readouterr()
    assert cli(ws, *run_args(input_png, out, "--name", "mine")) == 0
    capsys.readouterr()

    import loramgr.runtime

    def no_session(*args, **kwargs):
        raise AssertionError("a session was opened for a run whose outputs exist")

    monkeypatch.setattr(loramgr.runtime, "open_runner", no_session)
    assert cli(ws, *run_args(input_png, out, "--name", "mine")) == 2
    one_error_line(capsys, "mine", "already exists", "--overwrite")
    assert cli(ws, *run_args(input_png, out, "--name", "bad\nname")) == 2
    one_error_line(capsys, "invalid output name")
    monkeypatch.undo()
    assert cli(ws, *run_args(input_png, out, "--name", "mine", "--overwrite")) == 0


def test_default_stems_differ_between_processes(tmp_path, monkeypatch):
    import loramgr.pipeline.outputs as outputs

    stem = default_stem()
    assert re.fullmatch(rf"\d{{8}}-\d{{6}}-{os.getpid()}", stem), stem
    monkeypatch.setattr(outputs, "default_stem", lambda: stem)  # the same second for the claims below
    (tmp_path / f"{stem}.json").write_text("{}")
    assert claim_stems(tmp_path, None, ["base"], 1) == [f"{stem}-2"]
    (tmp_path / f"{stem}-2-0.png").write_text("")
    assert claim_stems(tmp_path, None, ["base"], 1) == [f"{stem}-3"]
    stems = claim_stems(tmp_path, "run", ["a:0.8+hed", "dir/x.lora", "base"], 1)
    assert stems == ["run-0-a_0.8+hed", "run-1-dir_x.lora", "run-2-base"]
    # a third unit's map is a file of the run too: taken, it is refused (a chosen stem) or skipped (a default one)
    (tmp_path / "units-control-2.png").write_text("")
    assert claim_stems(tmp_path, "units", ["base"], 1, num_maps=2) == ["units"]
    with pytest.raises(LoramgrError, match="units-control-2.png already exists"):
        claim_stems(tmp_path, "units", ["base"], 1, num_maps=3)
    (tmp_path / f"{stem}-3-control-1.png").write_text("")
    assert claim_stems(tmp_path, None, ["base"], 1, num_maps=2) == [f"{stem}-4"]


def test_exported_base_honours_the_umask(tiny_workspace):
    umask = os.umask(0o022)
    os.umask(umask)
    base = tiny_workspace.base_dir("tiny")
    assert stat.S_IMODE(base.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((base / "unet" / "model.onnx_data").stat().st_mode) == 0o666 & ~umask
