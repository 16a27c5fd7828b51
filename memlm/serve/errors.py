"""The server's error answers: OpenAI's error object, or Anthropic's on its paths (/v1/messages)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from memlm.serve.messages_api import anthropic_error


class APIError(Exception):
    """An error answered in OpenAI's shape. `code` is OpenAI's string code (e.g. "invalid_api_key"),
    or None as OpenAI sends for most errors: never the HTTP status."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, headers=None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers
        self.code = code


def error_response(status: int, message: str, type_: str, param: str | None = None, headers=None,
           code: str | None = None, path: str = "") -> JSONResponse:
    """OpenAI's error object; on Anthropic's paths (/v1/messages), Anthropic's."""
    if path.startswith("/v1/messages"):
        return JSONResponse(anthropic_error(status, message), status_code=status, headers=headers)
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)
