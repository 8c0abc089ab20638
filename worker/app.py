"""The model worker service: load -> warm up -> serve -> register -> heartbeat -> deregister.

The HTTP server is up at once; /health answers 503 ("loading") until the model is loaded and warmed up,
and the worker registers with the controller only then, so it never registers a model it cannot serve.
A controller that is down (or not up yet) is retried forever; a restarted controller learns the worker
again from its next heartbeat (it answers `known: false`, the worker re-registers).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import os
import socket
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import torch
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from chatserve.http import (
    guard_internal_plane,
    install_error_handlers,
    require_secret,
    secret_headers,
    serve,
    setup_logging,
)
from chatserve.protocol.errors import (
    BadRequestError,
    ContextLengthError,
    OverloadedError,
    ServiceUnavailableError,
)
from chatserve.protocol.internal import (
    DetokenizeRequest,
    DetokenizeResponse,
    EmbedRequest,
    EmbedResponse,
    GenerateChunk,
    GenerateRequest,
    Heartbeat,
    HeartbeatAck,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprobInfo,
    ToolSpec,
    WorkerLoad,
    WorkerRegistration,
)
from chatserve.protocol.sampling import SamplingParams
from chatserve.settings import WorkerSettings
from chatserve.tools.grammar import json_schema_grammar, tool_grammar, validate
from worker.async_engine import KEEPALIVE, AsyncEngine, EngineClient, EngineDeadError, QueueSlot
from worker.engine.engine import LLMEngine, SeqOutput
from worker.engine.model_runner import CacheConfig, ModelRunner
from worker.engine_process import ProcessEngine
from worker.loader import LoadedModel, ModelLoadError, load_model
from worker.prompting import PromptRenderer

log = logging.getLogger("chatserve.worker")
PING_LINE = b'{"kind":"ping"}\n'

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(settings: WorkerSettings) -> tuple[str, torch.dtype]:
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if settings.dtype == "auto":
        dtype = torch.bfloat16  # on these CPUs too: about 2x the fp32 throughput (benchmarks/serve_multiturn.py)
    else:
        dtype = DTYPES[settings.dtype]
    return device, dtype


@dataclass
class WorkerState:
    settings: WorkerSettings
    worker_id: str
    address: str
    status: str = "loading"  # loading -> ready | failed
    error: str = ""
    loaded: LoadedModel | None = None
    engine: EngineClient | None = None
    renderer: PromptRenderer | None = None
    registered: bool = False
    draining: bool = False  # told to stop: deregistered, takes no new request, finishes the running ones

    def require_ready(self) -> tuple[LoadedModel, EngineClient, PromptRenderer]:
        if self.draining:
            raise ServiceUnavailableError("worker is draining (shutting down)")
        if self.status != "ready" or not self.loaded or not self.engine or not self.renderer:
            raise ServiceUnavailableError(f"worker is {self.status}")
        if self.engine.dead:
            raise ServiceUnavailableError("worker engine failed")
        return self.loaded, self.engine, self.renderer

    def load_report(self) -> WorkerLoad:
        if self.engine is None:
            return WorkerLoad()
        load = dict(self.engine.load)
        load["queue_length"] = max(int(load.get("queue_length", 0)), self.engine.pending)
        return WorkerLoad(**load)  # type: ignore[arg-type]


def use_engine_process(settings: WorkerSettings) -> bool:
    if settings.engine_process not in ("auto", "on", "off"):
        raise ModelLoadError(f"--engine-process must be auto, on or off (got {settings.engine_process!r})")
    if settings.tensor_parallel > 1:  # rank 0 spawns the other ranks: it stays in the worker's process
        return False
    if settings.engine_process == "auto":
        return resolve_device(settings)[0] == "cuda"
    return settings.engine_process == "on"


def build_engine(settings: WorkerSettings) -> tuple[LoadedModel, LLMEngine]:
    device, dtype = resolve_device(settings)
    try:  # settings refused before minutes of loading, not after
        cache = CacheConfig(block_size=settings.block_size, gpu_memory_utilization=settings.gpu_memory_utilization,
                            cpu_cache_tokens=settings.kv_cache_tokens, dtype=settings.kv_cache_dtype)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    if settings.tensor_parallel > 1 and device == "cuda" and torch.cuda.device_count() < settings.tensor_parallel:
        raise ModelLoadError(f"--tensor-parallel {settings.tensor_parallel} needs that many GPUs; this host has "
                             f"{torch.cuda.device_count()}")
    log.info("loading model %s on %s (%s)", settings.model_path or "<embedded SmolLM2-135M-Instruct>", device, dtype)
    t0 = time.monotonic()
    loaded = load_model(settings.model_path or None, device=device, dtype=dtype,
                        context_length=settings.context_length, name=settings.model_name or None,
                        lora=settings.lora, quantize=settings.quantize, tensor_parallel=settings.tensor_parallel)
    log.info("model %s loaded in %.1fs", loaded.name, time.monotonic() - t0)
    if settings.tensor_parallel > 1:
        from worker.engine import tensor_parallel

        # decode CUDA graphs stay off across ranks for now: captured all-reduces hung multi-sequence runs
        runner: ModelRunner = tensor_parallel.start(settings.tensor_parallel, loaded.shards, cache,
                                                    settings.max_num_seqs, loaded.context_length, False)
        loaded.model, loaded.shards = runner.model, None
    else:
        runner = ModelRunner(loaded.model, cache, settings.max_num_seqs, loaded.context_length,
                             use_cuda_graphs=settings.cuda_graphs)
    log.info("KV cache: %d blocks of %d tokens = %d tokens (%.1f full %d-token sequences)", runner.num_blocks,
             runner.block_size, runner.capacity_tokens, runner.capacity_tokens / loaded.context_length,
             loaded.context_length)
    engine = LLMEngine(runner, loaded.tokenizer, max_num_seqs=settings.max_num_seqs,
                       max_batched_tokens=settings.max_batched_tokens,
                       enable_prefix_caching=settings.enable_prefix_caching)
    return loaded, engine


def warm_up(engine: LLMEngine) -> None:
    """Run every kind of step once before serving, so no user pays for a first-time cost (Triton
    specializations of the eager paths, kernel selection): a plain prefill, a mixed step that decodes one
    sequence while prefilling another whose prefix is cached, and decode-only steps."""
    from chatserve.protocol.sampling import SamplingParams

    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    bs = engine.blocks.block_size
    prefix = [(i * 7) % 1000 + 3 for i in range(2 * bs)]
    engine.add_request("warmup-a", prefix + [5], params)
    engine.step()  # prefill of a
    engine.add_request("warmup-b", prefix + [6, 7], params)  # cache hit on a's full blocks, a is decoding
    while engine.has_unfinished():
        engine.step()
    if hasattr(engine.tokenizer, "backend_tokenizer"):
        engine.guide()  # constrained decoding's vocabulary, so the first JSON or tool request does not wait


def advertised_address(settings: WorkerSettings) -> str:
    """The URL the gateway reaches this worker at: --worker-address, else this host's own address when
    bound to every interface (a container's or pod's IP, so `--scale worker=N` needs no per-replica setting)."""
    if settings.worker_address:
        return settings.worker_address.rstrip("/")
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
    return f"http://{host}:{settings.port}"


def build_app(settings: WorkerSettings) -> FastAPI:
    address = advertised_address(settings)
    state = WorkerState(settings, f"{socket.gethostname()}:{settings.port}:{os.getpid()}", address)

    async def startup() -> None:
        try:
            if use_engine_process(settings):
                state.engine = await asyncio.to_thread(ProcessEngine.launch, settings)
                loaded = state.engine.loaded
                log.info("engine running in process %d", state.engine.pid)
            else:
                loaded, engine = await asyncio.to_thread(build_engine, settings)
                await asyncio.to_thread(warm_up, engine)
                state.engine = AsyncEngine(engine)
        except (ModelLoadError, ValueError, OSError) as exc:
            state.status, state.error = "failed", str(exc)
            log.error("model load failed: %s", exc)
            return
        except Exception as exc:  # noqa: BLE001 - report it on /health instead of dying silently
            state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
            log.exception("worker start-up failed")
            return
        state.loaded, state.renderer = loaded, PromptRenderer(loaded.tokenizer, loaded.name, settings.chat_template,
                                                       settings.tool_call_parser, settings.reasoning_parser)
        # loading leaves millions of long-lived objects (modules, tokenizer tables): out of the collector's
        # reach from here on, so a full collection while serving does not walk them (a stall of every stream)
        gc.collect()
        gc.freeze()
        state.engine.start()
        state.status = "ready"
        log.info("worker ready: model %s at %s", loaded.name, address)
        await heartbeat_loop()

    async def heartbeat_loop() -> None:
        assert state.loaded is not None
        reg = WorkerRegistration(worker_id=state.worker_id, address=address, models=[state.loaded.name],
                                 context_length=state.loaded.context_length)
        headers = secret_headers(settings.internal_secret)
        last_sent, last_queue = 0.0, -1
        async with httpx.AsyncClient(base_url=settings.controller_url, timeout=5.0, headers=headers) as client:
            while True:
                try:
                    if not state.registered:
                        reg.load = state.load_report()
                        (await client.post("/register", json=reg.model_dump())).raise_for_status()
                        state.registered = True
                        log.info("registered with controller %s", settings.controller_url)
                        last_sent = time.monotonic()
                    load = state.load_report()
                    due = time.monotonic() - last_sent >= settings.heartbeat_interval
                    if due or load.queue_length != last_queue:  # live queue lengths, not only at heartbeats
                        resp = await client.post("/heartbeat", json=Heartbeat(worker_id=state.worker_id,
                                                                               load=load).model_dump())
                        resp.raise_for_status()
                        last_sent, last_queue = time.monotonic(), load.queue_length
                        if not HeartbeatAck(**resp.json()).known:
                            log.warning("controller does not know this worker (restarted?): registering again")
                            state.registered = False
                            continue
                except (httpx.HTTPError, ValueError) as exc:
                    if state.registered:
                        log.warning("controller unreachable (%s): will keep trying", type(exc).__name__)
                    else:
                        log.info("waiting for controller at %s (%s)", settings.controller_url, type(exc).__name__)
                    last_queue = -1
                    await asyncio.sleep(min(1.0, settings.heartbeat_interval))
                    continue
                await asyncio.sleep(min(0.25, settings.heartbeat_interval))

    async def deregister() -> None:
        if not state.registered:
            return
        try:
            async with httpx.AsyncClient(timeout=2.0, headers=secret_headers(settings.internal_secret)) as client:
                await client.post(f"{settings.controller_url}/deregister", json={"worker_id": state.worker_id})
            log.info("deregistered from controller")
        except httpx.HTTPError:
            log.warning("could not deregister (controller unreachable)")

    tasks: list[asyncio.Task] = []

    async def drain() -> None:
        """Told to stop (SIGTERM, `docker stop`, a rolling update): leave the controller first, so the gateway
        sends new requests elsewhere, refuse new ones (503: the gateway retries them on another worker),
        let the running streams finish for up to --drain-timeout seconds; then the server shuts down."""
        state.draining = True
        for t in tasks:
            t.cancel()  # the heartbeat loop: it would register again
        await deregister()
        state.registered = False
        deadline = time.monotonic() + settings.drain_timeout
        while state.engine is not None and state.engine.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        left = state.engine.pending if state.engine is not None else 0
        log.info("drained: %s", f"{left} requests still running at the timeout" if left else "no request running")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks.append(asyncio.create_task(startup()))
        yield
        for t in tasks:
            t.cancel()
        await deregister()
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="chatserve worker", lifespan=lifespan)
    app.state.worker, app.state.drain = state, drain
    install_error_handlers(app)

    internal = require_secret(settings.internal_secret)

    @app.get("/health")
    async def health() -> Any:
        body = {"status": "draining" if state.draining else state.status, "worker_id": state.worker_id,
                "model": state.loaded.name if state.loaded else None, "registered": state.registered}
        if state.status == "failed":
            body["error"] = state.error
        elif state.engine and state.engine.dead:
            body["error"] = state.engine.dead
        if state.status != "ready" or state.draining or (state.engine and state.engine.dead):
            return JSONResponse(body, status_code=503)
        return body

    @app.get("/status", dependencies=[Depends(internal)])
    async def status() -> dict[str, Any]:
        return {"worker_id": state.worker_id, "status": state.status,
                "model": state.loaded.name if state.loaded else None,
                "context_length": state.loaded.context_length if state.loaded else None,
                "chat_template": state.renderer.template_name if state.renderer else None,
                "engine_pid": getattr(state.engine, "pid", None),  # --engine-process: the engine's own process
                "load": state.load_report().model_dump()}

    @app.post("/tokenize", dependencies=[Depends(internal)])
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        loaded, _, renderer = state.require_ready()
        if req.messages is not None:
            r = render_messages(renderer, req.messages, None, req.add_generation_prompt)
            ids, text = r.token_ids, r.text
        else:
            text = req.prompt or ""
            ids = renderer.encode_prompt(text)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=loaded.context_length, prompt=text)

    @app.post("/detokenize", dependencies=[Depends(internal)])
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        loaded, _, _ = state.require_ready()
        check_token_ids(req.tokens, len(loaded.tokenizer), "tokens")
        return DetokenizeResponse(prompt=loaded.tokenizer.decode(req.tokens))

    @app.post("/embed", dependencies=[Depends(internal)])
    async def embed(req: EmbedRequest) -> EmbedResponse:
        loaded, engine, renderer = state.require_ready()
        inputs: list[list[int]] = []
        for i, item in enumerate(req.inputs):
            ids = renderer.encode_prompt(item) if isinstance(item, str) else list(item)
            check_token_ids(ids, len(loaded.tokenizer), "input")
            if not ids:
                raise BadRequestError(f"input {i} is empty", param="input")
            if len(ids) > loaded.context_length:
                raise ContextLengthError(f"This model's maximum context length is {loaded.context_length} tokens. "
                                         f"However, input {i} has {len(ids)} tokens.", param="input")
            inputs.append(ids)
        try:
            vectors = await engine.embed(inputs)
        except EngineDeadError as exc:
            raise ServiceUnavailableError(str(exc)) from None
        return EmbedResponse(embeddings=[base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vectors],
                             dim=int(vectors[0].shape[0]), prompt_tokens=sum(len(x) for x in inputs))

    @app.post("/generate", dependencies=[Depends(internal)])
    async def generate(req: GenerateRequest) -> StreamingResponse:
        loaded, engine, renderer = state.require_ready()
        if req.params.prompt_logprobs is not None and settings.tensor_parallel > 1:
            raise BadRequestError("prompt logprobs are not served with tensor parallelism yet", param="prompt_logprobs")
        prompt_ids, prompt_text, params = prepare(req, loaded, renderer)
        if engine.pending >= settings.max_queue_length:
            raise OverloadedError(f"worker queue is full ({settings.max_queue_length} requests)")
        # the place is taken here, not when the stream starts: a burst's handlers run one after another
        # before any of their streams does, and would all pass the check above
        slot = QueueSlot(engine)
        first = GenerateChunk(kind="start", prompt_tokens=len(prompt_ids), prompt_text=prompt_text if req.echo else None,
                              tool_format=renderer.tool_format.name if req.tools else None,
                              reasoning=renderer.reasoning_start(prompt_text)
                              if req.messages is not None and params.grammar is None else None)  # a grammar's output is the answer

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield (first.model_dump_json(exclude_defaults=True) + "\n").encode()
                async with aclosing(engine.generate(req.request_id, prompt_ids, params, req.n,
                                                    settings.keepalive_interval, slot)) as outputs:
                    async for out in outputs:
                        yield PING_LINE if out is KEEPALIVE else encode_chunk(out, loaded.tokenizer)  # type: ignore[arg-type]
            except (EngineDeadError, ValueError) as exc:
                err = GenerateChunk(kind="error", error={"message": str(exc), "type": "InternalServerError",
                                                         "param": None, "code": 500})
                yield (err.model_dump_json(exclude_defaults=True) + "\n").encode()
            finally:
                slot.release()

        body = stream()
        weakref.finalize(body, slot.release)  # a response dropped before its stream started (client gone)
        return StreamingResponse(body, media_type="application/x-ndjson")

    return app


def check_token_ids(ids: list[int], vocab: int, param: str) -> None:
    bad = next((t for t in ids if t < 0 or t >= vocab), None)
    if bad is not None:
        raise BadRequestError(f"token id {bad} is out of the vocabulary (0..{vocab - 1})", param=param)


def render_messages(renderer: PromptRenderer, messages: list[Any], template: str | None,
                    add_generation_prompt: bool, tools: ToolSpec | None = None, req: GenerateRequest | None = None) -> Any:
    try:
        return renderer.render([m.model_dump() for m in messages], template, add_generation_prompt,
                               tools.tools if tools else None, req is not None and req.continue_final_message,
                               req.chat_template_kwargs if req is not None else None)
    except KeyError as exc:
        raise BadRequestError(str(exc.args[0]), param="chat_template") from None
    except Exception as exc:  # noqa: BLE001 - a template that rejects the message order (jinja raise)
        raise BadRequestError(f"the chat template cannot render these messages: {exc}", param="messages") from None


def grammar_for(req: GenerateRequest, params: SamplingParams, renderer: PromptRenderer) -> str | None:
    """The grammar constrained decoding follows: tool calls in the model's format (tool_choice required or
    named, auto with a strict tool), a response format, both (auto: a call or the reply format), or none."""
    object_mode = params.response_format == "json_object"
    schema = params.json_schema if params.response_format == "json_schema" else None
    if req.tools is not None:
        grammar = tool_grammar(renderer.tool_format, req.tools.tools, req.tools.choice, req.tools.parallel,
                               schema, object_mode)
        param = "tools"
    elif object_mode or params.response_format == "json_schema":
        grammar, param = json_schema_grammar(schema), "response_format"
    else:
        return None
    error = validate(grammar) if grammar is not None else ""
    if error:
        raise BadRequestError(f"the output cannot be constrained as asked: {error}", param=param)
    return grammar


def prepare(req: GenerateRequest, loaded: LoadedModel, renderer: PromptRenderer) -> tuple[list[int], str, Any]:
    params = req.params.model_copy()
    if params.logit_bias:
        check_token_ids(list(params.logit_bias), len(loaded.tokenizer), "logit_bias")
    params.grammar = grammar_for(req, params, renderer)
    if req.messages is not None:
        r = render_messages(renderer, req.messages, req.chat_template, req.add_generation_prompt, req.tools, req)
        ids, text = r.token_ids, r.text
        params.stop = list(dict.fromkeys([*params.stop, *r.stop]))
        params.stop_token_ids = list(dict.fromkeys([*params.stop_token_ids, *r.stop_token_ids]))
        param_name = "messages"
    elif req.prompt_token_ids is not None:
        ids = list(req.prompt_token_ids)
        check_token_ids(ids, len(loaded.tokenizer), "prompt")
        text = loaded.tokenizer.decode(ids)
        param_name = "prompt"
    else:
        text = req.prompt or ""
        ids = renderer.encode_prompt(text)
        param_name = "prompt"
    if not ids:
        raise BadRequestError("the prompt is empty", param=param_name)
    ctx = loaded.context_length
    if req.max_tokens_unset:
        if len(ids) >= ctx:
            raise ContextLengthError(
                f"This model's maximum context length is {ctx} tokens. However, your messages resulted in "
                f"{len(ids)} tokens. Please reduce the length of the messages.", param=param_name)
        params.max_tokens = min(params.max_tokens, ctx - len(ids))  # the gateway sent its cap
    elif len(ids) + params.max_tokens > ctx:
        raise ContextLengthError(
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{len(ids) + params.max_tokens} tokens ({len(ids)} in the messages, {params.max_tokens} in the "
            f"completion). Please reduce the length of the messages or completion.", param=param_name)
    return ids, text, params


def encode_chunk(out: SeqOutput, tokenizer: Any) -> bytes:
    """One NDJSON line per delta. The hot path (no logprobs) builds the line directly: pydantic costs
    ~5x more per token, and at thousands of tokens per second that is what limits the HTTP path."""
    if out.logprobs is not None or out.prompt_logprobs is not None:
        return (to_chunk(out, tokenizer).model_dump_json(exclude_defaults=True) + "\n").encode()
    line = {"kind": "delta", "index": out.index, "text": out.text, "token_ids": out.token_ids,
            "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "cached_tokens": out.cached_tokens}
    if out.finish_reason is not None:
        line["finish_reason"] = out.finish_reason
    return (json.dumps(line, separators=(",", ":")) + "\n").encode()


def to_chunk(out: SeqOutput, tokenizer: Any) -> GenerateChunk:
    logprobs = None
    if out.logprobs is not None:
        logprobs = [TokenLogprobInfo(token=tokenizer.decode([tid]), logprob=lp,
                                     top=[(tokenizer.decode([t]), v) for t, v in top])
                    for tid, lp, top in out.logprobs]
    prompt = None
    if out.prompt_logprobs is not None:
        prompt = [TokenLogprobInfo(token=tokenizer.decode([tid]), logprob=lp, rank=rank, token_id=tid,
                                   top=[(tokenizer.decode([t]), v) for t, v in top], top_ids=[t for t, _ in top])
                  for tid, lp, rank, top in out.prompt_logprobs]
    return GenerateChunk(kind="delta", index=out.index, text=out.text, token_ids=out.token_ids, logprobs=logprobs,
                         prompt_logprobs=prompt,
                         finish_reason=out.finish_reason, prompt_tokens=out.prompt_tokens,  # type: ignore[arg-type]
                         completion_tokens=out.completion_tokens, cached_tokens=out.cached_tokens)


def main(argv: Sequence[str] | None = None) -> None:
    settings = WorkerSettings.from_args(argv, prog="chatserve worker")
    setup_logging(settings.log_level)
    guard_internal_plane(settings, "worker")
    app = build_app(settings)
    serve(app, settings.host, settings.port, settings.log_level, before_exit=app.state.drain)

