"""The wire protocol: request models, how API inputs become engine inputs, response bodies, errors.

Two request shapes share one input grammar:

- ``POST /v1/embeddings`` (OpenAI): ``input`` is a string, a list of token ids, or a list whose
  items are strings, token-id lists or ``[instruction, text]`` pairs (our extension, as are the
  ``instruction`` field and ``dimensions`` on every model).
- ``POST /embed`` (text-embeddings-inference): the same grammar under ``inputs``.

What a request may hold (:class:`InputLimits`: inputs, characters per input, characters in all) is
checked while the input grammar is read, before anything is tokenised: tokenising first is what a
request of a million one-character inputs would cost every other client.

Every error is an :class:`APIError` rendered in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``; ``param`` names the field, and for one input its
index (``input[3]``). Bodies are serialised with orjson: float32 rows go out in their shortest
round-trip form without a detour through Python floats.
"""
from __future__ import annotations

import base64
import json
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
    try:
        return orjson.dumps({"error": error})
    except TypeError:  # a lone surrogate from the body (an unknown field's name, say): orjson refuses it
        return json.dumps({"error": error}).encode("ascii")


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


# A \uD800-\uDFFF escape: JSON allows a lone one, pydantic's parser (and orjson) refuse it.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_request(model: type[_Request], body: bytes) -> Any:
    """Validate a JSON body: 400 when it is not JSON, 422 naming the first bad field otherwise.

    pydantic's parser refuses an escaped lone surrogate (``"\\ud800"``), which is valid JSON: such a
    body is parsed again by the standard library, so that the engine's rule for text that is not
    Unicode answers 422 naming the input. Only bodies that failed to parse take that slower path."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        if err["type"] != "json_invalid":
            raise _validation_error(err) from None
        value = _json_with_surrogates(body, err["msg"])
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise _validation_error(exc.errors(include_url=False)[0]) from None


def _json_with_surrogates(body: bytes, message: str) -> Any:
    """``body`` parsed by the standard library if it escapes a surrogate, else the 400 for ``message``."""
    if _SURROGATE_ESCAPE.search(body) is not None:
        try:
            return json.loads(body, parse_constant=_not_json)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            pass
    raise APIError(400, f"the body is not valid JSON ({message})", code="invalid_json")


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _validation_error(err: Any) -> APIError:
    """pydantic's first error as a 422 naming the field."""
    if err["type"] == "string_unicode" and not err["loc"]:  # a field name with a lone surrogate
        return APIError(422, "a field name is not valid Unicode text (an unpaired surrogate)", code="invalid_value")
    if err["type"] in ("model_type", "model_attributes_type") or not err["loc"]:
        return APIError(422, "the body must be a JSON object", code="invalid_type")
    field = ".".join(str(p) for p in err["loc"])
    message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
    return APIError(422, f"{field}: {message}", param=field, code="invalid_value")


@dataclass(frozen=True)
class InputLimits:
    """What one request may hold, checked while its inputs are read, before any is tokenised. Each
    refusal (413) names the option that sets the limit."""

    max_inputs: int  # --max-client-batch-size
    max_input_chars: int  # --max-input-chars: a text with its instruction and prompt; a token id counts one
    max_request_chars: int  # --max-request-chars: every input of the request, counted alike


@dataclass(frozen=True)
class EngineInputs:
    """API inputs as ``Engine.tokenize`` takes them, the size of each (characters with its
    instruction and prompt, or token ids), and whether the request held a single input."""

    items: list[str | tuple[str, str] | list[int]]
    sizes: list[int]
    single: bool


