"""Operators' routes: /health (no key), /metrics (Prometheus; behind the key unless --metrics-open),
/status (the workers behind the gateway)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from chatserve.gateway.deps import auth
from chatserve.protocol.errors import ServiceUnavailableError

router = APIRouter()


async def metrics_auth(request: Request) -> None:
    if not request.app.state.settings.metrics_open:
        await auth(request)


@router.get("/metrics", dependencies=[Depends(metrics_auth)], response_class=PlainTextResponse)
async def prometheus(request: Request) -> Response:
    metrics = request.app.state.metrics
    try:
        metrics.set_workers(await request.app.state.upstream.status())
    except ServiceUnavailableError:
        pass  # controller down: worker gauges stay empty, gateway counters still served
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/health")
async def health(request: Request) -> Any:
    try:
        models = await request.app.state.upstream.models()
    except ServiceUnavailableError:
        return JSONResponse({"status": "degraded", "controller": "unreachable"}, status_code=503)
    return {"status": "ok", "models": [m.name for m in models.models]}


def redacted(status: dict[str, Any]) -> dict[str, Any]:
    """The workers' view without the internal topology: no addresses, and the worker ids (host, port and
    pid) replaced by a number; what an operator watches (models, queues, cache, throughput) stays."""
    workers = []
    for i, w in enumerate(sorted(status.get("workers", []), key=lambda w: w.get("worker_id", "")), start=1):
        workers.append({**{k: v for k, v in w.items() if k not in ("worker_id", "address")}, "worker_id": f"worker-{i}",
                        "address": ""})
    return {**status, "workers": workers}


@router.get("/status", dependencies=[Depends(auth)])
async def status(request: Request) -> Any:
    """The workers behind this gateway; their addresses and ids only with --show-topology."""
    full = await request.app.state.upstream.status()
    return full if request.app.state.settings.show_topology else redacted(full)
