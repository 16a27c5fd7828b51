"""/openapi.json as the server behaves: FastAPI documents a 422 validation error the server never
sends (it answers 400 in OpenAI's error shape) and knows nothing of the bearer key, 401, 404, 413 or
503. This rewrites the generated document once, on first request."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"], "description": "OpenAI's string code, or null"},
            },
        }
    },
}

_MEANING = {
    "400": "Invalid request (bad JSON, a parameter out of range, a prompt longer than the context)",
    "401": "Missing or invalid API key (Authorization: Bearer KEY)",
    "404": "Unknown model or memory",
    "413": "Request body over the server's limit (--max-body-bytes)",
    "503": "The model is loading, or the queue is full (see Retry-After)",
}
_OPEN = {"/health", "/", "/openapi.json"}  # never need the key


def document_errors(app: FastAPI, metrics_public: bool = False) -> None:
    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        schemas["Error"] = _ERROR
        components["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "Only when started with --api-key"}
        }
        for path, methods in schema.get("paths", {}).items():
            for method, operation in methods.items():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                codes = ["503"] if path != "/" else []
                if method == "post":
                    codes += ["400", "413"]
                if path not in _OPEN and not (path == "/metrics" and metrics_public):
                    codes.append("401")
                    operation["security"] = [{"bearer": []}]
                if path.startswith("/v1/") and method == "post" or path in ("/tokenize", "/detokenize"):
                    codes.append("404")
                for code in sorted(codes):
                    responses[code] = {"description": _MEANING[code], "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
