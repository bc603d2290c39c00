"""`dllm api`: an OpenAI-compatible HTTP API over the swarm client.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with `stream: true`
as server-sent events ending in `data: [DONE]`), POST /v1/feedback (a training example for the
swarm's adapters). Bad requests get OpenAI's error envelope with status 400; a failure of the swarm
while serving gets 503; no single request can take the server down.

With API keys (`dllm api --api-keys FILE`: lines `API_KEY CHAIN_KEY`, swarm/contributors.py), every /v1
request needs `Authorization: Bearer API_KEY` (a missing or unknown key gets 401), and each user's
feedback is signed with the chain key mapped to its API key, so peers rate-limit and aggregate every
user behind the API as its own contributor. Without keys, all feedback is signed by one account.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from chain.errors import UnavailableError
from swarm import openai_schema as schema
from swarm.chat import ChatMessage, chat_prompt_ids, context_limit
from swarm.contributors import ContributorKey, load_api_keys
from swarm.feedback_records import FeedbackRecordError
from swarm.http_server import HttpService
from swarm.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    UnsupportedParameterError,
)
from swarm.protocol import ProtocolError
from swarm.sampling import GenerationParams

if TYPE_CHECKING:
    from swarm.client import ClientConfig

logger = logging.getLogger(__name__)


class ResultStream(Protocol):
    """Text pieces of one generation (`async for`); then `result`, that request's own GenerationResult."""

    result: Any

    def __aiter__(self) -> AsyncIterator[str]: ...


class TextGenerator(Protocol):
    """What the API needs from a model; `swarm.client.DistributedModel` satisfies it. One model serves
    concurrent requests: each request's result comes back with that request, never as state on the model."""

    model_name: str
    tokenizer: Any

    async def agenerate(self, prompt: str | list[int], params: GenerationParams) -> Any: ...

    def astream(self, prompt: str | list[int], params: GenerationParams) -> ResultStream: ...


class BadRequestError(ProtocolError):
    """A request that is well-formed JSON but cannot be served as asked (answered with 400)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=schema.error_body(message, kind, param, code))


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """One readable line from pydantic's error list, e.g. "messages.0.role: Input should be 'system', ..."."""
    problems = []
    first_param = None
    for item in error.errors()[:3]:
        if item.get("type") == "json_invalid":
            detail = (item.get("ctx") or {}).get("error", "")
            return f"the request body is not valid JSON ({detail} at position {item['loc'][-1]})", None
        if tuple(item.get("loc", ())) == ("body",):
            return "the request body must be a JSON object (send Content-Type: application/json)", None
        location = [str(part) for part in item.get("loc", ()) if part != "body"]
        where = ".".join(location)
        first_param = first_param or (location[0] if location else None)
        problems.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
    return "; ".join(problems) or "invalid request body", first_param


def _chat_prompt(model: TextGenerator, request: ChatCompletionRequest) -> list[int]:
    """The messages through the model's chat template (swarm/chat.py), as token ids."""
    return chat_prompt_ids(model.tokenizer, [ChatMessage(m.role, m.text()) for m in request.messages])


def _generation_params(request: schema.SamplingFields, max_tokens: int) -> GenerationParams:
    request.check_supported()
    return GenerationParams(
        max_new_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=request.stop_list(),
        seed=request.seed,
    )


