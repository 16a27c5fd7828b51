"""The OpenAI request bodies memlm accepts, and their translation into engine requests.

Field names and meanings follow OpenAI's API (and vLLM's extensions: top_k, min_p,
repetition_penalty). memlm's own extras: `kv_policy`, `kv_budget` and `kv_options` (the request's
working memory: the other options of memlm.cache.spec.PolicySpec, e.g. {"spans": true}), `memory`
(a latent memory the server loaded with --memory), `return_memory_trace`.
Unknown fields are ignored, as OpenAI-compatible servers do, so clients that send more still work.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from memlm.generation.params import MAX_LOGPROBS, SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

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
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=16)
    min_tokens: int = Field(default=0, ge=0)  # vLLM's: end tokens are masked until this many
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    # memlm: memory per request
    kv_policy: str | None = None
    kv_budget: int | None = Field(default=None, ge=1)
    kv_options: dict[str, Any] | None = None  # PolicySpec's other fields: window, ratio, rescore, spans, ...
    memory: str | None = None
    return_memory_trace: bool = False

    def sampling_params(self, default_max_tokens: int, choice: int, logprobs: int | None) -> SamplingParams:
        """The engine's parameters for choice number `choice` of this request: with a seed, choice i
        samples with seed + i, so n choices differ and each is reproducible."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
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
            seed=None if self.seed is None else self.seed + choice,
            logprobs=logprobs,
            response_format=self.response_format if _constrains(self.response_format) else None,
        )

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _constrains(response_format: dict | None) -> bool:
    return bool(response_format) and response_format.get("type") != "text"


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """Content as text: a list of parts keeps its text parts (images are not supported)."""
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        role = {"developer": "system"}  # OpenAI's newer name for the system role
        return [{"role": role.get(m.role, m.role), "content": m.text()} for m in self.messages]

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]
