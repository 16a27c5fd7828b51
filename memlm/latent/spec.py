"""One weaver spec: every option of a latent memory's shape, checked once.

`memlm train weaver` builds a `WeaverSpec` from its flags, `WeaverConfig` carries it,
`LatentMemory.create(engine, spec)` builds the weaver from it, and latent_memory.json holds its
fields (the same keys as before the spec existed, so committed memories still load). What needs
the model (the weaver's layers against the reasoner's, adapters already on it) is checked where
the model is: in `Weaver`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from memlm.errors import MemlmError
from memlm.latent.delimiters import DEFAULT_DELIMITERS

WEAVER_INITS = ("random", "delimiter", "gated")
WEAVER_INPUTS = ("embeddings", "states")
WEAVER_OUTPUTS = ("embeddings", "kv")


@dataclass(frozen=True, slots=True)
class WeaverSpec:
    prompt_latents: int = 8  # latents inserted after the prompt
    inference_latents: int = 8  # latents inserted at a delimiter
    lora_rank: int = 16  # the weaver's LoRA
    lora_alpha: float = 32.0
    trigger: str = "always"  # always, never, learned (checked by make_trigger)
    max_prompt_aug: int = 1  # insertions after the prompt (0 or 1)
    max_inference_aug: int = 8  # most insertions per answer
    delimiters: tuple[str, ...] = DEFAULT_DELIMITERS  # insertion points: after a token ending in one of these
    weaver_layers: int | None = None  # None: all of the reasoner's layers
    init: str = "random"  # or "delimiter" (copies of the delimiter's embedding) or "gated" (those + a shut gate)
    weaver_input: str = "embeddings"  # or "states": the queries read the reasoner's own KV cache
    weaver_output: str = "embeddings"  # or "kv": the queries' keys and values stay in that cache

    def __post_init__(self):
        object.__setattr__(self, "delimiters", tuple(self.delimiters))
        if any(not d for d in self.delimiters):
            raise MemlmError("--delimiter must not be empty")
        if self.init not in WEAVER_INITS:
            raise MemlmError(f"unknown weaver init {self.init!r}; choose from {', '.join(WEAVER_INITS)}")
        if self.weaver_input not in WEAVER_INPUTS:
            raise MemlmError(f"unknown weaver input {self.weaver_input!r}; choose from {', '.join(WEAVER_INPUTS)}")
        if self.weaver_output not in WEAVER_OUTPUTS:
            raise MemlmError(
                f"unknown weaver output {self.weaver_output!r}; choose from {', '.join(WEAVER_OUTPUTS)}"
            )
        kv = self.weaver_output == "kv"
        if kv and (self.weaver_input != "states" or self.weaver_layers is not None or self.init == "gated"):
            # its slots live in the reasoner's cache, so they need a key and value at every layer
            raise MemlmError(
                "--weaver-output kv needs --weaver-input states, all layers and an ungated init "
                "(a weaver that writes keys and values reads the reasoner's states, at all layers, ungated)"
            )

    @classmethod
    def of(cls, num_layers: int, **options) -> WeaverSpec:
        """A spec from keyword options, for a reasoner of `num_layers` layers: `weaver_layers` equal
        to all of them means the whole reasoner (None), as a saved memory writes it."""
        if options.get("weaver_layers") == num_layers:
            options["weaver_layers"] = None
        return cls(**options)

    def to_json(self, num_layers: int) -> dict:
        """The fields as latent_memory.json holds them (the weaver's layers counted out)."""
        out = asdict(self)
        out["delimiters"] = list(self.delimiters)
        out["weaver_layers"] = self.weaver_layers or num_layers
        return out

    @classmethod
    def from_json(cls, config: dict, num_layers: int) -> WeaverSpec:
        """The spec of a saved memory's config (KeyError / ValueError / TypeError where it is not one).
        The shape keys are required; the later ones default to what memories before them meant."""
        defaults = {f.name: f.default for f in fields(cls)}
        options = {k: config[k] for k in ("prompt_latents", "inference_latents", "lora_rank", "lora_alpha")}
        for key in ("trigger", "max_prompt_aug", "max_inference_aug", "init", "weaver_input", "weaver_output"):
            options[key] = config.get(key, defaults[key])
        for key in ("init", "weaver_input", "weaver_output"):
            options[key] = str(options[key])
        options["delimiters"] = tuple(config.get("delimiters", DEFAULT_DELIMITERS))
        layers = config.get("weaver_layers")
        options["weaver_layers"] = None if layers is None else int(layers)
        return cls.of(num_layers, **options)
