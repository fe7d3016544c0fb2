"""``reft-rs serve``: an OpenAI-compatible server on the Rust engine, many
adapters over one base model in one continuously batched decode.

Needs the ``serve`` extra (``pip install "reft-rs[serve]"``: Starlette and
uvicorn), never torch.

Example::

    engine = reft_rs.Engine("SmolLM2-135M-Instruct/")
    engine.add_adapter("style", "runs/style/checkpoint")
    app = reft_rs.serve.create_app(engine, adapter_dir="runs/")
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

from ..errors import MissingDependencyError

try:
    from .app import Limits, create_app, is_loopback
except ImportError as error:  # pragma: no cover - depends on the environment
    raise MissingDependencyError(
        f"reft_rs.serve needs Starlette and uvicorn ({error.name} is missing): pip install 'reft-rs[serve]'"
    ) from None

__all__ = ["Limits", "create_app", "is_loopback"]
