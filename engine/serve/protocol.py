"""The wire protocol: request models, how API inputs become engine inputs, response bodies, errors.

Two request shapes share one input grammar:

- ``POST /v1/embeddings`` (OpenAI): ``input`` is a string, a list of token ids, or a list whose
  items are strings, token-id lists or ``[instruction, text]`` pairs (our extension, as are the
  ``instruction`` field and ``dimensions`` on every model).
- ``POST /embed`` (text-embeddings-inference): the same grammar under ``inputs``.

Every error is an :class:`APIError` rendered in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``; ``param`` names the field, and for one input its
index (``input[3]``). Bodies are serialised with orjson: float32 rows go out in their shortest
round-trip form without a detour through Python floats.
"""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Statuses and the OpenAI error ``type`` that goes with each.
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error answered to the client: ``status``, a one-line ``message``, the ``param`` it is about."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    error = {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param, "code": code}
    return orjson.dumps({"error": error})


class _Request(BaseModel):
    # strict: "5" is not a number and 1 is not true; forbid: a misspelt field ("dimension") is an
    # error naming it, not silently ignored.
    model_config = ConfigDict(extra="forbid", strict=True)

    dimensions: int | None = Field(None, ge=1, description="keep the first N components, then L2-normalise")
    instruction: str | None = Field(None, description="read before every text input and never pooled (LLM2Vec)")


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings``, OpenAI's embeddings request plus ``instruction``."""

    input: Any = Field(..., description="a string, a list of token ids, or a list of strings, "
                                         "token-id lists and [instruction, text] pairs")
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class EmbedRequest(_Request):
    """``POST /embed``, text-embeddings-inference's request plus ``instruction``."""

    inputs: Any = Field(..., description="same grammar as OpenAI's input")
    normalize: bool = True
    truncate: bool = False
    truncation_direction: Literal["right", "Right"] = "right"
    prompt_name: str | None = None


def parse_request(model: type[_Request], body: bytes) -> Any:
    """Validate a JSON body: 400 when it is not JSON, 422 naming the first bad field otherwise."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"the body is not valid JSON ({err['msg']})", code="invalid_json") from None
        if err["type"] in ("model_type", "model_attributes_type") or not err["loc"]:
            raise APIError(422, "the body must be a JSON object", code="invalid_type") from None
        field = ".".join(str(p) for p in err["loc"])
        message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise APIError(422, f"{field}: {message}", param=field, code="invalid_value") from None


@dataclass(frozen=True)
class EngineInputs:
    """API inputs as ``Engine.tokenize`` takes them, and whether the request held a single input."""

    items: list[str | tuple[str, str] | list[int]]
    single: bool


def engine_inputs(value: Any, field: str, instruction: str | None) -> EngineInputs:
    """Read the input grammar: ``str`` | ``[int, ...]`` | ``[str | [int, ...] | [str, str], ...]``.

    ``instruction`` turns every text into an ``(instruction, text)`` pair; it cannot be combined with
    pairs or token ids (one prefix per input, and token ids are read as they are).
    """
    if isinstance(value, str):
        return EngineInputs([_text(value, instruction)], True)
    if isinstance(value, list) and value and all(_is_id(t) for t in value):
        if instruction is not None:
            raise APIError(422, f"{field}: instruction cannot apply to token ids", param=field, code="invalid_value")
        return EngineInputs([value], True)
    if not isinstance(value, list):
        raise APIError(422, f"{field}: expected a string or a list, got {_json_type(value)}", param=field,
                       code="invalid_type")
    if not value:
        raise APIError(422, f"{field}: must not be empty", param=field, code="invalid_value")
    items: list[str | tuple[str, str] | list[int]] = []
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if isinstance(item, str):
            items.append(_text(item, instruction))
        elif isinstance(item, list) and item and all(_is_id(t) for t in item):
            if instruction is not None:
                raise APIError(422, f"{where}: instruction cannot apply to token ids", param=where, code="invalid_value")
            items.append(item)
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(s, str) for s in item):
            if instruction is not None:
                raise APIError(422, f"{where}: give an [instruction, text] pair or the instruction field, not both",
                               param=where, code="invalid_value")
            items.append((item[0], item[1]))
        else:
            raise APIError(422, f"{where}: expected a string, a list of token ids or an [instruction, text] pair, "
                                f"got {_describe(item)}", param=where, code="invalid_type")
    return EngineInputs(items, False)


def _text(text: str, instruction: str | None) -> str | tuple[str, str]:
    return text if instruction is None else (instruction, text)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _describe(item: Any) -> str:
    if isinstance(item, list):
        return "an empty list" if not item else f"a list of {len(item)} items that is neither"
    return _json_type(item)


_ENGINE_INDEX = re.compile(r"^input (\d+): (.*)$", re.DOTALL)


def input_error(exc: Exception, field: str, single: bool) -> APIError:
    """An ``Engine.tokenize`` error (``input {i}: ...``) as a 422 naming ``field[i]``."""
    match = _ENGINE_INDEX.match(str(exc))
    if match is None:
        return APIError(422, f"{field}: {exc}", param=field, code="invalid_value")
    where = field if single else f"{field}[{match[1]}]"
    return APIError(422, f"{where}: {match[2]}", param=where, code="invalid_value")


def too_long_error(index: int, n_tokens: int, limit: int, field: str, single: bool) -> APIError:
    where = field if single else f"{field}[{index}]"
    return APIError(413, f"{where}: {n_tokens} tokens exceed the maximum input length of {limit} "
                         "(send truncate: true to truncate it)", param=where, code="input_too_long")


def openai_body(rows: np.ndarray, model: str, n_tokens: int, encoding_format: str) -> bytes:
    """OpenAI's embeddings response for float32 ``rows`` [n, dims]; base64 is little-endian float32."""
    if encoding_format == "base64":
        little = rows.astype("<f4", copy=False)
        data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(r.tobytes()).decode("ascii")}
                for i, r in enumerate(little)]
    else:
        data = [{"object": "embedding", "index": i, "embedding": r} for i, r in enumerate(rows)]
    body = {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def tei_body(rows: np.ndarray) -> bytes:
    """text-embeddings-inference's response: a JSON array of arrays (also for one input)."""
    return orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY)


def json_body(value: Any) -> bytes:
    return orjson.dumps(value)