def _check_prompt(model: TextGenerator, prompt: str | list[int], max_tokens: int) -> None:
    """Rejects empty prompts and ones that, with `max_tokens`, overflow the model's context."""
    count = len(prompt) if isinstance(prompt, list) else len(model.tokenizer(prompt)["input_ids"])
    if count == 0 or not prompt:
        raise BadRequestError("the prompt is empty", param="prompt")
    limit = context_limit(getattr(model, "config", None))
    if limit is not None and count + max_tokens > limit:
        raise BadRequestError(
            f"the prompt ({count} tokens) plus max_tokens ({max_tokens}) exceeds the model's context of {limit} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )


def create_app(
    model: TextGenerator, api_keys: dict[str, ContributorKey] | None = None, share_prompts: bool = False
) -> FastAPI:
    """The FastAPI application serving `model` under OpenAI's routes; with `api_keys` (API key -> the chain
    key its user's feedback is signed with) every /v1 request needs a known bearer key. With `share_prompts`
    (`dllm api --share-prompts`; default private) each answered prompt is published with its answer, signed by
    the user's account (kind "shared-prompt", docs/data.md)."""
    app = FastAPI(title="DLLM OpenAI-compatible API", docs_url=None, redoc_url=None)
    if api_keys is not None:
        _add_api_key_check(app, api_keys)
    _add_error_handlers(app)
    _add_model_routes(app, model)
    sharing = _PromptSharing(model) if share_prompts else None
    _add_completion_routes(app, model, sharing)
    _add_feedback_route(app, model)
    return app


def _add_api_key_check(app: FastAPI, api_keys: dict[str, ContributorKey]) -> None:
    """401 for a /v1 request without a known `Authorization: Bearer` key; else the key's contributor is
    the request's (`request.state.contributor`)."""

    @app.middleware("http")
    async def require_key(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        if request.url.path.startswith("/v1"):
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            contributor = api_keys.get(key.strip()) if scheme.lower() == "bearer" else None
            if contributor is None:
                message = "a valid API key is required (Authorization: Bearer ...)"
                return _error(401, message, "invalid_request_error", code="invalid_api_key")
            request.state.contributor = contributor
        return await call_next(request)


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure is answered in OpenAI's error shape; a swarm failure is a 503, never a crash."""

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(UnsupportedParameterError)
    async def on_unsupported(_: Request, error: UnsupportedParameterError) -> JSONResponse:
        return _error(400, str(error), "invalid_request_error", error.param)

    @app.exception_handler(BadRequestError)
    async def on_bad_request(_: Request, error: BadRequestError) -> JSONResponse:
        return _error(error.status, str(error), "invalid_request_error", error.param, error.code)

    @app.exception_handler(404)
    async def on_not_found(request: Request, _: Exception) -> JSONResponse:
        return _error(404, f"no route {request.method} {request.url.path}", "invalid_request_error")

    @app.exception_handler(405)
    async def on_bad_method(request: Request, _: Exception) -> JSONResponse:
        return _error(405, f"{request.method} is not allowed on {request.url.path}", "invalid_request_error")

    @app.exception_handler(Exception)
    async def on_failure(_: Request, error: Exception) -> JSONResponse:
        if isinstance(error, SwarmUnavailableError):
            return _error(503, str(error), "server_error", code="swarm_unavailable")
        logger.exception("unexpected error")
        return _error(500, f"internal error: {type(error).__name__}: {error}", "server_error")


def _check_model(model: TextGenerator, name: str | None) -> None:
    if name is not None and name != model.model_name:
        raise BadRequestError(
            f"the model {name!r} does not exist here; this swarm serves {model.model_name!r}",
            param="model",
            status=404,
            code="model_not_found",
        )


async def _run_generation(call: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await call()
    except (BadRequestError, UnsupportedParameterError):
        raise
    except Exception as error:  # any swarm failure: the request fails, the server lives
        logger.warning("generation failed: %s: %s", type(error).__name__, error)
        raise SwarmUnavailableError(
            f"the swarm could not serve this request: {type(error).__name__}: {error}"
        ) from error


def _add_model_routes(app: FastAPI, model: TextGenerator) -> None:
    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return schema.model_list(model.model_name, schema.now())

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        _check_model(model, name)
        entry: dict[str, Any] = schema.model_list(model.model_name, schema.now())["data"][0]
        return entry


class _PromptSharing:
    """Publishes answered prompts in the background (`--share-prompts`): a failure to publish is logged, the
    answer is already the user's."""

    def __init__(self, model: TextGenerator) -> None:
        self.model = model
        self._tasks: set[asyncio.Task[None]] = set()

    def share(self, prompt: str | list[int], completion: str, http: Request) -> None:
        contributor: ContributorKey | None = getattr(http.state, "contributor", None)  # the user's, with --api-keys
        text = prompt if isinstance(prompt, str) else self.model.tokenizer.decode(prompt)
        task = asyncio.create_task(self._share(text, completion, contributor))
        self._tasks.add(task)  # held: the loop keeps only weak references to running tasks
        task.add_done_callback(self._tasks.discard)

    async def _share(self, prompt: str, completion: str, contributor: ContributorKey | None) -> None:
        share = getattr(self.model, "ashare_prompt", None)
        if share is None:
            logger.warning("this swarm client cannot share prompts")
            return
        try:
            signed_by = {"contributor": contributor} if contributor is not None else {}
            await share(prompt, completion, **signed_by)
        except Exception as error:  # best effort: the answer was served
            logger.warning("sharing a prompt failed: %s: %s", type(error).__name__, error)


def _add_completion_routes(app: FastAPI, model: TextGenerator, sharing: _PromptSharing | None = None) -> None:
    def shared(prompt: str | list[int], http: Request) -> Callable[[str], None] | None:
        if sharing is None:
            return None
        return lambda completion: sharing.share(prompt, completion, http)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: CompletionRequest, http: Request) -> Any:
        _check_model(model, request.model)
        prompt = request.single_prompt()
        params = _generation_params(request, request.max_tokens)
        _check_prompt(model, prompt, request.max_tokens)
        request_id, created = schema.new_id("cmpl"), schema.now()
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)

            def chunk(text: str, finish: str | None, usage: dict[str, int] | None = None) -> dict[str, Any]:
                return schema.completion_body(request_id, model.model_name, text, finish, usage, created)

            events = _stream_events(
                model, prompt, params, chunk, include_usage, usage_chunk=None, on_done=shared(prompt, http)
            )
            return EventSourceResponse(events, ping=15)
        result = await _run_generation(lambda: model.agenerate(prompt, params))
        if sharing is not None:
            sharing.share(prompt, result.text, http)
        return schema.completion_body(
            request_id,
            model.model_name,
            result.text,
            result.finish_reason,
            schema.usage(result.prompt_tokens, result.completion_tokens),
            created,
        )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: ChatCompletionRequest, http: Request) -> Any:
        _check_model(model, request.model)
        prompt = _chat_prompt(model, request)
        max_tokens = request.token_budget()
        params = _generation_params(request, max_tokens)
        _check_prompt(model, prompt, max_tokens)
        request_id, created = schema.new_id("chatcmpl"), schema.now()
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)

            def chunk(text: str, finish: str | None, usage: dict[str, int] | None = None) -> dict[str, Any]:
                delta = {"content": text} if text or finish is None else {}
                return schema.chat_chunk(request_id, model.model_name, created, delta, finish)

            def usage_chunk(usage: dict[str, int]) -> dict[str, Any]:
                return schema.chat_chunk(request_id, model.model_name, created, None, None, usage)

            first = schema.chat_chunk(request_id, model.model_name, created, {"role": "assistant", "content": ""}, None)
            events = _stream_events(
                model, prompt, params, chunk, include_usage, usage_chunk, first, shared(prompt, http)
            )
            return EventSourceResponse(events, ping=15)
        result = await _run_generation(lambda: model.agenerate(prompt, params))
        if sharing is not None:
            sharing.share(prompt, result.text, http)
        return schema.chat_body(
            request_id,
            model.model_name,
            result.text,
            result.finish_reason,
            schema.usage(result.prompt_tokens, result.completion_tokens),
            created,
        )


