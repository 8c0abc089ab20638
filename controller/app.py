"""The controller service: registry and dispatch over HTTP. Never on the data path.

Routes: POST /register, /heartbeat, /deregister, /dispatch, /dispatch_batch, /report_failure; GET /models,
/status, /health. Internal routes require the shared secret when one is set.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from chatserve.http import guard_internal_plane, install_error_handlers, require_secret, serve, setup_logging
from chatserve.protocol.errors import ChatServeError, NotFoundError, ServiceUnavailableError
from chatserve.protocol.internal import (
    ControllerStatus,
    Deregistration,
    DispatchBatch,
    DispatchBatchResponse,
    DispatchOutcome,
    DispatchRequest,
    DispatchResponse,
    Heartbeat,
    HeartbeatAck,
    ModelInfo,
    ModelsResponse,
    WorkerRegistration,
)
from chatserve.settings import ControllerSettings
from controller.dispatch import choose
from controller.registry import WorkerRegistry

log = logging.getLogger("chatserve.controller")


def build_app(settings: ControllerSettings) -> FastAPI:
    registry = WorkerRegistry(settings.heartbeat_expiry, time.monotonic)
    rng = random.Random()

    async def expiry_loop() -> None:
        while True:
            await asyncio.sleep(settings.expiry_check_interval)
            for wid in registry.expire():
                log.warning("worker %s expired (no heartbeat for %.1fs)", wid, settings.heartbeat_expiry)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(expiry_loop())
        yield
        task.cancel()

    app = FastAPI(title="chatserve controller", lifespan=lifespan)
    app.state.registry = registry
    install_error_handlers(app)

    internal = require_secret(settings.internal_secret)

    @app.get("/health")
    async def health() -> dict[str, object]:
        return {"status": "ok", "workers": len(registry.workers)}

    @app.post("/register", dependencies=[Depends(internal)])
    async def register(reg: WorkerRegistration) -> dict[str, bool]:
        known = reg.worker_id in registry.workers
        registry.register(reg)
        log.info("worker %s %s at %s serving %s", reg.worker_id, "re-registered" if known else "registered",
                 reg.address, reg.models)
        return {"ok": True}

    @app.post("/heartbeat", dependencies=[Depends(internal)])
    async def heartbeat(hb: Heartbeat) -> HeartbeatAck:
        return HeartbeatAck(known=registry.heartbeat(hb.worker_id, hb.load))

    def drop(worker_id: str, level: int, why: str) -> dict[str, bool]:
        removed = registry.remove(worker_id)
        if removed:
            log.log(level, "worker %s %s", worker_id, why)
        return {"ok": removed}

    @app.post("/deregister", dependencies=[Depends(internal)])
    async def deregister(d: Deregistration) -> dict[str, bool]:
        return drop(d.worker_id, logging.INFO, "deregistered")

    @app.post("/report_failure", dependencies=[Depends(internal)])
    async def report_failure(d: Deregistration) -> dict[str, bool]:
        return drop(d.worker_id, logging.WARNING, "dropped: the gateway could not reach it")

    def pick(req: DispatchRequest) -> DispatchResponse:
        known = registry.for_model(req.model)
        if not known:
            if req.model in registry.ever_served:
                raise ServiceUnavailableError(f"no worker is currently serving model '{req.model}'", param="model")
            raise NotFoundError(f"The model '{req.model}' does not exist", param="model", code="model_not_found")
        candidates = [e for e in known if e.worker_id not in req.exclude]
        if not candidates:
            raise ServiceUnavailableError(f"no healthy worker left for model '{req.model}'", param="model")
        entry = choose(candidates, req.prefix_key, rng, settings.dispatch_policy)
        entry.inflight += 1
        if req.prefix_key:
            entry.remember(req.prefix_key)
        return DispatchResponse(worker_id=entry.worker_id, address=entry.reg.address,
                                context_length=entry.reg.context_length)

    @app.post("/dispatch", dependencies=[Depends(internal)])
    async def dispatch(req: DispatchRequest) -> DispatchResponse:
        return pick(req)

    @app.post("/dispatch_batch", dependencies=[Depends(internal)])
    async def dispatch_batch(batch: DispatchBatch) -> DispatchBatchResponse:
        """Several dispatches in order, each decided as /dispatch would (its load counted before the next);
        a refusal is that item's status and envelope, not the call's."""
        results = []
        for req in batch.requests:
            try:
                results.append(DispatchOutcome(worker=pick(req)))
            except ChatServeError as exc:
                results.append(DispatchOutcome(status=exc.status_code, error=exc.to_dict()["error"]))
        return DispatchBatchResponse(results=results)

    @app.get("/models", dependencies=[Depends(internal)])
    async def models() -> ModelsResponse:
        return ModelsResponse(models=[
            ModelInfo(name=name, context_length=min(e.reg.context_length for e in entries), num_workers=len(entries))
            for name, entries in sorted(registry.models().items())
        ])

    @app.get("/status", dependencies=[Depends(internal)])
    async def status() -> ControllerStatus:
        return ControllerStatus(workers=registry.views(), models=sorted(registry.models()))

    return app


def main(argv: Sequence[str] | None = None) -> None:
    settings = ControllerSettings.from_args(argv, prog="chatserve controller")
    setup_logging(settings.log_level)
    guard_internal_plane(settings, "controller")
    serve(build_app(settings), settings.host, settings.port, settings.log_level)
