"""The LCM's part in the decode loop (a RowHook of memlm.generation.hooks, implemented structurally:
this package sits below the engine). Its state says, per row, whether the danger grid halted it
(`LCMState.halted`: the engine then ends the row with finish_reason "halted", taking no token) and
what the reasoning loop did for its last token (`LCMState.traces`: kept per request in an
`LCMRecord`, `Completion.memory_trace`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from memlm.hook_defaults import QuietHook

KEY = "lcm"


@dataclass(slots=True)
class LCMRecord:
    trace: list[dict] = field(default_factory=list)  # per output token: the loop's steps, grids, distance, flags

    def completion_fields(self) -> dict:
        return {"memory_trace": self.trace}


class HaltHook(QuietHook):
    phase = "memory"

    def join(self, rows, state) -> None:
        for r in rows:
            r.records[KEY] = LCMRecord()

    def after_sample(self, rows, state, tokens, last, steps) -> None:
        for row, (r, halted) in enumerate(zip(rows, state.halted.tolist(), strict=True)):
            if halted:
                steps[row].halted = True
            else:
                r.records[KEY].trace.append(state.traces[row])