def _add_feedback_route(app: FastAPI, model: TextGenerator) -> None:
    @app.post("/v1/feedback")
    async def feedback(request: FeedbackRequest, http: Request) -> dict[str, Any]:
        _check_model(model, request.model)
        contributor: ContributorKey | None = getattr(http.state, "contributor", None)  # set by the API key check
        signed_by = {"contributor": contributor} if contributor is not None else {}
        submit = getattr(model, "afeedback", None)
        blocking = getattr(model, "feedback", None)
        if submit is None and blocking is None:
            raise BadRequestError("this swarm client cannot take feedback", status=501, code="not_implemented")

        async def send() -> Any:
            try:
                if submit is not None:
                    return await submit(request.prompt, request.completion, **signed_by)
                assert blocking is not None  # one of the two exists: checked above
                return await asyncio.to_thread(blocking, request.prompt, request.completion, **signed_by)
            except FeedbackRecordError as error:  # the example cannot be published (too big): the user's to fix
                raise BadRequestError(str(error), param="completion", code="invalid_feedback") from None

        outcome = await _run_generation(send)
        return {"object": "feedback", "accepted": True, "result": _jsonable(outcome)}


class SwarmUnavailableError(UnavailableError, RuntimeError):
    """The swarm failed while serving a request (no route, peers gone, timeouts): answered with 503."""


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


