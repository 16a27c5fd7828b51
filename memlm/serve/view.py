"""Turns a job's engine requests and deltas into OpenAI's chat and completion objects: whole
responses, stream chunks, logprobs in both shapes, tool calls read out of the text (a ToolPlan),
and the memory trace."""

from __future__ import annotations

import secrets
import time

from memlm.cache.eviction import kv_record
from memlm.cache.prefix import cached_tokens
from memlm.generation.request import Request as EngineRequest
from memlm.generation.request import StreamDelta
from memlm.generation.tool_calls import ToolFormat
from memlm.latent.hook import latent_record
from memlm.lcm.hook import KEY as LCM_KEY
from memlm.serve.chat import ToolPlan, new_call_id
from memlm.serve.protocol import _Common


class ChatView:
    """Turns engine requests and deltas into OpenAI's response and chunk objects."""

    def __init__(self, state, engine, body: _Common, requests, chat: bool, logprobs,
                 plan: ToolPlan | None = None):
        self.state, self.engine, self.body, self.requests = state, engine, body, requests
        self.chat, self.logprobs = chat, logprobs
        self.plan = plan if plan is not None and plan.calls_possible else None
        self.call_ids: list[list[str]] = [[] for _ in requests]  # per choice: the ids of its calls, in order
        self.sent_content = [0] * len(requests)  # tool plans: content characters streamed, per choice
        self.sent_arguments: list[list[int]] = [[] for _ in requests]  # per choice and call: argument chars sent
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.choice_of = {r.id: i for i, r in enumerate(requests)}
        self.sent_tokens = [0] * len(requests)  # tokens whose logprobs were sent, per choice

    def _envelope(self, choices: list, **extra) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        model = self.body.model or self.state.served_name  # an adapter's name when the client chose one
        out = {"id": self.id, "object": kind, "created": self.created, "model": model, "choices": choices}
        if self.body.stream:
            out["object"] = "chat.completion.chunk" if self.chat else "text_completion"
            if self.body.include_usage:
                out["usage"] = None
        out.update(extra)
        return out

    # ---- whole responses --------------------------------------------------------------------------

    def response(self) -> dict:
        choices = []
        for i, r in enumerate(self.requests):
            finish = r.finish_reason
            if self.chat:
                message, finish = self._message(i, r)
                choice = {"index": i, "message": message,
                          "logprobs": self._chat_logprobs(r, 0, len(r.logprobs)) if self.logprobs is not None else None,
                          "finish_reason": finish}
            else:
                choice = {"index": i, "text": r.text,
                          "logprobs": self._completion_logprobs(r, 0, len(r.logprobs))
                          if self.logprobs is not None else None,
                          "finish_reason": finish}
            if r.stop_reason is not None and finish == "stop":
                choice["stop_reason"] = r.stop_reason
            if self.body.return_memory_trace:
                choice["memory_trace"] = self._memory_trace(r)
            choices.append(choice)
        return self._envelope(choices, usage=self.usage())

    def _message(self, index: int, r: EngineRequest) -> tuple[dict, str]:
        """A chat choice's message and finish reason: with tools, the calls read out of the text."""
        if self.plan is None:
            return {"role": "assistant", "content": r.text}, r.finish_reason
        content, calls = self.plan.parse(r.text)
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [
                {"id": self._call_id(index, k), "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}} for k, c in enumerate(calls)
            ]
        finish = "tool_calls" if calls and r.finish_reason == "stop" else r.finish_reason
        return message, finish

    def _finish_reason(self, index: int, r: EngineRequest) -> str:
        if self.plan is not None and r.finish_reason == "stop" and self.sent_arguments[index]:
            return "tool_calls"
        return r.finish_reason

    def _call_id(self, index: int, k: int) -> str:
        ids = self.call_ids[index]
        while len(ids) <= k:
            ids.append(new_call_id())
        return ids[k]

    def _tool_delta(self, index: int, r: EngineRequest, finished: bool) -> dict:
        """The next piece of a choice's answer under a tool plan: content up to the first call block
        (holding back what may be the start of its tag), then each call's id and name once, and its
        arguments as they grow."""
        text = r.text if finished else r.text[: r.streamed]
        content, calls = self.plan.parse(text)
        delta = {}
        if content == text:  # no call block yet: hold back what may become its tag, and trailing space
            end = len(text) if finished else ToolFormat.safe_content_length(text.rstrip())
        else:
            content = content or ""
            end = len(content)
        if end > self.sent_content[index]:
            delta["content"] = content[self.sent_content[index]: end]
            self.sent_content[index] = end
        sent = self.sent_arguments[index]
        pieces = []
        for k, call in enumerate(calls):
            piece = {"index": k}
            if k == len(sent):
                sent.append(0)
                piece.update(id=self._call_id(index, k), type="function", function={"name": call.name, "arguments": ""})
            if len(call.arguments) > sent[k]:
                piece.setdefault("function", {})["arguments"] = call.arguments[sent[k]:]
                sent[k] = len(call.arguments)
            if len(piece) > 1:
                pieces.append(piece)
        if pieces:
            delta["tool_calls"] = pieces
        return delta

    def usage(self) -> dict:
        prompt = sum(len(r.prompt_ids) for r in self.requests[:: self.body.n])  # each prompt once, as OpenAI
        completion = sum(len(r.output_ids) for r in self.requests)
        cached = sum(cached_tokens(r) for r in self.requests[:: self.body.n])  # reused from the prefix cache
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip

    def usage_chunk(self) -> dict:
        out = self._envelope([])
        out["usage"] = self.usage()
        return out

    # ---- stream chunks ----------------------------------------------------------------------------

    def opening_chunk(self, index: int) -> dict | None:
        """Chat: the first delta of each choice names the role. With return_memory_trace, the prompt's
        tokens (so a viewer can shade them as they are evicted) come with it."""
        r = self.requests[index]
        memory = self._prompt_memory(r) if self.body.return_memory_trace else None
        if not self.chat and memory is None:
            return None
        choice = {"index": index, "logprobs": None, "finish_reason": None}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": ""}
        else:
            choice["text"] = ""
        if memory is not None:
            choice["memory"] = memory
        return self._envelope([choice])

    def delta_chunk(self, d: StreamDelta) -> dict | None:
        r = d.request
        index = self.choice_of[r.id]
        wants_memory = self.body.return_memory_trace and (d.token_id is not None or d.evicted or d.inserted)
        new_logprobs = self.logprobs is not None and len(r.logprobs) > self.sent_tokens[index]
        if not (d.text or d.finish_reason or wants_memory or new_logprobs):
            return None
        choice = {"index": index}
        if self.plan is not None:
            choice["delta"] = self._tool_delta(index, r, d.finish_reason is not None)
            if not choice["delta"] and not (d.finish_reason or wants_memory or new_logprobs):
                return None
        elif self.chat:
            choice["delta"] = {"content": d.text} if d.text or not d.finish_reason else {}
        else:
            choice["text"] = d.text
        choice["logprobs"] = None
        if new_logprobs:
            start, self.sent_tokens[index] = self.sent_tokens[index], len(r.logprobs)
            if self.chat:
                choice["logprobs"] = self._chat_logprobs(r, start, len(r.logprobs))
            else:
                choice["logprobs"] = self._completion_logprobs(r, start, len(r.logprobs))
        choice["finish_reason"] = self._finish_reason(index, r) if d.finish_reason else None
        if d.finish_reason and r.finish_reason == "stop" and r.stop_reason is not None:
            choice["stop_reason"] = r.stop_reason
        if wants_memory:
            choice["memory"] = self._step_memory(d)
        if d.finish_reason and self.body.return_memory_trace:
            choice["memory_trace"] = self._memory_trace(r)
        return self._envelope([choice])

    # ---- logprobs ----------------------------------------------------------------------------------

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        raw = self.engine.tokenizer.token_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _chat_logprobs(self, r: EngineRequest, start: int, end: int) -> dict:
        content = []
        for k in range(start, end):
            text, raw = self._token(r.output_ids[k])
            top = []
            for token_id, value in (r.top_logprobs[k] if r.top_logprobs else []):
                alt_text, alt_raw = self._token(token_id)
                top.append({"token": alt_text, "logprob": value, "bytes": alt_raw})
            content.append({"token": text, "logprob": r.logprobs[k], "bytes": raw, "top_logprobs": top})
        return {"content": content}

    def _completion_logprobs(self, r: EngineRequest, start: int, end: int) -> dict:
        tokens, offsets, tops = [], [], []
        for k in range(start, end):
            tokens.append(self._token(r.output_ids[k])[0])
            offsets.append(r.text_ends[k - 1] if 0 < k <= len(r.text_ends) else (0 if k == 0 else len(r.text)))
            if r.top_logprobs:
                tops.append({self._token(t)[0]: v for t, v in r.top_logprobs[k]})
            else:
                tops.append(None)
        return {"tokens": tokens, "token_logprobs": r.logprobs[start:end], "top_logprobs": tops, "text_offset": offsets}

    # ---- memory --------------------------------------------------------------------------------------

    def _prompt_memory(self, r: EngineRequest) -> dict:
        decode = self.engine.tokenizer.decode
        return {
            "prompt_tokens": [decode([t], skip_special_tokens=False) for t in r.prompt_ids],
            "kv_policy": r.kv_policy.name if r.kv_policy is not None else "full",
            "kv_budget": r.kv_policy.budget if r.kv_policy is not None else None,
            "memory": self.body.memory,
        }

    def _step_memory(self, d: StreamDelta) -> dict:
        token = None
        if d.token_id is not None:
            token = self.engine.tokenizer.decode([d.token_id], skip_special_tokens=False)
        return {
            "token": token,
            "position": d.position,
            "evicted": d.evicted,
            "inserted": d.inserted,
            "kv_tokens": d.kv_tokens,
        }

    def _memory_trace(self, r: EngineRequest) -> dict:
        """Per token, prompt and output: is it still in the KV cache? Where latents went in; for an
        LCM, the reasoning loop behind each token. Read from each memory's record of the request."""
        decode = self.engine.tokenizer.decode
        kv, latent, lcm = kv_record(r), latent_record(r), r.records.get(LCM_KEY)
        evicted = set(kv.evicted_positions) if kv is not None else set()
        out = {
            "kv_policy": r.kv_policy.name if r.kv_policy is not None else "full",
            "kv_budget": r.kv_policy.budget if r.kv_policy is not None else None,
            "prompt_tokens": [{"token": decode([t], skip_special_tokens=False), "in_cache": p not in evicted}
                              for p, t in enumerate(r.prompt_ids)],
            "completion_tokens": [{"token": decode([t], skip_special_tokens=False), "in_cache": p not in evicted}
                                  for t, p in zip(r.output_ids, r.output_positions, strict=True)],
            "insertions": list(latent.insertions) if latent is not None else [],
            "evictions": len(evicted),
            "peak_kv_tokens": kv.peak_kv_tokens if kv is not None else 0,
        }
        if lcm is not None:  # an LCM: the reasoning loop behind each token
            out["codebook"] = lcm.trace
        return out
