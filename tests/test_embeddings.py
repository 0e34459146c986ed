"""Textual-inversion embeddings: every file layout converted into a ``.lora`` of kind ``embedding``,
the ones LoRA files bundle, the workspace's library of them, the service's listing and uploads.

Reference: what diffusers' ``load_textual_inversion`` puts into the tiny text encoder's token
table for the same file (for bundled embeddings: for the same vectors written as a file of
their own).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.loaders import TextualInversionLoaderMixin
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from cli_support import cli, one_error_line
from format_writers import (
    a1111_embedding,
    a1111_embedding_needing_code,
    bundle_embeddings,
    cloneofsimo_file,
    cloneofsimo_walk,
    diffusers_embedding,
    kohya_embedding,
    lora_factors,
    save,
    sdxl_embedding,
)
from loramgr.adapter_file import load_adapter, save_adapter
from loramgr.embeddings import EmbeddingLibrary
from loramgr.errors import LoramgrError
from loramgr.inventory import inventory
from loramgr.manifest import Manifest
from loramgr.models.architectures import architecture
from loramgr.pipeline.prompts import plan_prompt
from loramgr.samples import write_kohya_lora
from loramgr.serve.catalog import AdapterCatalog, CatalogError
from loramgr.serve.schemas import AdapterList, UploadResponse
from loramgr.workspace import Workspace

WIDTH = 32  # the tiny text encoder's


@pytest.fixture(scope="module")
def ws(tiny_workspace, tmp_path_factory) -> Workspace:
    ws = Workspace.resolve(tmp_path_factory.mktemp("embeddings"))
    shutil.copytree(tiny_workspace.base_dir("tiny"), ws.base_dir("tiny"))
    return ws


@pytest.fixture(scope="module")
def manifest(ws) -> Manifest:
    return Manifest.load(ws.base_dir("tiny"))


class _DiffusersLoader(TextualInversionLoaderMixin):
    """diffusers' textual-inversion loader over a bare text encoder and tokenizer (no pipeline)."""

    hf_device_map = None
    components: dict = {}


def diffusers_vectors(ws: Workspace, source, token: str) -> np.ndarray:
    """The rows diffusers' ``load_textual_inversion(source, token=token)`` writes into the tiny
    base's token table: one per vector (``token``, ``token_1``, ...)."""
    tokenizer = CLIPTokenizer.from_pretrained(ws.base_dir("tiny") / "tokenizer", local_files_only=True)
    model = CLIPTextModel(CLIPTextConfig(**architecture("tiny").text_encoder))
    _DiffusersLoader().load_textual_inversion(source, token=token, tokenizer=tokenizer, text_encoder=model)
    tokens = [token] + sorted((t for t in tokenizer.get_added_vocab() if t.startswith(f"{token}_")),
                              key=lambda t: int(t.rsplit("_", 1)[1]))
    ids = tokenizer.convert_tokens_to_ids(tokens)
    return model.get_input_embeddings().weight.detach()[ids].numpy()


def _vectors(n: int, seed: int, width: int = WIDTH, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)).to(dtype)


# -- standalone files ----------------------------------------------------------------------

