"""OpenAI's format at other providers' addresses: Azure OpenAI and Gemini's compatible API.

Holds the routes and checks those providers put around chat completions: Azure's
deployment URL (``/openai/deployments/{deployment}/chat/completions?api-version=...``,
the model named by the deployment, an ``api-key`` header or a Bearer token, 404
``Resource not found`` without ``api-version``) and its v1 URL
(``/openai/v1/chat/completions``, the model in the body); Gemini's
``/v1beta/openai/chat/completions`` (a Bearer key; streams carry the running usage on
every chunk, a quirk clients must not sum). It must not hold the chat completions shapes
themselves (``openai_api``) or the pipeline (``hub``).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from rlm.testing.hub import Hub
from rlm.testing.openai_api import OpenAIWire, model_cards, parse_chat
from rlm.testing.wire import Payload, json_payload, respond

__all__ = ["add_routes"]


def _azure_error(status: int, message: str) -> Payload:
    # Azure's gateway answers with a string code, not OpenAI's type/param fields.
    return json_payload(status, {"error": {"code": str(status), "message": message}})


def _azure_auth(request: web.Request) -> Payload | None:
    headers = request.headers
    if headers.get("api-key") or headers.get("Authorization", "").startswith("Bearer "):
        return None
    return _azure_error(
        401,
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
        "provide a valid key for an active subscription and use a correct regional API "
        "endpoint for your resource.",
    )


def _gemini_auth(request: web.Request) -> Payload | None:
    if request.headers.get("Authorization", "").startswith("Bearer "):
        return None
    return json_payload(401, {"error": {
        "code": 401,
        "message": "Method doesn't allow unregistered callers (callers without established "
        "identity). Please use API Key or other form of API consumer identity to call this "
        "API.",
        "status": "UNAUTHENTICATED",
    }})


def add_routes(app: web.Application, hub: Hub, models: Callable[[], list[str]]) -> None:
    """Serve the Azure and Gemini chat completions routes on ``app``."""
    azure = OpenAIWire(hub.ids.__next__, hub.cache, protocol="azure")
    gemini = OpenAIWire(hub.ids.__next__, hub.cache, protocol="gemini", cumulative_usage=True)

    async def chat(
        request: web.Request, wire: OpenAIWire, refused: Payload | None, model: str | None
    ) -> web.StreamResponse:
        if refused is not None:
            return respond(refused)
        call = parse_chat(await request.read(), model or models()[0], wire.protocol)
        if isinstance(call, Payload):
            return respond(call)
        if model is not None:
            call.model = model
        entry = hub.log_entry(request, call, call.messages)
        return await hub.exchange(request, call, wire, entry)

    async def azure_deployment(request: web.Request) -> web.StreamResponse:
        refused = _azure_auth(request)
        if refused is None and not request.query.get("api-version"):
            refused = _azure_error(404, "Resource not found")
        return await chat(request, azure, refused, request.match_info["deployment"])

    async def azure_v1(request: web.Request) -> web.StreamResponse:
        return await chat(request, azure, _azure_auth(request), None)

    async def gemini_chat(request: web.Request) -> web.StreamResponse:
        return await chat(request, gemini, _gemini_auth(request), None)

    async def gemini_models(request: web.Request) -> web.StreamResponse:
        refused = _gemini_auth(request)
        if refused is not None:
            return respond(refused)
        return respond(json_payload(200, {"object": "list", "data": model_cards(models())}))

    app.router.add_post("/openai/deployments/{deployment}/chat/completions", azure_deployment)
    app.router.add_post("/openai/v1/chat/completions", azure_v1)
    app.router.add_post("/v1beta/openai/chat/completions", gemini_chat)
    app.router.add_get("/v1beta/openai/models", gemini_models)