def engine_inputs(value: Any, field: str, instruction: str | None, limits: InputLimits, prompt: str = "") -> EngineInputs:
    """Read the input grammar: ``str`` | ``[int, ...]`` | ``[str | [int, ...] | [str, str], ...]``.

    ``instruction`` turns every text into an ``(instruction, text)`` pair; it cannot be combined with
    pairs or token ids (one prefix per input, and token ids are read as they are). ``prompt`` is what
    the engine will prepend to every text. The number of inputs is checked before any is looked at,
    each input's size and the running total as they are read (:class:`InputLimits`).
    """
    prefix = len(prompt) + (0 if instruction is None else len(instruction))
    if isinstance(value, str):
        size = _add_size(len(value) + prefix, 0, field, field, limits)
        return EngineInputs([_text(value, instruction)], [size], True)
    if isinstance(value, list) and value and all(_is_id(t) for t in value):
        if instruction is not None:
            raise APIError(422, f"{field}: instruction cannot apply to token ids", param=field, code="invalid_value")
        return EngineInputs([value], [_add_size(len(value), 0, field, field, limits)], True)
    if not isinstance(value, list):
        raise APIError(422, f"{field}: expected a string or a list, got {_json_type(value)}", param=field,
                       code="invalid_type")
    if not value:
        raise APIError(422, f"{field}: must not be empty", param=field, code="invalid_value")
    if len(value) > limits.max_inputs:
        raise APIError(413, f"{field}: {len(value)} inputs exceed the limit of {limits.max_inputs} per request "
                            "(--max-client-batch-size); split them into smaller requests", param=field,
                       code="too_many_inputs")
    items: list[str | tuple[str, str] | list[int]] = []
    sizes: list[int] = []
    total = 0
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if isinstance(item, str):
            items.append(_text(item, instruction))
            sizes.append(len(item) + prefix)
        elif isinstance(item, list) and item and all(_is_id(t) for t in item):
            if instruction is not None:
                raise APIError(422, f"{where}: instruction cannot apply to token ids", param=where, code="invalid_value")
            items.append(item)
            sizes.append(len(item))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(s, str) for s in item):
            if instruction is not None:
                raise APIError(422, f"{where}: give an [instruction, text] pair or the instruction field, not both",
                               param=where, code="invalid_value")
            items.append((item[0], item[1]))
            sizes.append(len(item[0]) + len(item[1]) + len(prompt))
        else:
            raise APIError(422, f"{where}: expected a string, a list of token ids or an [instruction, text] pair, "
                                f"got {_describe(item)}", param=where, code="invalid_type")
        total = _add_size(sizes[-1], total, where, field, limits)
    return EngineInputs(items, sizes, False)


def _add_size(size: int, total: int, where: str, field: str, limits: InputLimits) -> int:
    """The request's running size with one more input of ``size``; 413 naming the limit it exceeds."""
    if size > limits.max_input_chars:
        raise APIError(413, f"{where}: {size} characters exceed the limit of {limits.max_input_chars} per input "
                            "(--max-input-chars; an instruction or prompt counts, a token id counts as one)",
                       param=where, code="input_too_long")
    total += size
    if total > limits.max_request_chars:
        raise APIError(413, f"{field}: the request holds more than {limits.max_request_chars} characters, the limit "
                            "per request (--max-request-chars); split it into smaller requests", param=field,
                       code="request_too_large")
    return total


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


def input_error(exc: Exception, field: str, single: bool, offset: int = 0) -> APIError:
    """An ``Engine.tokenize`` error (``input {i}: ...``) for inputs from ``offset`` on, as a 422
    naming ``field[offset + i]``."""
    match = _ENGINE_INDEX.match(str(exc))
    if match is None:
        return APIError(422, f"{field}: {exc}", param=field, code="invalid_value")
    where = field if single else f"{field}[{offset + int(match[1])}]"
    return APIError(422, f"{where}: {match[2]}", param=where, code="invalid_value")


def too_long_error(index: int, n_tokens: int, limit: int, field: str, single: bool) -> APIError:
    where = field if single else f"{field}[{index}]"
    return APIError(413, f"{where}: {n_tokens} tokens exceed the maximum input length of {limit} "
                         "(send truncate: true to truncate it)", param=where, code="input_too_long")


def too_many_tokens_error(field: str, n_tokens: int, n_read: int, n_inputs: int, limit: int) -> APIError:
    """The request's first ``n_read`` inputs already hold ``n_tokens``, more than the queue admits."""
    return APIError(413, f"{field}: the request holds more than {limit} tokens, the most the queue admits "
                         f"(--max-queue-tokens): {n_tokens} in its first {n_read} of {n_inputs} inputs; "
                         "split it into smaller requests", param=field, code="request_too_large")


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
