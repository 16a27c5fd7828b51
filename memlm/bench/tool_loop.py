"""The agent tool loop on 10 scripted tasks: the official `openai` client against `memlm serve`, with
every tool offered on every task. Per task: the model must call (tool_choice "required"), the client
runs the calls and sends the results back as `role: tool` messages, the model may call again
("auto", up to 3 rounds), then answers. Measured: every call parses and validates against its
schema (by construction: calls are constrained), the loop ends with an answer, and -- the model's
own quality, not the server's -- how often it chose the right function and the answer uses the
tool's result.

    python -m memlm.bench.tool_loop --json runs/tool_loop.json [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import math
import time

from memlm.atomic import write_json_atomic
from memlm.serve.launch import ServerProcess


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


_S, _N, _I = {"type": "string", "maxLength": 40}, {"type": "number"}, {"type": "integer"}
TOOLS = [
    _tool("get_weather", "Current weather in a city", {"city": _S}, ["city"]),
    _tool("add", "Add two numbers", {"a": _N, "b": _N}, ["a", "b"]),
    _tool("multiply", "Multiply two numbers", {"a": _N, "b": _N}, ["a", "b"]),
    _tool("celsius_to_fahrenheit", "Convert a temperature from Celsius to Fahrenheit", {"celsius": _N}, ["celsius"]),
    _tool("capital_of", "The capital city of a country", {"country": _S}, ["country"]),
    _tool("word_count", "Count the words in a text", {"text": {"type": "string", "maxLength": 200}}, ["text"]),
    _tool("reverse", "Reverse a string", {"text": _S}, ["text"]),
    _tool("square_root", "The square root of a number", {"x": _N}, ["x"]),
    _tool("convert_currency", "Convert an amount between currencies",
          {"amount": _N, "source": {"enum": ["USD", "EUR", "GBP"]}, "target": {"enum": ["USD", "EUR", "GBP"]}},
          ["amount", "source", "target"]),
    _tool("days_between", "Days between two years' January firsts", {"start": _I, "end": _I}, ["start", "end"]),
]
_RATES = {"USD": 1.0, "EUR": 0.9, "GBP": 0.8}
RUN = {
    "get_weather": lambda a: f"Sunny and 21 C in {a['city']}",
    "add": lambda a: str(a["a"] + a["b"]),
    "multiply": lambda a: str(a["a"] * a["b"]),
    "celsius_to_fahrenheit": lambda a: str(a["celsius"] * 9 / 5 + 32),
    "capital_of": lambda a: {"france": "Paris", "japan": "Tokyo", "italy": "Rome"}.get(a["country"].lower(), "unknown"),
    "word_count": lambda a: str(len(a["text"].split())),
    "reverse": lambda a: a["text"][::-1],
    "square_root": lambda a: str(math.sqrt(abs(a["x"]))),
    "convert_currency": lambda a: f"{a['amount'] / _RATES[a['source']] * _RATES[a['target']]:.2f}",
    "days_between": lambda a: str(sum(366 if y % 4 == 0 and (y % 100 or y % 400 == 0) else 365
                                      for y in range(min(a["start"], a["end"]), max(a["start"], a["end"])))),
}
TASKS = [
    ("What is the weather in Paris?", "get_weather"),
    ("What is 17 plus 25?", "add"),
    ("What is 12 times 11?", "multiply"),
    ("Convert 30 degrees Celsius to Fahrenheit.", "celsius_to_fahrenheit"),
    ("What is the capital of Japan?", "capital_of"),
    ("How many words are in 'the quick brown fox jumps'?", "word_count"),
    ("Reverse the word 'memory'.", "reverse"),
    ("What is the square root of 144?", "square_root"),
    ("Convert 100 USD to EUR.", "convert_currency"),
    ("How many days are there from 2020 to 2022?", "days_between"),
]


def run_task(client, model: str, question: str, max_rounds: int = 3) -> dict:
    import jsonschema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    messages = [{"role": "user", "content": question}]
    calls_made, valid, results = [], 0, []
    for round_ in range(max_rounds + 1):
        choice = "required" if round_ == 0 else ("auto" if round_ < max_rounds else "none")
        reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice=choice,
                                               temperature=0, max_tokens=120).choices[0]
        calls = reply.message.tool_calls or []
        if not calls:
            return {"question": question, "calls": calls_made, "valid_calls": valid, "answer": reply.message.content,
                    "finish_reason": reply.finish_reason, "rounds": round_, "results": results}
        messages.append(reply.message)
        for call in calls:
            arguments = json.loads(call.function.arguments)
            jsonschema.validate(arguments, schemas[call.function.name])  # raises: a server bug
            valid += 1
            calls_made.append(call.function.name)
            try:
                result = RUN[call.function.name](arguments)
            except (ArithmeticError, ValueError, KeyError) as e:
                result = f"error: {e}"
            results.append(result)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    raise AssertionError("tool_choice none still called a tool")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    from openai import OpenAI

    started = time.monotonic()
    with ServerProcess("--model", args.model, "--threads", str(args.threads), "--served-model-name", "m") as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        rows = []
        for question, expected in TASKS:
            row = run_task(client, "m", question)
            row["expected_tool"] = expected
            row["right_tool_first"] = bool(row["calls"]) and row["calls"][0] == expected
            row["answer_uses_result"] = any(r and r.lower() in (row["answer"] or "").lower() for r in row["results"])
            rows.append(row)
            print(f"{question[:44]:46s} calls={row['calls']} right={row['right_tool_first']} "
                  f"uses_result={row['answer_uses_result']} finish={row['finish_reason']}", flush=True)
    summary = {
        "model": args.model, "tasks": len(rows), "loops_completed": sum(r["answer"] is not None for r in rows),
        "calls": sum(len(r["calls"]) for r in rows), "valid_calls": sum(r["valid_calls"] for r in rows),
        "right_tool_first": sum(r["right_tool_first"] for r in rows),
        "answer_uses_result": sum(r["answer_uses_result"] for r in rows),
        "seconds": round(time.monotonic() - started, 1), "rows": rows,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    if args.json_path:
        write_json_atomic(args.json_path, summary)


if __name__ == "__main__":
    main()
