"""One settings class per service. Precedence: command-line flag > environment variable > default.

Each field `foo_bar` is the flag `--foo-bar` and the variable `CHATSERVE_FOO_BAR`. Nothing is read at
import time: `from_args(argv, env)` reads both when a service starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, get_type_hints

from typing_extensions import Self

T = TypeVar("T", bound="BaseSettings")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _split_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


@dataclass
class BaseSettings:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=0, metadata={"help": "port to bind"})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning, error"})

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
                  prog: str | None = None) -> Self:
        env = os.environ if env is None else env
        parser = cls.parser(prog)
        ns = parser.parse_args(list(argv) if argv is not None else [])
        return cls.from_namespace(ns, env)

    @classmethod
    def parser(cls, prog: str | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
        parser = parser or argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip())
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            help_text = f.metadata.get("help", "")
            env_name = "CHATSERVE_" + f.name.upper()
            parser.add_argument(flag, *f.metadata.get("aliases", ()), dest=f.name, default=None,
                                help=f"{help_text} (env {env_name})",
                                metavar=None if hints[f.name] is not bool else "BOOL")
        return parser

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace, env: Mapping[str, str]) -> Self:
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = getattr(ns, f.name, None)
            if raw is None:
                raw = env.get("CHATSERVE_" + f.name.upper())
            if raw is None:
                continue
            values[f.name] = _convert(hints[f.name], raw, f.name)
        return cls(**values)


def _convert(hint: Any, raw: str, name: str) -> Any:
    text = str(hint)
    try:
        if hint is bool or text == "bool":
            return _parse_bool(raw)
        if hint is int or text in ("int", "int | None"):
            return int(raw)
        if hint is float or text in ("float", "float | None"):
            return float(raw)
        if "list" in text:
            return _split_list(raw)
    except ValueError as exc:
        raise SystemExit(f"invalid value for {name}: {raw!r} ({exc})") from None
    return raw


@dataclass
class InternalPlaneSettings(BaseSettings):
    """A service of the internal plane (controller, worker, gateway): calls between them carry a shared
    secret. Bound to anything but loopback, a service refuses to start without one (chatserve/http.py
    `guard_internal_plane`)."""

    internal_secret: str = field(default="", metadata={"help": "shared secret of the internal plane (prefer "
                                                       "--internal-secret-file: a flag shows in ps)"})
    internal_secret_file: str = field(default="", metadata={"help": "file holding the internal secret (Docker and "
                                                            "Kubernetes secrets)"})
    insecure_open_internal_plane: bool = field(default=False, metadata={"help": "serve a non-loopback address with "
                                                                        "no secret (anyone reaching the port can "
                                                                        "register workers or read prompts)"})


@dataclass
class ControllerSettings(InternalPlaneSettings):
    """The controller: worker registry and dispatch."""

    port: int = 21001
    heartbeat_expiry: float = field(default=10.0, metadata={"help": "seconds without heartbeat before a worker is dropped"})
    expiry_check_interval: float = field(default=1.0, metadata={"help": "seconds between expiry sweeps"})
    dispatch_policy: str = field(default="least_loaded", metadata={"help": "least_loaded or random"})


@dataclass
class WorkerSettings(InternalPlaneSettings):
    """A model worker: one model, a continuous-batching engine, registered with the controller."""

    port: int = 21002
    controller_url: str = field(default="http://127.0.0.1:21001", metadata={"help": "controller base URL"})
    worker_address: str = field(default="", metadata={"help": "URL others reach this worker at (default http://HOST:PORT; set it for multi-host)"})
    model_path: str = field(default="", metadata={"help": "HF folder, .safetensors or .gguf ('' = embedded SmolLM2-135M-Instruct)"})
    model_name: str = field(default="", metadata={"help": "name served under ('' = from the path)"})
    context_length: int = field(default=2048, metadata={"help": "context window in tokens"})
    chat_template: str = field(default="", metadata={"help": "named template ('' = tokenizer's own, else family match)"})
    tool_call_parser: str = field(default="", metadata={"help": "the format the model writes tool calls in: hermes, "
                                                        "llama3_json or mistral ('' = from the chat template)"})
    reasoning_parser: str = field(default="auto", metadata={"help": "a reasoning model's <think> span to "
                                  "reasoning_content: think, none, or auto (when the chat template writes the markers)"})
    lora: list[str] = field(default_factory=list, metadata={"help": "PEFT LoRA adapter folders merged into the weights at load (comma-separated, in order)"})
    quantize: str = field(default="", metadata={"help": "weight-only quantization: '', int8 or int4"})
    tensor_parallel: int = field(default=1, metadata={"help": "GPUs of this host one model is split across (heads and MLP)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    dtype: str = field(default="auto", metadata={"help": "auto, bfloat16, float16 or float32"})
    max_num_seqs: int = field(default=64, metadata={"help": "sequences batched at once"})
    max_batched_tokens: int = field(default=1024, metadata={"help": "token budget of one engine step"})
    block_size: int = field(default=16, metadata={"help": "KV-cache block size in tokens"})
    kv_cache_tokens: int = field(default=32768, metadata={"help": "KV-cache size on CPU, in tokens"})
    kv_cache_dtype: str = field(default="auto", metadata={"help": "KV-cache storage: auto (the model's dtype) or fp8 "
                                                                 "(e4m3: twice the tokens, half the bandwidth)"})
    gpu_memory_utilization: float = field(default=0.90, metadata={"help": "fraction of GPU memory to use"})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "reuse KV blocks across requests"})
    cuda_graphs: bool = field(default=True, metadata={"help": "capture CUDA graphs for decode"})
    engine_process: str = field(default="auto", metadata={"help": "run the engine loop in a process of its own, "
                                                          "apart from HTTP: auto (on with a GPU), on or off"})
    heartbeat_interval: float = field(default=3.0, metadata={"help": "seconds between heartbeats"})
    max_queue_length: int = field(default=512, metadata={"help": "requests queued before 429"})
    drain_timeout: float = field(default=30.0, metadata={"help": "seconds a stopping worker lets its running "
                                                         "streams finish (after deregistering)"})
    keepalive_interval: float = field(default=1.0, metadata={"help": "seconds between keepalives on a quiet stream"})


@dataclass
class GatewaySettings(InternalPlaneSettings):
    """The OpenAI-compatible API gateway."""

    port: int = 8000
    controller_url: str = field(default="http://127.0.0.1:21001", metadata={"help": "controller base URL"})
    api_keys: list[str] = field(default_factory=list, metadata={"help": "comma-separated API keys ('' = no auth)",
                                                                "aliases": ["--api-key"]})
    api_keys_file: str = field(default="", metadata={"help": "file of API keys, one per line: KEY [rpm=N] [tpm=N]"})
    rate_limit_rpm: int = field(default=0, metadata={"help": "requests per minute per key (0 = unlimited)"})
    rate_limit_tpm: int = field(default=0, metadata={"help": "tokens per minute per key (0 = unlimited)"})
    max_tokens_cap: int = field(default=4096, metadata={"help": "largest max_tokens accepted"})
    max_body_bytes: int = field(default=4 * 1024 * 1024, metadata={"help": "largest request body"})
    worker_stall_timeout: float = field(default=10.0, metadata={"help": "seconds without any event from a worker (tokens or keepalives) before its stream counts as failed"})
    worker_cache_ttl: float = field(default=10.0, metadata={"help": "seconds a known worker address is reused while the controller is down"})
    cors_origins: list[str] = field(default_factory=list, metadata={"help": "allowed CORS origins"})
    metrics_open: bool = field(default=False, metadata={"help": "serve /metrics without an API key"})
    show_topology: bool = field(default=False, metadata={"help": "/status names the workers' addresses, hosts "
                                                         "and pids (else numbered, without addresses)"})
    isolate_prefix_cache_per_key: bool = field(default=False, metadata={"help": "requests of different API keys "
                                                                        "share no prefix-cache blocks"})
    responses_db: str = field(default="~/.local/share/chatserve/responses.sqlite3",
                              metadata={"help": "stored responses (/v1/responses): SQLite file or SQLAlchemy URL "
                                                "('' = store none: previous_response_id then finds nothing)"})


@dataclass
class WebUISettings(BaseSettings):
    """The Gradio web UI (a client of the gateway's /v1 API)."""

    port: int = 7860
    api_url: str = field(default="http://127.0.0.1:8000/v1", metadata={"help": "gateway /v1 base URL"})
    api_key: str = field(default="", metadata={"help": "API key for the gateway"})
    max_message_chars: int = field(default=8000, metadata={"help": "longest user message"})
    max_turns: int = field(default=100, metadata={"help": "user turns per chat"})
    database: str = field(default="~/.local/share/chatserve/webui.sqlite3",
                          metadata={"help": "SQLite file or SQLAlchemy URL (postgresql+psycopg://...)"})
    auth_file: str = field(default="", metadata={"help": "file of USER:PASSWORD lines: require login, one history per user"})
    arena_models: list[str] = field(default_factory=list, metadata={"help": "models offered in the arena ('' = all)"})