LAYOUTS = {
    # name: (writer, format, vectors)
    "a1111-pt": (lambda p, v: a1111_embedding(p.with_suffix(".pt"), v), "textual-inversion-a1111", 3),
    "kohya": (lambda p, v: kohya_embedding(p.with_suffix(".safetensors"), v), "textual-inversion-kohya", 2),
    "kohya-fp16": (lambda p, v: kohya_embedding(p.with_suffix(".safetensors"), v.half()), "textual-inversion-kohya", 4),
    "diffusers-bin": (lambda p, v: diffusers_embedding(p.with_suffix(".bin"), "<concept>", v[0]),
                      "textual-inversion-diffusers", 1),
    "diffusers-safetensors": (lambda p, v: diffusers_embedding(p.with_suffix(".safetensors"), "<concept>", v[0]),
                              "textual-inversion-diffusers", 1),
    "diffusers-folder": (lambda p, v: diffusers_embedding(_folder(p) / "learned_embeds.safetensors", "<c>", v[0]).parent,
                         "textual-inversion-diffusers", 1),
}


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_embedding_files_convert_to_what_diffusers_loads(ws, tmp_path, capsys, layout):
    writer, fmt, count = LAYOUTS[layout]
    name = f"emb-{layout}"
    source = writer(tmp_path / name, _vectors(count, seed=len(layout)))
    assert cli(ws, "convert", str(source), "--name", name) == 0
    adapter = load_adapter(ws.adapter_path(name))
    assert adapter.kind == "embedding" and not adapter.targets and list(adapter.embeddings) == [name]
    expected = diffusers_vectors(ws, str(source), name)
    assert expected.shape == (count, WIDTH)
    np.testing.assert_array_equal(adapter.embeddings[name], expected)
    meta = adapter.metadata
    assert meta["loramgr.source_format"] == fmt and "loramgr.base_fingerprint" not in meta
    listed = {a["name"]: a for a in inventory(ws)["adapters"]}[name]
    assert listed["kind"] == "embedding" and listed["embeddings"][name]["vectors"] == count
    a1111_fields = (1000, "abc123", "base-v1") if layout == "a1111-pt" else (None, None, None)
    assert tuple(listed["embeddings"][name][k] for k in ("step", "sd_checkpoint", "sd_checkpoint_name")) == a1111_fields
    capsys.readouterr()
    assert cli(ws, "inspect", name) == 0
    assert f"{name}" in capsys.readouterr().out


def test_embedding_is_not_a_lora(ws, manifest, tmp_path):
    kohya_embedding(tmp_path / "not-lora.safetensors", _vectors(1, seed=1))
    assert cli(ws, "convert", str(tmp_path / "not-lora.safetensors")) == 0
    with pytest.raises(LoramgrError, match="a textual-inversion embedding, not a LoRA: write its name 'not-lora'"):
        load_adapter(ws.adapter_path("not-lora")).check_base(manifest)


# -- bundled in LoRA files -----------------------------------------------------------------

def test_kohya_bundled_embeddings_convert_with_the_lora(ws, manifest, tmp_path):
    plain = write_kohya_lora(tmp_path / "plain.safetensors", manifest.param_shapes(), seed=3)
    bundled = {"pivot-a": _vectors(2, seed=11), "pivot-k": _vectors(1, seed=12)}
    source = save(tmp_path / "bundled.safetensors",
                  bundle_embeddings(load_file(plain), a1111={"pivot-a": bundled["pivot-a"]},
                                    kohya={"pivot-k": bundled["pivot-k"]}))
    assert cli(ws, "convert", str(plain), "--name", "plain") == 0
    assert cli(ws, "convert", str(source), "--name", "bundled", "--strict") == 0  # every key used
    adapter, without = load_adapter(ws.adapter_path("bundled")), load_adapter(ws.adapter_path("plain"))
    assert adapter.kind == "lora" and sorted(adapter.embeddings) == ["pivot-a", "pivot-k"]
    assert adapter.targets.keys() == without.targets.keys() and without.embeddings == {}
    for name, writer in (("pivot-a", a1111_embedding), ("pivot-k", kohya_embedding)):
        alone = writer(tmp_path / f"{name}.{'pt' if writer is a1111_embedding else 'safetensors'}", bundled[name])
        np.testing.assert_array_equal(adapter.embeddings[name], diffusers_vectors(ws, str(alone), name))
    listed = {a["name"]: a for a in inventory(ws)["adapters"]}["bundled"]
    assert listed["embeddings"] == {"pivot-a": {"vectors": 2, "dim": WIDTH}, "pivot-k": {"vectors": 1, "dim": WIDTH}}


def test_cloneofsimo_token_embeddings_convert_with_the_lora(ws, manifest, tmp_path):
    encoder = CLIPTextModel(CLIPTextConfig(**architecture("tiny").text_encoder))
    modules = cloneofsimo_walk(encoder, {"CLIPAttention"})
    gen = torch.Generator().manual_seed(5)
    factors = [lora_factors(gen, manifest.param_shapes()[f"text_model.{m}.weight"], 4) for m in modules]
    tokens = {"<s1>": _vectors(1, seed=21)[0], "<s2>": _vectors(1, seed=22)[0]}
    source = cloneofsimo_file(tmp_path / "pivotal.safetensors", "text_encoder", ["CLIPAttention"], factors, tokens)
    assert cli(ws, "convert", str(source), "--strict") == 0
    adapter = load_adapter(ws.adapter_path("pivotal"))
    assert len(adapter.targets) == len(modules) and sorted(adapter.embeddings) == ["<s1>", "<s2>"]
    for token, vector in tokens.items():
        np.testing.assert_array_equal(adapter.embeddings[token], diffusers_vectors(ws, {token: vector}, token))


