"""The CLI's options become the API's objects: GenerationSettings field by field, one options object per backend."""

from __future__ import annotations

from dataclasses import fields

import pytest

from loramgr.backends import BACKENDS
from loramgr.backends.options import OrtOptions
from loramgr.backends.tensorrt import DEFAULT_PROFILE, Shape, ShapeProfile, TrtOptions
from loramgr.cli import _backend_options, _parser, _settings
from loramgr.defaults import PER_BASE, BaseDefaults
from loramgr.errors import LoramgrError
from loramgr.pipeline.settings import GenerationSettings

RUN = ["run", "--image", "x.png", "--prompt", "a bird"]
TINY = BaseDefaults(resolution=128, n_prompt="lowres")  # a base's own defaults (loramgr.defaults)


def test_run_options_cover_every_generation_setting():
    args = _parser().parse_args([*RUN, "--steps", "7", "--guess-schedule", "diffusers", "--img2img-strength", "0.5"])
    settings = _settings(args, TINY)
    defaults = GenerationSettings(prompt="a bird")
    assert settings == GenerationSettings(prompt="a bird", steps=7, control_schedule="diffusers", img2img_strength=0.5,
                                          resolution=128, n_prompt="lowres")
    for f in fields(GenerationSettings):  # every other default of run is the settings' own
        if f.name not in ("prompt", "steps", "control_schedule", "img2img_strength", *PER_BASE):
            assert getattr(settings, f.name) == getattr(defaults, f.name), f.name
    given = _settings(_parser().parse_args([*RUN, "--resolution", "256", "--n-prompt", ""]), TINY)
    assert (given.resolution, given.n_prompt) == (256, "")  # given, even empty: never replaced by the base's


def test_backend_options_are_one_object_per_backend():
    parse = _parser().parse_args
    assert _backend_options(parse([*RUN, "--ort-opt", "all", "--no-hot-swap"])) == OrtOptions(
        optimization="all", hot_swap=False)
    assert _backend_options(parse([*RUN, "--no-fuse-attention"])) == OrtOptions(fuse_attention=False)
    assert _backend_options(parse([*RUN, "--backend", "tensorrt"])) == TrtOptions()  # as build-engine built
    trt = _backend_options(parse([*RUN, "--backend", "tensorrt", "--precision", "fp16", "--max", "2x64x64"]))
    assert trt == TrtOptions("fp16", ShapeProfile(DEFAULT_PROFILE.min, DEFAULT_PROFILE.opt, Shape(2, 64, 64)))
    verify = parse(["verify", "a", "--backend", "tensorrt", "--precision", "fp32"])
    assert _backend_options(verify) == TrtOptions("fp32")
    with pytest.raises(LoramgrError, match="--precision: TensorRT options, but --backend is ort-cpu"):
        _backend_options(parse([*RUN, "--precision", "fp16"]))
    for command in (RUN, ["verify", "a"]):
        action = next(a for a in _parser()._subparsers._group_actions[0].choices[command[0]]._actions
                      if a.dest == "backend")
        assert tuple(action.choices) == BACKENDS
