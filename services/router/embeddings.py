"""OpenAI's embeddings API (POST /v1/embeddings): its request rules. Imports no gRPC.

vLLM's pooling layer on an embedding model's replica reads the body (OpenAI's `input` form, and vLLM's own
chat form with `messages`); the router refuses, before any token is reserved, what OpenAI's contract
forbids and vLLM would accept or fail on later: an empty input, inputs that are neither text nor token ids,
an encoding other than float or base64, non-finite numbers. Nothing is generated: token limits reserve
exactly the input's tokens, and billing records them at the model's prompt price.
"""

from __future__ import annotations

from typing import Any

from services.router.validation import finite, number
from services.runtime.errors import InvalidArgument, echo

# OpenAI's limit on inputs in one request.
MAX_INPUTS = 2048
ENCODINGS = ("float", "base64")


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(i) is int and i >= 0 for i in value)


def _check_input(value: Any) -> None:
    if isinstance(value, str):
        if not value:
            raise InvalidArgument("input: must not be empty")
        return
    if not isinstance(value, list) or not value:
        raise InvalidArgument("input: must be a string, a list of strings, token ids or lists of token ids")
    if len(value) > MAX_INPUTS:
        raise InvalidArgument(f"input: at most {MAX_INPUTS} inputs, got {len(value)}")
    if _is_ids(value):
        return
    for i, item in enumerate(value):
        if isinstance(item, str) and item:
            continue
        if not _is_ids(item):
            raise InvalidArgument(f"input[{i}]: must be a non-empty string or a non-empty list of token ids")


def contract(fields: dict[str, Any]) -> None:
    """OpenAI's rules for an embeddings request that vLLM does not enforce."""
    finite(fields)
    if "messages" not in fields or "input" in fields:  # vLLM's chat form is checked by vLLM
        _check_input(fields.get("input"))
    encoding = fields.get("encoding_format", "float")
    if encoding not in ENCODINGS:
        raise InvalidArgument(f"encoding_format: must be one of {', '.join(ENCODINGS)}, got {echo(encoding)}")
    dimensions = number(fields, "dimensions")
    if dimensions is not None and dimensions < 1:
        raise InvalidArgument(f"dimensions: must be at least 1, got {dimensions:g}")
