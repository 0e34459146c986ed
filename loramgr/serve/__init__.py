"""``loramgr serve``: a long-lived service that keeps the base hot and applies each request's adapters.

* :mod:`.config` - limits and security settings (:class:`ServeConfig`)
* :mod:`.schemas` - the JSON contract (pydantic)
* :mod:`.engine` - the one module over the runtime: prepare a request, swap, generate
* :mod:`.catalog` - adapters in the workspace: listing, cached loading, uploads
* :mod:`.codec` - base64 images in (the formats A1111 reads) and PNG out
* :mod:`.auth` - the bearer key and A1111's HTTP Basic credentials
* :mod:`.scheduler` - the queue, adapter-set grouping with a bound on overtaking, the worker
* :mod:`.metrics` - Prometheus metrics
* :mod:`.app` - the FastAPI app (thin over :class:`Service`)
* :mod:`.server` - uvicorn with a drain on SIGTERM

docs/serving.md is the user-facing contract.
"""

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "serve"]


def create_app(*args, **kwargs):
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


def serve(*args, **kwargs):
    from .server import serve as _serve

    return _serve(*args, **kwargs)