# -- refused files -------------------------------------------------------------------------

BAD = {
    # file: (writer(path, a LoRA for the base), the reason in the error)
    "needs-code.pt": (lambda p, lora: a1111_embedding_needing_code(p, _vectors(2, 0)), "refused by torch's safe loader"),
    "sdxl.safetensors": (lambda p, lora: sdxl_embedding(p, _vectors(2, 0, 768), _vectors(2, 0, 1280)),
                         "an SDXL embedding"),
    "sd2.safetensors": (lambda p, lora: kohya_embedding(p, _vectors(2, 0, 1024)),
                        "vectors of width 1024 (SD 2.x (cross-attention width 1024)); base 'tiny' has text width 32"),
    "nan.safetensors": (lambda p, lora: kohya_embedding(p, torch.full((2, WIDTH), float("nan"))), "NaN or infinite"),
    "long.safetensors": (lambda p, lora: kohya_embedding(p, _vectors(76, 0)), "76 vectors; an embedding has 1 to 75"),
    "two-terms.pt": (lambda p, lora: torch.save({"string_to_param": {"*": _vectors(1, 0), "x": _vectors(1, 1)}}, p),
                     "string_to_param holds 2 terms"),
    "bundled-sd2.safetensors": (lambda p, lora: save(p, bundle_embeddings(lora, kohya={"wide": _vectors(1, 0, 1024)})),
                                "embedding 'wide' has vectors of width 1024"),
    "bundled-xl.safetensors": (lambda p, lora: save(p, {**lora, "bundle_emb.xl.clip_l": _vectors(1, 0, 768),
                                                        "bundle_emb.xl.clip_g": _vectors(1, 0, 1280)}),
                               "an SDXL embedding"),
}


@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_embedding_files_are_refused_with_one_line(ws, manifest, tmp_path, capsys, bad):
    writer, reason = BAD[bad]
    lora = load_file(write_kohya_lora(tmp_path / "lora.safetensors", manifest.param_shapes(), seed=1))
    writer(tmp_path / bad, lora)
    before = ws.adapter_names()
    assert cli(ws, "convert", str(tmp_path / bad)) == 2
    one_error_line(capsys, bad, reason)
    assert ws.adapter_names() == before


def test_kind_option_refuses_the_other_kinds(ws, manifest, tmp_path, capsys):
    kohya_embedding(tmp_path / "emb.safetensors", _vectors(1, 0))
    assert cli(ws, "convert", str(tmp_path / "emb.safetensors"), "--kind", "lora") == 2
    one_error_line(capsys, "is a textual-inversion embedding, not a lora (--kind lora)")
    write_kohya_lora(tmp_path / "lora.safetensors", manifest.param_shapes(), seed=1)
    assert cli(ws, "convert", str(tmp_path / "lora.safetensors"), "--kind", "embedding") == 2
    one_error_line(capsys, "is not a textual-inversion embedding (--kind embedding)")


# -- the workspace's library, prompts, the service ---------------------------------------------

def test_library_reads_embeddings_again_when_they_change(ws, tmp_path):
    library = EmbeddingLibrary(ws, WIDTH)
    a1111_embedding(tmp_path / "lib-a.pt", _vectors(3, seed=31))
    assert cli(ws, "convert", str(tmp_path / "lib-a.pt")) == 0
    vectors = library.vectors()
    np.testing.assert_array_equal(vectors["lib-a"], diffusers_vectors(ws, str(tmp_path / "lib-a.pt"), "lib-a"))
    assert not any(load_adapter(ws.adapter_path(n)).kind != "embedding" for n in vectors)
    a1111_embedding(tmp_path / "lib-a.pt", _vectors(2, seed=32))  # converted again: new vectors
    assert cli(ws, "convert", str(tmp_path / "lib-a.pt")) == 0
    np.testing.assert_array_equal(library.vectors()["lib-a"], _vectors(2, seed=32).numpy())
    save_adapter(ws.adapter_path("lib-narrow"), "embedding", {}, [], {"lib-narrow": np.zeros((1, 16), np.float32)})
    damaged = ws.adapter_path("lib-a").read_bytes()
    ws.adapter_path("lib-damaged").write_bytes(damaged[:-40] + bytes(40))
    vectors, skipped = library.vectors(), library.skipped()
    assert "lib-narrow" not in vectors and "lib-damaged" not in vectors and "lib-a" in vectors
    assert "vectors of width 16, the base's text width is 32" in skipped["lib-narrow"]
    assert "lib-damaged.lora" in skipped["lib-damaged"]
    for name in ("lib-narrow", "lib-damaged"):
        ws.adapter_path(name).unlink()
    ws.adapter_path("lib-a").rename(ws.adapter_path("lib-renamed"))  # A1111: the file stem is the trigger
    vectors = library.vectors()
    assert "lib-a" not in vectors and vectors["lib-renamed"].shape == (2, WIDTH) and library.skipped() == {}


