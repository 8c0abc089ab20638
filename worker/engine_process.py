"""The engine loop in a process of its own (`--engine-process`: on by default with a GPU).

In one process the engine thread and the HTTP event loop share the GIL, and a fault that kills the engine
(a CUDA error, the OOM killer) takes the HTTP server with it. Here a child process loads the model and runs
the engine loop (an `AsyncEngine` thread whose deliveries go down a pipe), and the worker's process keeps
HTTP, chat templates and tokenization. Two one-way pipes: commands to the child (add, abort, embed, stop),
and from it one message per engine step carrying every sequence's delta and the load report.

Measured on an H100 at 64 streaming users (benchmarks/serve_multiturn.py): no throughput gain over the
engine thread (HTTP at 43% of in-process tokens/s either way, both runs before the Triton recompile fix).
What it buys is a worker that outlives its engine and says so on /health. CPU workers keep the thread by
default (their forward pass leaves the GIL for most of a step). The child is spawned (CUDA is never touched in the
parent); it ends with the worker (a daemon), and on its own when the worker dies (its command pipe closes).
Tensor-parallel workers keep the engine in-process: a daemon may not spawn the other ranks.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import multiprocessing
import queue
import threading
from typing import Any

from chatserve.settings import WorkerSettings
from worker.async_engine import AsyncEngine, EngineClient, EngineDeadError, settle_soon
from worker.engine.engine import LLMEngine, SeqOutput
from worker.loader import LoadedModel, ModelLoadError

log = logging.getLogger("chatserve.worker.engine")


class _PipeEngine(AsyncEngine):
    """The child's side: the usual engine thread, its deliveries sent to the parent instead."""

    def __init__(self, engine: LLMEngine, out: Any):
        super().__init__(engine)
        self._out = out
        self._last_load: dict[str, float | int] = {}

    def send(self, msg: tuple) -> None:  # from the engine thread only (and "ready" before it starts)
        self._out.send(msg)

    def _deliver(self, request_id: str, item: Any) -> None:  # a refused request (ValueError)
        self.send(("error", request_id, str(item)))

    def _after_step(self, outputs: list[SeqOutput]) -> None:  # one message a step: the deltas and the load
        self._last_load = self.engine.load()  # what the parent now holds, so the idle report compares with it
        self.send(("out", outputs, self._last_load))

    def _embedded(self, future: Any, result: Any) -> None:  # future: the parent's token
        self.send(("embedded", future, result if not isinstance(result, BaseException) else repr(result)))

    def _report_load(self) -> None:
        load = self.engine.load()
        if load != self._last_load:
            self._last_load = load
            self.send(("load", load))

    def _fail_all(self, reason: str) -> None:
        self.dead = reason
        self.send(("dead", reason))


def _child_main(settings: WorkerSettings, commands: Any, out: Any) -> None:
    from chatserve.http import setup_logging
    from worker.app import build_engine, warm_up

    setup_logging(settings.log_level)
    try:
        loaded, engine = build_engine(settings)
        warm_up(engine)
    except (ModelLoadError, ValueError, OSError) as exc:
        out.send(("failed", "load", str(exc)))
        return
    except Exception as exc:  # noqa: BLE001 - the parent reports it on /health
        log.exception("engine start-up failed")
        out.send(("failed", "internal", f"{type(exc).__name__}: {exc}"))
        return
    meta = LoadedModel(model=None, tokenizer=loaded.tokenizer, name=loaded.name, path=loaded.path,
                       context_length=loaded.context_length)
    core = _PipeEngine(engine, out)
    gc.collect()
    gc.freeze()  # the model's objects: out of the collector's walks while serving
    core.send(("ready", meta, engine.load()))
    core.start()
    while True:
        try:
            cmd, arg = commands.recv()
        except (EOFError, OSError):  # the parent is gone
            break
        if cmd == "stop":
            break
        core._command(cmd, arg)
    core.stop()


