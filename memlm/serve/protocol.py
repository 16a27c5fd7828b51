"""The OpenAI request bodies memlm accepts, and their translation into engine requests.

Field names and meanings follow OpenAI's API (and vLLM's extensions: top_k, min_p,
repetition_penalty). memlm's own extras: `kv_policy`, `kv_budget` and `kv_options` (the request's
working memory: the other options of memlm.cache.spec.PolicySpec, e.g. {"spans": true}), `memory`
(a latent memory the server loaded with --memory), `return_memory_trace`.
Unknown fields are ignored, as OpenAI-compatible servers do, so clients that send more still work.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from memlm.errors import InvalidRequestError
from memlm.generation.params import MAX_LOGPROBS, SamplingParams

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


class _Body(BaseModel):
    """A request body: unknown fields ignored; no text may hold a lone UTF-16 surrogate (JSON lets
    "\\ud800" through, the tokenizer cannot encode it)."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="after")
    def _no_lone_surrogates(self):
        _check_text(self.__dict__, "")
        return self


def _check_text(value, where: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where or 'text'} holds a lone surrogate (not valid Unicode text)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where)
            _check_text(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        if value and isinstance(value[0], int):  # token ids: nothing to check
            return
        for i, item in enumerate(value):
            _check_text(item, f"{where}[{i}]")
    elif isinstance(value, BaseModel):
        _check_text(value.__dict__, where)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(_Body):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # -1 or 0: off (vLLM uses -1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int = Field(default=1, ge=1, le=16)
    min_tokens: int = Field(default=0, ge=0)  # vLLM's: end tokens are masked until this many
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's shape) -> bias in [-100, 100]
    user: str | None = None
    # memlm: memory per request
    kv_policy: str | None = None
    kv_budget: int | None = Field(default=None, ge=1)
    kv_options: dict[str, Any] | None = None  # PolicySpec's other fields: window, ratio, rescore, spans, ...
    kv_press: str | None = None  # compress the prompt once after its prefill (memlm.cache.presses)
    kv_press_ratio: float | None = None  # the share of the prompt's KV the press removes
    memory: str | None = None
    return_memory_trace: bool = False

    @model_validator(mode="after")
    def _known_response_format(self):
        kind = (self.response_format or {}).get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"response_format.type must be text, json_object or json_schema, not {kind!r}")
        return self

    def sampling_params(self, default_max_tokens: int, choice: int, logprobs: int | None,
                        response_format: dict | None = None) -> SamplingParams:
        """The engine's parameters for choice number `choice` of this request: with a seed, choice i
        samples with seed + i (wrapping within the seed's range), so n choices differ and each is
        reproducible. `response_format` overrides the body's (a tool-call grammar)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        seed = None
        if self.seed is not None:
            low, high = SEED_RANGE
            seed = (self.seed + choice - low) % (high - low + 1) + low
        if response_format is None and _constrains(self.response_format):
            response_format = self.response_format
        return SamplingParams(
            max_new_tokens=max(self.max_output_tokens or default_max_tokens, self.min_tokens),
            min_new_tokens=self.min_tokens,
            temperature=self.temperature,
            top_k=max(self.top_k, 0),
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=stop,
            seed=seed,
            logprobs=logprobs,
            response_format=response_format,
            logit_bias=self.token_bias(),
        )

    def token_bias(self) -> dict[int, float]:
        """logit_bias with integer keys (range checked against the vocabulary by the caller)."""
        out = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise InvalidRequestError(f"logit_bias keys are token ids, got {key!r}")
            out[int(key)] = value
        return out

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _constrains(response_format: dict | None) -> bool:
    return bool(response_format) and response_format.get("type") != "text"


class CompletionRequest(_Common):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [list(p)]
        return list(p)


class ToolCallFunction(_Body):
    name: str
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    @model_validator(mode="after")
    def _content_is_text(self):
        if isinstance(self.content, list):
            for part in self.content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"content parts of type {kind!r} are not supported (text only)")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content: null is only for an assistant turn with tool_calls")
        return self

    def text(self) -> str:
        """Content as text: a list of text parts joined."""
        if isinstance(self.content, list):
            return "".join(part["text"] for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    tools: list[dict[str, Any]] | None = None  # [{"type": "function", "function": {name, description, parameters}}]
    tool_choice: str | dict[str, Any] | None = None  # "auto" | "none" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> list[dict[str, Any]]:
        """The messages as the chat template takes them (tool calls and tool results kept)."""
        role = {"developer": "system"}  # OpenAI's newer name for the system role
        out = []
        for m in self.messages:
            message: dict[str, Any] = {"role": role.get(m.role, m.role), "content": m.text()}
            if m.tool_calls:
                message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                message["name"] = m.name
            out.append(message)
        return out

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None  # with messages: rendered as a chat request with them would be
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[StrictInt]


class EmbeddingRequest(_Body):
    """OpenAI's /v1/embeddings body. `dimensions` must equal the model's (mean pooling cannot be cut
    shorter without a model trained for it)."""

    model: str | None = None
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        """One entry per input: text, or token ids."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and all(isinstance(t, int) for t in value):
            return [list(value)]
        return list(value)
