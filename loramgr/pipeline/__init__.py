"""The backend-agnostic canny ControlNet pipeline (ControlNet's gradio ``process()``).

Modules, lightest first: ``settings`` (what to generate, and its validation),
``schedulers`` (names of diffusers schedulers), ``canny`` (ControlNet's annotator),
``control`` (per-residual control scales), ``controlnet`` (the denoising pipeline over
any :class:`~loramgr.backends.base.Runner`), ``images`` / ``outputs`` (files in and out).
Nothing is imported here, so the CLI can read choices from ``settings`` and
``schedulers`` without importing torch or diffusers.
"""
