"""A call's metadata as servicers read it."""

from __future__ import annotations

from typing import Any

from grpc import aio


def text_metadata(context: aio.ServicerContext[Any, Any]) -> dict[str, str]:
    """The call's text metadata by key (binary `-bin` values are left out)."""
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