def test_prompt_takes_the_vectors_of_a_converted_embedding(ws, tmp_path):
    a1111_embedding(tmp_path / "in-prompt.pt", _vectors(3, seed=41))
    assert cli(ws, "convert", str(tmp_path / "in-prompt.pt")) == 0
    tokenizer = CLIPTokenizer.from_pretrained(ws.base_dir("tiny") / "tokenizer", local_files_only=True)
    plan = plan_prompt("a (in-prompt:1.2) house", tokenizer, EmbeddingLibrary(ws, WIDTH).vectors())
    chunk = plan.chunks[0]
    start = 1 + len(tokenizer("a", add_special_tokens=False).input_ids)
    expected = diffusers_vectors(ws, str(tmp_path / "in-prompt.pt"), "in-prompt")
    np.testing.assert_array_equal(np.stack([chunk.vectors[start + i] for i in range(3)]), expected)
    assert chunk.weights[start:start + 3] == [1.2] * 3 and plan.embeddings == ["in-prompt"]


class _RunsCode:
    """Unpickling it would create ``marker``: what a malicious ``.pt`` does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_service_lists_and_uploads_embeddings(ws, manifest, tmp_path):
    catalog = AdapterCatalog(ws, manifest)
    path = a1111_embedding(tmp_path / "up-a1111.pt", _vectors(2, seed=51))
    result = catalog.upload(io.BytesIO(path.read_bytes()), path.name, name=None, kind=None, strict=False,
                            default_weight=1.0, overwrite=False, max_bytes=1 << 20)
    assert result["kind"] == "embedding" and result["embeddings"] == {"up-a1111": {"vectors": 2, "dim": WIDTH}}
    UploadResponse(**result)
    info = catalog.info("up-a1111")
    assert info["kind"] == "embedding" and info["fits"] and info["embeddings"]["up-a1111"]["step"] == 1000
    listed = AdapterList(base="tiny", adapters=catalog.list())
    assert listed.adapters[[a.name for a in listed.adapters].index("up-a1111")].embeddings["up-a1111"].vectors == 2
    lora = write_kohya_lora(tmp_path / "lora.safetensors", manifest.param_shapes(), seed=1)
    torch.save(load_file(lora), tmp_path / "lora.pt")
    for filename, kind, field in (("lora.pt", None, "file"), ("lora.pt", "lora", "kind")):
        with pytest.raises(CatalogError) as err:
            catalog.upload(io.BytesIO((tmp_path / filename).read_bytes()), filename, name="pickled-lora", kind=kind,
                           strict=False, default_weight=1.0, overwrite=False, max_bytes=1 << 30)
        assert err.value.status == 422 and err.value.field == field
    assert "pickled-lora" not in ws.adapter_names()
    marker = tmp_path / "PWNED"
    torch.save({"string_to_param": {"*": _RunsCode(marker)}}, tmp_path / "evil.pt")
    with pytest.raises(CatalogError, match="refused by torch's safe loader"):
        catalog.upload(io.BytesIO((tmp_path / "evil.pt").read_bytes()), "evil.pt", name=None, kind=None, strict=False,
                       default_weight=1.0, overwrite=False, max_bytes=1 << 20)
    assert not marker.exists() and "evil" not in ws.adapter_names()
    assert json.loads(json.dumps(catalog.info("up-a1111")))  # plain JSON for the HTTP layer