class ProcessEngine(EngineClient):
    """The parent's side: the handlers' interface of `AsyncEngine`, the engine in a child process."""

    def __init__(self, proc: Any, commands: Any, out: Any, loaded: LoadedModel, load: dict[str, float | int]):
        super().__init__(load)
        self.loaded = loaded
        self._proc, self._commands, self._out = proc, commands, out
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        self._reader = threading.Thread(target=self._read, name="engine-pipe", daemon=True)
        # commands go down the pipe from a thread of their own: a burst of requests fills the pipe's 64 KiB
        # while the child is mid-step, and a send from the event loop would then stall every stream here
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="engine-commands", daemon=True)

    @classmethod
    def launch(cls, settings: WorkerSettings) -> ProcessEngine:
        """Spawn the child and wait until its model is loaded and warmed up (ModelLoadError if it is not)."""
        ctx = multiprocessing.get_context("spawn")
        cmd_recv, cmd_send = ctx.Pipe(duplex=False)
        out_recv, out_send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child_main, args=(settings, cmd_recv, out_send), name="chatserve-engine",
                           daemon=True)
        proc.start()
        cmd_recv.close()
        out_send.close()  # only the child writes: EOF here once it exits
        try:
            msg = out_recv.recv()
        except EOFError:
            proc.join(timeout=10)
            raise ModelLoadError(f"the engine process exited during start-up (exit code {proc.exitcode})") from None
        if msg[0] == "failed":
            proc.join(timeout=10)
            if msg[1] == "load":
                raise ModelLoadError(msg[2])
            raise RuntimeError(msg[2])
        _, loaded, load = msg
        return cls(proc, cmd_send, out_recv, loaded, load)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def start(self) -> None:
        self._reader.start()
        self._writer.start()

    def stop(self) -> None:
        if self._writer.is_alive():  # whatever is queued goes first
            self._outbox.put(("stop", None))
            self._outbox.put(None)
            self._writer.join(timeout=10)
        else:
            try:
                self._commands.send(("stop", None))
            except (OSError, ValueError):
                pass
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)

    def _command(self, cmd: str, arg: Any) -> None:  # from the event loop's thread
        if cmd == "embed":
            inputs, future = arg
            token = next(self._ids)
            self._futures[token] = future
            arg = (inputs, token)
        self._outbox.put((cmd, arg))

    def _write(self) -> None:
        while (msg := self._outbox.get()) is not None:
            try:
                self._commands.send(msg)
            except (OSError, ValueError):  # the child is gone: the reader has said so or is about to
                self._undeliverable(*msg)

    def _undeliverable(self, cmd: str, arg: Any) -> None:
        if cmd == "add":
            self._deliver(arg[0], EngineDeadError(self.dead or "the engine process is gone"))
        elif cmd == "embed":
            future = self._futures.pop(arg[1], None)
            if future is not None:
                settle_soon(future, EngineDeadError("the engine process is gone"))

    def _read(self) -> None:
        while True:
            try:
                msg = self._out.recv()
            except (EOFError, OSError):
                self._proc.join(timeout=2)  # reaped, so its exit code is known
                self._fail_all(self.dead or f"the engine process exited (exit code {self._proc.exitcode})")
                futures, self._futures = self._futures, {}
                for future in futures.values():
                    settle_soon(future, EngineDeadError(self.dead))
                return
            kind = msg[0]
            if kind == "out":
                self.load = msg[2]
                self._deliver_many(msg[1])
            elif kind == "load":
                self.load = msg[1]
            elif kind == "error":
                self._deliver(msg[1], ValueError(msg[2]))
            elif kind == "embedded":
                future = self._futures.pop(msg[1], None)
                if future is not None:
                    result = msg[2] if not isinstance(msg[2], str) else RuntimeError(msg[2])
                    settle_soon(future, result)
            elif kind == "dead":
                self._fail_all(msg[1])
