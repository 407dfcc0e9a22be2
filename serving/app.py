"""The Ray Serve application: a trained checkpoint behind `POST /v1/completions`, `GET /v1/models`,
`GET /healthz`, with dynamic batching (`serve.batch`) so concurrent requests share forward passes.

`build_app(args)` is the import path Ray's own `serve deploy` config uses (`serving.app:build_app`),
so the same application runs from `llmos serve deploy`, `serve deploy` and a RayService.
"""

# No `from __future__ import annotations` here: FastAPI reads these annotations at runtime, through
# Serve's ingress wrapper, and would take a string `Request` for a query parameter.
import asyncio
import codecs
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from jobs.checkpoint import META_FILE, latest_checkpoint, load_model
from jobs.data import encode
from serving.api import ApiError, CompletionRequest, completion_body, completion_id, models_body, parse_completion
from serving.decoding import BatchDecoder, Generation, Step
from serving.spec import ServeJob

api = FastAPI(title="llmos completions")
# The handler reads the raw body (to answer every malformed one with an OpenAI-style 4xx), so FastAPI
# cannot infer its schema; it is declared here, for clients and for fuzzing from the OpenAPI document.
COMPLETIONS_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": CompletionRequest.model_json_schema()}},
    }
}


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint folder, or the newest complete checkpoint inside a folder of them."""
    folder = Path(path)
    if (folder / META_FILE).exists():
        return folder
    newest = latest_checkpoint(folder) if folder.is_dir() else None
    if newest is None:
        raise FileNotFoundError(f"checkpoint: no checkpoint at {path}; train one first (python -m jobs.train ...)")
    return newest


def _error(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@serve.deployment(name="CompletionServer", max_ongoing_requests=64)
@serve.ingress(api)
class CompletionServer:
    def __init__(self, job: dict):
        self.job = ServeJob.model_validate(job)
        torch.set_num_threads(1)  # replicas share the node's cores; one thread each scales best here
        # Ray shows a replica only the GPUs it reserved; the local cluster's GPU pools are simulated: no CUDA.
        device = "cuda" if self.job.resources.gpus and torch.cuda.is_available() else "cpu"
        self.model = load_model(resolve_checkpoint(self.job.checkpoint), device=device)
        self.decoder = BatchDecoder(self.model)
        self.created = int(time.time())
        for batched in (self._complete, self._decode):
            batched.set_max_batch_size(self.job.batching.max_batch_size)
            batched.set_batch_wait_timeout_s(self.job.batching.wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _complete(self, generations: list[Generation]) -> list[tuple[list[int], str]]:
        """Whole completions for a batch: one result per request, no per-step traffic."""
        return self.decoder.complete(generations)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _decode(self, generations: list[Generation]) -> AsyncIterator[list]:
        """Step by step, for streaming requests."""
        for steps in self.decoder.stream(generations):
            # A finished request's slot carries StopIteration, which ends that caller's stream.
            yield [StopIteration if step is None else step for step in steps]
            await asyncio.sleep(0)  # let new requests queue for the next batch meanwhile

    def _generation(self, body: bytes) -> tuple[Generation, bool]:
        request = parse_completion(body, self.job.limits, self.job.name)
        prompt = encode(request.prompt)
        context = self.model.size.context_length
        if len(prompt) + request.max_tokens > context:
            raise ApiError(
                400,
                f"prompt ({len(prompt)} bytes) + max_tokens ({request.max_tokens}) exceeds the model's context of "
                f"{context}; shorten the prompt or ask for fewer tokens",
                "max_tokens",
            )
        generation = Generation(
            prompt=prompt,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=[encode(sequence) for sequence in request.stop],
            seed=request.seed,
        )
        return generation, request.stream

    async def _body(self, request: Request) -> bytes:
        """The body, read no further than the limit: a chunked upload declares no length up front."""
        limit = self.job.limits.max_body_bytes
        declared = int(request.headers.get("content-length") or 0)
        if declared > limit:
            raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over {limit} bytes, the limit")
            chunks.append(chunk)
        return b"".join(chunks)

    @api.post("/v1/completions", openapi_extra=COMPLETIONS_OPENAPI)
    async def completions(self, request: Request) -> Response:
        try:
            generation, stream = self._generation(await self._body(request))
        except ApiError as error:
            return _error(error)
        request_id = completion_id()
        if stream:
            return StreamingResponse(self._events(request_id, self._decode(generation)), media_type="text/event-stream")
        tokens, finish_reason = await self._complete(generation)
        usage = {
            "prompt_tokens": len(generation.prompt),
            "completion_tokens": len(tokens),
            "total_tokens": len(generation.prompt) + len(tokens),
        }
        text = bytes(tokens).decode("utf-8", errors="replace")
        return JSONResponse(completion_body(request_id, self.job.name, text, finish_reason, usage))

    async def _events(self, request_id: str, steps: AsyncIterator[Step]) -> AsyncIterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        async for step in steps:
            text = decoder.decode(bytes(step.tokens), final=step.finish_reason is not None)
            if text or step.finish_reason:
                chunk = completion_body(request_id, self.job.name, text, step.finish_reason)
                yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        return JSONResponse(models_body(self.job.name, self.created))

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.job.name})


def build_app(args: dict):
    """Application builder for Ray's `serve deploy` config: `import_path: serving.app:build_app`."""
    return CompletionServer.bind(args["job"])