async def _stream_events(
    model: TextGenerator,
    prompt: str | list[int],
    params: GenerationParams,
    chunk: Callable[..., dict[str, Any]],
    include_usage: bool,
    usage_chunk: Callable[[dict[str, int]], dict[str, Any]] | None,
    first: dict[str, Any] | None = None,
    on_done: Callable[[str], None] | None = None,
) -> AsyncIterator[dict[str, str]]:
    """SSE events of one streamed generation: deltas, a final chunk with finish_reason, usage, [DONE];
    `on_done` gets the whole answer once it streamed (--share-prompts)."""
    if first is not None:
        yield {"data": json.dumps(first)}
    stream = model.astream(prompt, params)
    try:
        async for delta in stream:
            yield {"data": json.dumps(chunk(delta, None))}
    except asyncio.CancelledError:
        raise
    except Exception as error:  # report in-band: the HTTP status is already sent
        logger.warning("streamed generation failed: %s: %s", type(error).__name__, error)
        message = f"the swarm could not serve this request: {type(error).__name__}: {error}"
        yield {"data": json.dumps(schema.error_body(message, "server_error", code="swarm_unavailable"))}
        yield {"data": "[DONE]"}
        return
    result = stream.result
    if on_done is not None:
        on_done(result.text)
    usage = schema.usage(result.prompt_tokens, result.completion_tokens)
    final = chunk("", result.finish_reason, usage if include_usage and usage_chunk is None else None)
    yield {"data": json.dumps(final)}
    if include_usage and usage_chunk is not None:
        yield {"data": json.dumps(usage_chunk(usage))}
    yield {"data": "[DONE]"}


class ApiService(HttpService):
    """`dllm api` as a service (dllm/service.py): a swarm client (its DHT process) and the HTTP server.

    Binding the port comes first (swarm/http_server.py), so a busy port fails before joining the swarm.
    """

    def __init__(
        self,
        model_path: Path,
        initial_peers: Sequence[str],
        host: str = "127.0.0.1",
        port: int = 8000,
        client_config: ClientConfig | None = None,
        api_keys_file: Path | None = None,
    ) -> None:
        super().__init__(host, port)
        self.model_path = model_path
        # Read now: a bad file fails `dllm api` before it joins the swarm.
        self.api_keys = load_api_keys(api_keys_file) if api_keys_file is not None else None
        self.client_config = client_config  # None: ClientConfig's defaults (no stake check)
        self.initial_peers = list(initial_peers)
        self.model: Any = None

    @property
    def ready_line(self) -> str:
        """What `dllm api` prints once serving (tests parse it)."""
        assert self.http is not None and self.model is not None
        return f"DLLM API serving {self.model.model_name} at {self.http.url}/v1"

    async def _open_app(self) -> FastAPI:
        """Joins the swarm as a client; the OpenAI-compatible app over it."""
        from swarm.client import DistributedModel

        self.model = await asyncio.to_thread(
            DistributedModel.from_pretrained, str(self.model_path), self.initial_peers, config=self.client_config
        )
        self._resources.push_async_callback(asyncio.to_thread, self.model.close)
        share = self.client_config is not None and self.client_config.share_prompts
        return create_app(self.model, self.api_keys, share_prompts=share)
