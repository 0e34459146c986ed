"""loramgr: one exported SD1.5 + ControlNet base, many LoRAs and ControlNets as weight swaps.

The Python API lives in focused modules (the CLI is a thin layer over them):

- :mod:`loramgr.export` — ``export_base``: a base once, with a verified weight map.
- :mod:`loramgr.convert` — ``convert_adapter``: adapters into ``.lora`` files; :mod:`loramgr.bake` — ``bake``.
- :mod:`loramgr.adapters` — ``AdapterSet``, ``AdapterChoice``, ``load_adapter_set``: which adapters run together.
- :mod:`loramgr.backends` — ``open_runner``: a base on ONNX Runtime or TensorRT behind one ``Runner`` interface.
- :mod:`loramgr.runtime` — ``Generator`` (in memory), ``generate`` (files): the canny pipeline with adapters.
- :mod:`loramgr.verify` — ``verify``: injected weights against a merged export.
"""

from .errors import BadFileError, LoramgrError
from .workspace import Workspace

__version__ = "0.1.0"
__all__ = ["BadFileError", "LoramgrError", "Workspace", "__version__"]
