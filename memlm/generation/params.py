"""Per-request sampling parameters, validated once at the edge."""

from __future__ import annotations

from dataclasses import dataclass, field

from memlm.errors import InvalidRequestError

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs


@dataclass(slots=True)
class SamplingParams:
    """How one request samples and when it stops.

    temperature 0 means greedy. top_k 0 and top_p 1 and min_p 0 disable those filters.
    repetition_penalty follows the CTRL / Hugging Face rule (divide positive logits of seen
    tokens, multiply negative ones) over prompt and output tokens.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0  # end tokens (EOS, stop_token_ids) are masked out until this many
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: subtract from the logit of every token already generated ...
    frequency_penalty: float = 0.0  # ... and this much per time it was generated (output tokens only, as vLLM)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens
    logprobs: int | None = None  # report each chosen token's log-probability, and this many alternatives
    response_format: dict | None = None  # {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}
    logit_bias: dict[int, float] = field(default_factory=dict)  # OpenAI's: token id -> added to its logit

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise InvalidRequestError("min_new_tokens must be between 0 and max_new_tokens")
        if not self.temperature >= 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise InvalidRequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")
        if self.response_format is not None and not isinstance(self.response_format, dict):
            raise InvalidRequestError("response_format must be an object such as {'type': 'json_object'}")
        if any(not -100.0 <= v <= 100.0 for v in self.logit_bias.values()):
            raise InvalidRequestError("logit_bias values must be in [-100, 100]")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must not be empty")
