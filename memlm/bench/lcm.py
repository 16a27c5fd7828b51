"""`memlm eval lcm`: what the codebook memory is worth, in held-out bits per byte.

1. Main comparison (one model per seed, mean and spread): the full LCM, the decoder alone trained
   for the same total steps, and a same-size Llama transformer trained by the same loop on the
   same windows.
2. Ablations of the trained LCM, without retraining: z zeroed, z shuffled across positions, each
   grid left out, loop steps 1 against the trained maximum.
3. Retrained variants (given by the caller): continuous z, one codebook of the six grids' size.
4. Re-encode period (never / 256 / 64) with the recurrent sums kept in float32 and in bfloat16:
   bits per byte of token-by-token decoding over long streams, and the drift of its logits from the
   exact parallel computation.
5. Memory statistics on held-out text: code usage, dead codes, routing entropy, loop steps.
6. Decode cost per token against context length, LCM against the transformer with its KV cache,
   and the memory each keeps per sequence.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from memlm.bench.report import pyplot, save_figure, write_outputs
from memlm.data.packed import TokenData
from memlm.errors import MemlmError
from memlm.formats.loading import load_model
from memlm.lcm.checkpoint import load_lcm
from memlm.lcm.config import GRID_NAMES, LCMConfig
from memlm.lcm.memory import loop_report
from memlm.lcm.model import LCMModel
from memlm.train.heldout import bits_per_byte, lcm_logits, llama_logits


@dataclass
class LCMBenchConfig:
    data: str
    lcm: list[str]  # LCM model folders, one per seed (ablations run on the first)
    decoder: list[str] = field(default_factory=list)  # decoder-alone folders (memory "none")
    transformer: list[str] = field(default_factory=list)  # Llama folders from `memlm train lm`
    variants: dict[str, str] = field(default_factory=dict)  # name -> retrained LCM folder
    seq_len: int = 256
    windows: int = 128  # held-out windows for bits per byte
    stream_len: int = 2048  # tokens per stream for the re-encode measurement
    streams: int = 4
    contexts: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    decode_steps: int = 32
    progress: bool = True


def run_lcm_bench(cfg: LCMBenchConfig, json_path: str | None = None, plot_path: str | None = None) -> dict:
    if not cfg.lcm:
        raise MemlmError("give at least one LCM model (--model)")
    for folder in cfg.lcm + list(cfg.variants.values()) + cfg.decoder:
        if not LCMConfig.is_lcm_folder(folder):
            raise MemlmError(f"{folder} is not an LCM model folder")
    val = TokenData.open(cfg.data, "val")
    say = print if cfg.progress else (lambda *a, **k: None)
    bpb = lambda fn: bits_per_byte(fn, val, cfg.seq_len, cfg.windows)  # noqa: E731

    result: dict = {
        "setup": {
            "data": cfg.data,
            "seq_len": cfg.seq_len,
            "windows": cfg.windows,
            "heldout_tokens": cfg.windows * cfg.seq_len,
            "bytes_per_token": val.bytes_per_token,
        }
    }
    main, parameters = {}, {}
    for name, folders, loader in (
        ("lcm", cfg.lcm, _lcm_fn),
        ("decoder_alone", cfg.decoder, _lcm_fn),
        ("transformer", cfg.transformer, _llama_fn),
    ):
        if not folders:
            continue
        values = []
        for folder in folders:
            fn, params = loader(folder, val)
            values.append(bpb(fn))
            say(f"{name:14s} {folder}: {values[-1]:.4f} bits/byte")
        parameters[name] = params
        main[name] = _spread(values, folders)
    result["main"], result["parameters"] = main, parameters

    model = load_lcm(cfg.lcm[0])
    _check_vocab(model, val)
    result["ablations"] = _ablations(model, bpb, say)
    result["retrained"] = {}
    for name, folder in cfg.variants.items():
        fn, _ = _lcm_fn(folder, val)
        result["retrained"][name] = bpb(fn)
        say(f"retrained {name:10s}: {result['retrained'][name]:.4f}")
    result["memory_stats"] = _memory_stats(model, val, cfg)
    result["reencode"] = _reencode(model, val, cfg, say)
    transformer = _load_llama(cfg.transformer[0]) if cfg.transformer else None
    result["decode_cost"] = _decode_cost(model, transformer, cfg, say)
    write_outputs(result, None, json_path, plot_path, plot)
    return result


# ---- models ----------------------------------------------------------------------------------------


def _check_vocab(model, val: TokenData) -> None:
    if model.config.vocab_size != val.header["vocab_size"]:
        raise MemlmError(
            f"a model has a vocabulary of {model.config.vocab_size}; the data has {val.header['vocab_size']}"
        )


def _lcm_fn(folder: str, val: TokenData):
    model = load_lcm(folder)
    _check_vocab(model, val)
    return lcm_logits(model), sum(p.numel() for p in model.parameters())


def _load_llama(folder: str):
    return load_model(folder).model


def _llama_fn(folder: str, val: TokenData):
    model = _load_llama(folder)
    _check_vocab(model, val)
    return llama_logits(model), sum(p.numel() for p in model.parameters())


def _spread(values: list[float], folders: list[str]) -> dict:
    return {
        "per_seed": values,
        "models": folders,
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


# ---- ablations ----------------------------------------------------------------------------------


def _ablations(model: LCMModel, bpb, say) -> dict:
    trained = model.config
    settings: dict[str, dict] = {
        "full": {},
        "z_zeroed": {"z_ablation": "zero"},
        "z_shuffled": {"z_ablation": "shuffle"},
    }
    if trained.memory == "grids":
        for grid in GRID_NAMES:
            settings[f"without_{grid}"] = {"grids_off": (grid,)}
        settings["loop_steps_1"] = {"max_loop_steps": 1}
        settings[f"loop_steps_{trained.max_loop_steps}"] = {"max_loop_steps": trained.max_loop_steps}
    out = {}
    for name, overrides in settings.items():
        model.set_runtime(**overrides)
        out[name] = bpb(lcm_logits(model))
        say(f"ablation {name:22s}: {out[name]:.4f}")
        model.set_runtime(**{k: getattr(trained, k) for k in overrides})
    return out


# ---- memory statistics ----------------------------------------------------------------------------


@torch.no_grad()
def _memory_stats(model: LCMModel, val: TokenData, cfg: LCMBenchConfig) -> dict:
    if model.config.memory not in ("grids", "single"):
        return {}
    windows = val.eval_windows(cfg.seq_len, cfg.windows)
    traces, entropy, z_all, z_q_all = [], 0.0, [], []
    for start in range(0, windows.shape[0], 8):
        _, aux = model(windows[start : start + 8, :-1])
        trace = aux["trace"]
        traces.append(trace)
        z_all.append(aux["z"].flatten(0, 1))
        z_q_all.append(aux["z_q"].flatten(0, 1))
        if trace.route_entropy() is not None:
            entropy += float(trace.route_entropy().sum())
    report = loop_report(model.memory, traces)
    # How much z_q varies from token to token, against z: near 0 means the loop sends every token to
    # (nearly) the same point, and the decoder has nothing position-specific to read.
    z_all, z_q_all = torch.cat(z_all), torch.cat(z_q_all)
    tokens = z_all.shape[0]
    return {
        "z_std": float(z_all.std(0).mean()),
        "z_q_std": float(z_q_all.std(0).mean()),
        "z_q_distinct": int(torch.unique(z_q_all.round(decimals=4), dim=0).shape[0]),
        "tokens": tokens,
        "grids": report["code_usage"],
        "route_entropy": entropy / tokens if model.config.memory == "grids" else None,
        "route_entropy_max": math.log(len(GRID_NAMES)),
        "loop_steps_histogram": report["loop_steps"],
    }


# ---- re-encode and drift --------------------------------------------------------------------------


@torch.no_grad()
def _reencode(model: LCMModel, val: TokenData, cfg: LCMBenchConfig, say) -> dict:
    length = min(cfg.stream_len, (len(val) - 1) // cfg.streams)
    streams = val.windows([i * length for i in range(cfg.streams)], length + 1)
    inputs, targets = streams[:, :-1], streams[:, 1:]
    reference = model(inputs)[0]  # the exact parallel computation (float32)
    trained_period = model.config.reencode_period
    out: dict = {"stream_tokens": length, "streams": cfg.streams}
    for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        out[dtype_name] = {}
        for period in (0, 256, 64):
            model.set_runtime(reencode_period=period)
            state = model.new_state(cfg.streams, state_dtype=dtype)
            logits = []
            for t in range(length):
                positions = torch.full((cfg.streams, 1), t)
                logits.append(model.logits(model.forward_tokens(inputs[:, t : t + 1], positions, state)))
            logits = torch.cat(logits, 1)
            drift = (logits - reference).abs().amax(-1)  # [streams, T]
            nats = float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
            key = "never" if period == 0 else str(period)
            out[dtype_name][key] = {
                "bits_per_byte": nats / math.log(2) / (targets.numel() * val.bytes_per_token),
                "max_logit_drift": float(drift.max()),
                "mean_logit_drift": float(drift.mean()),
                "max_logit_drift_by_quarter": [float(q.max()) for q in drift.chunk(4, dim=1)],
                "argmax_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
            }
            say(
                f"re-encode {dtype_name:8s} {key:>5s}: drift max {out[dtype_name][key]['max_logit_drift']:.2e}, "
                f"{out[dtype_name][key]['bits_per_byte']:.4f} bits/byte"
            )
    model.set_runtime(reencode_period=trained_period)
    out["reference_bits_per_byte"] = (
        float(F.cross_entropy(reference.flatten(0, 1), targets.flatten(), reduction="sum"))
        / math.log(2)
        / (targets.numel() * val.bytes_per_token)
    )
    return out


# ---- decode cost -------------------------------------------------------------------------------------


@torch.no_grad()
def _decode_cost(model: LCMModel, transformer, cfg: LCMBenchConfig, say) -> dict:
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    rows: dict = {
        "context": list(cfg.contexts),
        "lcm_ms": [],
        "lcm_reencode_ms": [],
        "lcm_bytes": [],
        "transformer_ms": [],
        "transformer_bytes": [],
    }
    period, trained_period = 256, model.config.reencode_period
    for context in cfg.contexts:
        ids = torch.randint(0, vocab, (1, context + cfg.decode_steps), generator=generator)
        model.set_runtime(reencode_period=0)
        state = model.new_state(1)
        model.forward_tokens(ids[:, :context], torch.arange(context)[None], state)
        ms = _time_steps(
            lambda t, s=state, x=ids: model.forward_tokens(x[:, t : t + 1], torch.tensor([[t]]), s),
            context,
            cfg.decode_steps,
        )
        # Re-encoding every `period` tokens costs one parallel pass over the history: amortised per token.
        model.set_runtime(reencode_period=period)
        state = model.new_state(1)
        state.history = [ids[0, :context].tolist()]
        start = time.perf_counter()
        model._reencode(state, [0])
        reencode_ms = (time.perf_counter() - start) * 1000
        rows["lcm_ms"].append(ms)
        rows["lcm_reencode_ms"].append(ms + reencode_ms / period)
        rows["lcm_bytes"].append(state.recurrent_bytes_per_sequence())
        if transformer is not None:
            cache = transformer.new_state(1, context + cfg.decode_steps)
            transformer.forward_tokens(ids[:, :context], torch.arange(context)[None], cache)
            tms = _time_steps(
                lambda t, c=cache, x=ids: transformer.forward_tokens(x[:, t : t + 1], torch.tensor([[t]]), c),
                context,
                cfg.decode_steps,
            )
            rows["transformer_ms"].append(tms)
            rows["transformer_bytes"].append(transformer.config.kv_bytes_per_token(4) * context)
        say(
            f"decode at {context:5d}: LCM {ms:.2f} ms/token "
            f"(re-encode every {period}: {rows['lcm_reencode_ms'][-1]:.2f})"
            + (f", transformer {rows['transformer_ms'][-1]:.2f} ms/token" if transformer is not None else "")
        )
    model.set_runtime(reencode_period=trained_period)
    rows["reencode_period"] = period
    return rows


def _time_steps(step, start: int, steps: int) -> float:
    """Median milliseconds of one decode step, over `steps` consecutive steps from `start`."""
    times = []
    for t in range(start, start + steps):
        begin = time.perf_counter()
        step(t)
        times.append((time.perf_counter() - begin) * 1000)
    return statistics.median(times)


# ---- plot -------------------------------------------------------------------------------------------


def plot(result: dict, path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0, 0]
    names = list(result["main"])
    means = [result["main"][n]["mean"] for n in names]
    stds = [result["main"][n]["std"] for n in names]
    ax.bar(names, means, yerr=stds, capsize=4, color=["C0", "C1", "C2"][: len(names)])
    ax.set_ylim(min(means) * 0.95, max(means) * 1.03)
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title("equal parameters and training tokens (mean ± sd over seeds)")

    ax = axes[0, 1]
    ablations = dict(result["ablations"])
    ablations.update({f"retrained: {k}": v for k, v in result.get("retrained", {}).items()})
    ax.barh(list(ablations), list(ablations.values()), color="C0")
    ax.axvline(ablations["full"], color="k", lw=0.8)
    lo = min(ablations.values())
    ax.set_xlim(lo * 0.98, max(ablations.values()) * 1.01)
    ax.set_xlabel("held-out bits per byte")
    ax.set_title("the trained LCM, parts removed")
    ax.invert_yaxis()

    ax = axes[1, 0]
    cost = result["decode_cost"]
    ax.plot(cost["context"], cost["lcm_ms"], "o-", label="LCM (recurrent state)")
    ax.plot(cost["context"], cost["lcm_reencode_ms"], "o--", label=f"LCM, re-encode every {cost['reencode_period']}")
    if cost["transformer_ms"]:
        ax.plot(cost["context"], cost["transformer_ms"], "s-", label="transformer (KV cache)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("ms per decoded token (batch 1)")
    ax.set_title("decode cost against context")
    ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[1, 1]
    hist = result.get("memory_stats", {}).get("loop_steps_histogram", {})
    if hist:
        ax.bar(list(hist), list(hist.values()), color="C3")
        ax.set_xlabel("reasoning-loop steps taken")
        ax.set_ylabel("held-out tokens")
        ax.set_title("loop steps per token")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
