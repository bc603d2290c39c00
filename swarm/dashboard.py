"""`dllm dashboard`: a self-refreshing web page of the live swarm.

GET /            the page (swarm/static: HTML, JS and CSS; no external resources)
GET /api/swarm   JSON: models, their peers (blocks, throughput, cache, rate, chain account), per-block
                 coverage, and, with a chain URL, each provider's stake, earnings, compute and slashes
                 plus recent settlements.

The snapshot is cached for half the refresh period so many open pages cost one DHT scan.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from chain.config_bounds import bounded, check_bounds
from chain.units import PLANCK_PER_TOKEN
from swarm.chain_view import ChainView
from swarm.http_server import HttpService
from swarm.swarm_view import read_swarm

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"


@dataclass
class DashboardConfig:
    """The one configuration object of a dashboard process."""

    initial_peers: list[str]
    chain_url: str | None = None
    host: str = "127.0.0.1"
    port: int = bounded(8080, ge=0, le=65535)  # 0: pick a free one
    refresh_s: float = bounded(2.0, ge=0.5)  # between page refreshes and swarm scans

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass
class SwarmMonitor:
    """Builds and caches the dashboard's snapshot from the DHT and, optionally, the chain."""

    dht: Any
    chain: ChainView | None = None
    refresh_s: float = 2.0
    _cached: dict[str, Any] | None = None
    _cached_at: float = 0.0
    _sequence: int = 0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def snapshot(self) -> dict[str, Any]:
        async with self._lock:
            if self._cached is None or time.monotonic() - self._cached_at >= self.refresh_s / 2:
                self._cached = await self._build()
                self._cached_at = time.monotonic()
            return self._cached

    async def _build(self) -> dict[str, Any]:
        self._sequence += 1
        body: dict[str, Any] = {
            "sequence": self._sequence,
            "generated_at": time.time(),
            "refresh_s": self.refresh_s,
            "planck_per_token": PLANCK_PER_TOKEN,
            "swarm_error": None,
            "models": [],
            "chain": None,
        }
        try:
            models = await read_swarm(self.dht)
            body["models"] = [m.to_json() for m in models]
        except Exception as error:  # the DHT may be briefly unreachable; show it and retry next time
            logger.warning("reading the swarm failed: %s", error)
            body["swarm_error"] = f"{type(error).__name__}: {error}"
            models = []
        if self.chain is not None:
            accounts = [p.chain_account for m in models for p in m.peers if p.chain_account]
            body["chain"] = (await self.chain.read(accounts)).to_json()
        return body


def create_dashboard_app(monitor: SwarmMonitor) -> FastAPI:
    """The dashboard's FastAPI application over `monitor`."""
    app = FastAPI(title="DLLM swarm dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/swarm")
    async def swarm_state() -> JSONResponse:
        return JSONResponse(await monitor.snapshot(), headers={"Cache-Control": "no-store"})

    return app


class DashboardService(HttpService):
    """`dllm dashboard` as a service (dllm/service.py): a client DHT node, an optional chain view, the HTTP server.

    The lifecycle (port bound first, one exit stack) is swarm/http_server.py's `HttpService`.
    """

    def __init__(self, config: DashboardConfig) -> None:
        super().__init__(config.host, config.port)
        self.config = config

    @property
    def ready_line(self) -> str:
        """What `dllm dashboard` prints once serving (tests parse it)."""
        assert self.http is not None
        return f"DLLM dashboard at {self.http.url}/"

    async def _open_app(self) -> FastAPI:
        """Joins the DHT as a client and opens the chain view; the dashboard app over them."""
        from swarm.dht import start_dht

        dht, _ = await asyncio.to_thread(start_dht, self.config.initial_peers, client_mode=True)
        self._resources.push_async_callback(asyncio.to_thread, dht.shutdown)
        chain = ChainView(self.config.chain_url) if self.config.chain_url else None
        if chain is not None:
            self._resources.callback(chain.close)
        return create_dashboard_app(SwarmMonitor(dht, chain, self.config.refresh_s))
