"""The OpenAI-style completions API: request parsing with limits, responses, errors. No Ray, no HTTP server.

Every bad request becomes an `ApiError` (status + OpenAI error body) before it reaches the model.
"""

from __future__ import annotations

import json
import time
import uuid

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cluster.spec import describe_validation_error
from serving.spec import Limits

MAX_STOP_SEQUENCES = 4
DEFAULT_MAX_TOKENS = 16  # OpenAI's


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="Model id, as listed by GET /v1/models.")
    prompt: str = Field(..., description="Text to continue.")
    max_tokens: int | None = Field(
        None, strict=True, description=f"Most tokens (bytes) to generate; {DEFAULT_MAX_TOKENS}, or the limit if lower."
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, description="Up to 4 sequences that end the completion.")
    stream: bool = Field(False, description="Send the completion as server-sent events.")
    seed: int | None = Field(None, ge=0, le=2**64 - 1, strict=True, description="Makes sampling repeatable.")
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_or_several(cls, stop: object) -> object:
        """OpenAI accepts one string, a list of strings, or null."""
        if stop is None:
            return []
        return [stop] if isinstance(stop, str) else stop

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, sequences: list[str]) -> list[str]:
        if len(sequences) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(sequence == "" for sequence in sequences):
            raise ValueError("a stop sequence cannot be empty")
        for sequence in sequences:
            _encodable(sequence)
        return sequences

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, prompt: str) -> str:
        return _encodable(prompt)


def _encodable(text: str) -> str:
    """`text`, if it is text UTF-8 can carry: JSON's \\u escapes can spell a lone surrogate half."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"holds a lone UTF-16 surrogate (\\u{ord(text[error.start]):04x}) at character {error.start}; "
            "send whole characters"
        ) from None
    return text


def parse_completion(body: bytes, limits: Limits, model_id: str) -> CompletionRequest:
    """The request in `body`, or an ApiError naming what is wrong and the limit it broke."""
    if len(body) > limits.max_body_bytes:
        raise ApiError(413, f"request body is {len(body)} bytes; the limit is {limits.max_body_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, f"request body is not UTF-8 (byte {error.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ApiError(400, f"request body is not valid JSON: {error.msg} at line {error.lineno}") from None
    except ValueError as error:  # an integer of more digits than Python converts
        raise ApiError(400, f"request body is not usable JSON: {error}") from None
    except RecursionError:
        raise ApiError(400, "request body is not usable JSON: it nests too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        request = CompletionRequest.model_validate(data)
    except ValidationError as error:
        problems = describe_validation_error(error, CompletionRequest)
        first = error.errors()[0]["loc"]
        raise ApiError(400, "; ".join(problems), param=str(first[0]) if first else None) from None
    if request.model != model_id:
        raise ApiError(404, f"model {request.model!r} does not exist; this server serves {model_id!r}", "model")
    if request.max_tokens is None:
        request.max_tokens = min(DEFAULT_MAX_TOKENS, limits.max_tokens)
    if not 1 <= request.max_tokens <= limits.max_tokens:
        raise ApiError(
            400, f"max_tokens must be between 1 and {limits.max_tokens}, got {request.max_tokens}", "max_tokens"
        )
    prompt_bytes = len(request.prompt.encode("utf-8"))
    if prompt_bytes == 0:
        raise ApiError(400, "prompt is empty", "prompt")
    if prompt_bytes > limits.max_prompt_bytes:
        raise ApiError(400, f"prompt is {prompt_bytes} bytes; the limit is {limits.max_prompt_bytes}", "prompt")
    return request


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def completion_body(
    request_id: str, model_id: str, text: str, finish_reason: str | None, usage: dict | None = None
) -> dict:
    body = {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def models_body(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "llmos"}]}
