"""One KV-policy spec: every option a user can give a policy, checked once, built into a KVPolicy.

The command line (`--kv-*`), `memlm bench kv`, the server's request fields (`kv_policy`,
`kv_budget`, `kv_options`, `kv_press`, `kv_press_ratio`) and the Python API
(`Engine.generate(kv_policy=PolicySpec(...))`) all go through `PolicySpec`, so a new policy option
is a field here, its row in `OPTION_GROUPS`, and its command-line flag. A press (`press`,
`press_ratio`) rides on the policy it builds (memlm.cache.press_hook).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, fields

from memlm.cache.importance import load_predictor
from memlm.cache.policies import POLICIES, SPAN_POLICIES, FullPolicy, KVPolicy, make_policy, span_unit
from memlm.cache.presses import check_press, make_press
from memlm.errors import InvalidRequestError

# Options that only some policies take: (options, the policies that take them). A group is named
# whole in its error, so a user sees everything that goes with the policy.
OPTION_GROUPS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("window",), ("learned", "snapkv", "rkv")),
    (("ratio", "rescore", "evict_prompt", "threshold"), ("learned",)),
    (("spans",), SPAN_POLICIES),
    (("sinks",), ("sinks",)),
)


@dataclass(frozen=True, slots=True)
class PolicySpec:
    name: str = "full"
    budget: int | None = None  # most tokens a row keeps
    predictor: str | None = None  # learned: the importance predictor's folder (`memlm train predictor`)
    # learned, snapkv, rkv: the most recent tokens always kept (default 8); snapkv and rkv score the
    # older ones by these tokens' attention (their observation window)
    window: int | None = None
    ratio: float | None = None  # learned: share of older tokens an eviction keeps, in (0, 1] (default 0.5)
    rescore: float | None = None  # learned: share of kept older tokens chosen by current attention (default 0)
    evict_prompt: bool | None = None  # learned: prompt tokens compete on their score (default: never evicted)
    # learned: threshold mode, keep the older tokens whose importance is >= this (the budget a hard
    # cap) instead of the top `ratio` of them (default: rank mode)
    threshold: float | None = None
    # h2o, tova, snapkv, rkv, learned: keep or drop spans whole, "numbers" (True says the same) or "lines"
    spans: bool | str = False
    sinks: int | None = None  # sinks: the first tokens always kept, attention sinks (default 4)
    # A press (memlm.cache.presses) compresses the prompt once after its prefill; any policy above
    # then holds the row under its budget while it generates. The learned press reads `predictor`.
    press: str | None = None
    press_ratio: float | None = None  # share of the prompt the press removes, in [0, 1) (default 0.5)

    def __post_init__(self):
        """Everything that can be checked without loading anything: names, budgets, which options go
        with which policy. A bad spec fails here, before a model or predictor loads."""
        if self.name not in POLICIES:
            raise InvalidRequestError(f"unknown KV policy {self.name!r}; choose one of {', '.join(POLICIES)}")
        object.__setattr__(self, "spans", span_unit(self.spans) or False)  # one spelling per unit
        if self.name != "full" and self.budget is None:
            raise InvalidRequestError(f"KV policy {self.name!r} needs a budget (--kv-budget)")
        defaults = {f.name: f.default for f in fields(self)}
        for options, policies in OPTION_GROUPS:
            if self.name not in policies and any(getattr(self, o) != defaults[o] for o in options):
                flags = [flag(o) for o in options]
                said = f"{flags[0]} is an option"
                if len(flags) > 1:
                    said = f"{', '.join(flags[:-1])} and {flags[-1]} are options"
                raise InvalidRequestError(f"{said} of --kv-policy {', '.join(policies)}")
        if self.name == "learned" and self.predictor is None:
            raise InvalidRequestError("--kv-policy learned needs --kv-predictor DIR (from `memlm train predictor`)")
        self._check_press()

    def _check_press(self) -> None:
        if self.press is None:
            if self.press_ratio is not None:
                raise InvalidRequestError("--kv-press-ratio is an option of --kv-press")
            return
        check_press(self.press)
        if self.press_ratio is not None and not 0 <= self.press_ratio < 1:
            raise InvalidRequestError(f"--kv-press-ratio is the share removed, in [0, 1); got {self.press_ratio}")
        if self.press == "learned" and self.predictor is None:
            raise InvalidRequestError("--kv-press learned needs --kv-predictor DIR (from `memlm train press`)")

    @classmethod
    def from_options(cls, name: str | None, budget: int | None, options: dict | None) -> PolicySpec:
        """A spec from a name, a budget and a dict of the other options (the server's `kv_options`)."""
        known = {f.name for f in fields(cls)} - {"name", "budget"}
        unknown = sorted(set(options or {}) - known)
        if unknown:
            raise InvalidRequestError(f"unknown KV policy option {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return cls(name or "full", budget, **(options or {}))

    def build(self, predictor=None) -> KVPolicy | None:
        """The policy for one request (None: no eviction). A learned policy's predictor is the one
        given (already loaded and checked against the model), else loaded from `self.predictor`."""
        policy = self._policy(predictor)
        if self.press is None:
            return policy
        return with_press(policy or FullPolicy(), self.press, self.press_ratio, predictor or self.predictor)

    def _policy(self, predictor=None) -> KVPolicy | None:
        if self.name == "full":
            return None
        skip = ("name", "budget", "predictor", "press", "press_ratio")
        options = {k: v for k, v in asdict(self).items() if k not in skip and v is not None}
        if not options.get("spans"):
            options.pop("spans")
        if self.name == "learned":
            options["predictor"] = predictor if predictor is not None else _load(self.predictor)
        return make_policy(self.name, self.budget, **options)


def with_press(policy: KVPolicy, name: str, ratio: float | None, predictor=None) -> KVPolicy:
    """The policy carrying a press (`policy.press`): what the press needs from the prefill is turned
    on through the policy (attention tracking; the learned predictor scoring every token).
    `predictor`: a loaded predictor or its folder."""
    if name == "learned" and isinstance(predictor, str):
        predictor = _load(predictor)
    press = make_press(name, 0.5 if ratio is None else ratio, predictor if name == "learned" else None)
    policy.press = press
    if press.needs_attention:
        policy.needs_attention = True  # the prefill records the attention each slot receives
    if press.needs_importance:
        if policy.predictor is not None and policy.predictor is not press.predictor:
            raise InvalidRequestError("--kv-policy learned and --kv-press learned share one --kv-predictor")
        policy.predictor = press.predictor
    return policy


def flag(option: str) -> str:
    """The command-line flag of an option (the server's field is its name: `kv_options.window`)."""
    return "--kv-" + option.replace("_", "-")


@functools.lru_cache(maxsize=8)
def _load(folder: str):
    return load_predictor(folder)[0]
