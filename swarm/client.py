"""The client: a model whose blocks run on the swarm while embeddings and head stay local.

`SwarmClient` is the asyncio core (DHT lookups, routing, sessions, forward/backward RPCs);
`DistributedModel` wraps it for ordinary Python code, running the core on a private event-loop thread
so the same object works from scripts, notebooks and other event loops (the HTTP API).

A generation's embeddings and logits are computed in the dtype every announced peer computes in
(`swarm_dtype`; float32 for a mixed swarm), and its hidden states travel in that dtype: a bfloat16 swarm's
greedy tokens are those of the same model run in bfloat16 in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from hivemind import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from chain.config_bounds import bounded, check_bounds
from economy.pricing import Bill, Quote
from economy.pricing import quote as price_quote
from swarm import chunks, protocol, wire_errors
from swarm.billing import BillingConfig, ClientBilling, SessionBilling, route_hops, route_price
from swarm.contributors import ContributorKey
from swarm.dht import start_dht
from swarm.direct import DirectEndpoint, DirectEndpointError, DirectStreamError
from swarm.feedback_records import FeedbackExample, sign_example
from swarm.inference_streams import DirectInferenceStream, InferenceStream, P2PInferenceStream
from swarm.local_head import LocalHead, causal_lm_loss
from swarm.model_files import load_config, model_name, resolve_model
from swarm.provider_standing import ProviderStanding, StandingUnavailableError, describe_standing
from swarm.records import ServerRecord, fetch_model_records
from swarm.routing import BanList, Hop, NoRouteError, plan_route
from swarm.sampling import GenerationParams, next_token
from swarm.session import InferenceSession
from swarm.tensors import InvalidTensorError, check_hidden_states, decode, encode
from swarm.training_billing import TrainingPassBilling

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_PING_FAILURES: tuple[type[Exception], ...] = (ValueError, protocol.RemotePeerError, *protocol.CALL_FAILURES)
"""How a ping fails: an error reply, the call itself, or a peer id that is not base58 (ValueError)."""

# Above this, forward/backward go through the streamed RPCs (hivemind refuses unary messages over 4 MiB).
_UNARY_PAYLOAD_BYTES = 3 * 2**20
_STREAMED = {
    protocol.HANDLER_FORWARD: protocol.HANDLER_FORWARD_STREAM,
    protocol.HANDLER_BACKWARD: protocol.HANDLER_BACKWARD_STREAM,
}

__all__ = [
    "AsyncTextStream",
    "ClientConfig",
    "DistributedModel",
    "FeedbackResult",
    "GenerationParams",
    "GenerationResult",
    "SwarmClient",
    "TextStream",
    "TokenStream",
]


@dataclass
class ClientConfig:
    """How a client talks to the swarm."""

    request_timeout_s: float = 10.0  # a step slower than this counts as a failed peer
    max_failovers: int = 8
    ban_duration_s: float = 60.0
    busy_backoff_s: float = 1.0  # how long a peer that refused for lack of cache is skipped
    max_rate: int | None = None  # skip peers whose advertised rate is above this
    refresh_interval_s: float = 5.0  # re-read DHT records at most this often
    max_retries: int = 3  # for forward/backward RPCs
    max_price_per_token: int | None = None  # planck per generated token for the whole route (economy.pricing)
    billing: BillingConfig | None = None  # pay providers: receipts, settlement, spot checks (swarm/billing.py)
    direct_streams: bool = True  # inference over direct TLS streams where peers offer them (else hivemind P2P)
    direct_connect_timeout_s: float = 2.0  # past this, fall back to P2P for that peer
    # Route only to providers registered on chain with at least this stake (planck), neither unbonding nor
    # slashed (swarm/provider_standing.py). 0: no stake check (a free swarm; no chain needed).
    min_stake: int = bounded(0, ge=0)
    chain_url: str | None = None  # where standing is read (default: billing.chain_url); needed if min_stake > 0
    standing_ttl_s: float = bounded(10.0, gt=0.0)  # how long a provider's status read from chain is reused
    # sr25519 key (//Name, mnemonic, 0x seed) of the chain account that signs feedback passes, which peers file,
    # rate-limit and aggregate under (swarm/contributors.py). None: billing's client_key, else a fresh account.
    contributor_key: str | None = None
    # Publish each answered prompt with its answer, signed by the contributor key (kind "shared-prompt",
    # docs/data.md): `dllm query/chat/api --share-prompts`. False: inference prompts stay private.
    share_prompts: bool = False

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.min_stake > 0 and self.standing_chain_url is None:
            raise ValueError("min_stake > 0 needs a chain to read providers' stake from: set chain_url (or billing)")

    @property
    def standing_chain_url(self) -> str | None:
        """The chain providers' standing is read from: chain_url, else billing's."""
        return self.chain_url or (self.billing.chain_url if self.billing is not None else None)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    route: list[str] = field(default_factory=list)
    route_standing: list[str] = field(default_factory=list)  # each hop's provider standing on chain, as routed by
    # each hop's live adapter version as its DHT record announced it when routed (None: a frozen peer)
    route_versions: list[int | None] = field(default_factory=list)
    failovers: int = 0
    quote: Quote | None = None  # the price bound shown before generating (billing or a price cap set)
    bill: Bill | None = None  # what the countersigned receipts charge (billing set)
    # This request's own inference session (hops with their transports, failover stalls) and billing session
    # (countersigned receipts, meters, errors): one model serves concurrent requests, so they live here.
    session: InferenceSession | None = field(default=None, repr=False, compare=False)
    billing: SessionBilling | None = field(default=None, repr=False, compare=False)


@dataclass
class FeedbackResult:
    """One training pass: the loss of the preferred completion before the pass, and (billing set) that pass's
    own metering and receipts."""

    loss: float
    billing: TrainingPassBilling | None = field(default=None, repr=False, compare=False)


class TokenStream:
    """One generation's new token ids (`async for`), with that request's own state, set as it starts:
    `quote` (the price bound, when billing or a price cap is set), `billing` (its billing session) and
    `session` (its inference session: route, transports, failovers)."""

    def __init__(self) -> None:
        self.quote: Quote | None = None
        self.billing: SessionBilling | None = None
        self.session: InferenceSession | None = None
        self._tokens: AsyncGenerator[int, None] | None = None

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> int:
        assert self._tokens is not None, "made by SwarmClient.generate_tokens"
        return await self._tokens.__anext__()

    async def aclose(self) -> None:
        """Ends the generation early: bills what was served and closes the hops."""
        if self._tokens is not None:
            await self._tokens.aclose()


def swarm_dtype(records: Sequence[ServerRecord]) -> torch.dtype:
    """The dtype a generation's local head computes in: the one every announced peer of the model computes in
    (its embeddings then enter the swarm, and its logits come out, as in that model run in one process), else
    float32 (a mixed or empty swarm)."""
    dtypes = {r.dtype for r in records}
    if len(dtypes) == 1:
        dtype = getattr(torch, dtypes.pop())
        assert isinstance(dtype, torch.dtype)  # records are decoded against COMPUTE_DTYPES
        return dtype
    return torch.float32


_PASS_CONTRIBUTOR: contextvars.ContextVar[ContributorKey | None] = contextvars.ContextVar(
    "dllm_pass_contributor", default=None
)
"""The account signing the feedback pass running in this task (SwarmClient.feedback_pass sets it)."""
_PASS_EXAMPLE: contextvars.ContextVar[FeedbackExample | None] = contextvars.ContextVar(
    "dllm_pass_example", default=None
)
"""The published example the feedback pass running in this task trains on (its backward requests carry it)."""


class SwarmClient:
    """The asyncio core of a client of one model."""

    def __init__(self, model_dir: Path, initial_peers: Sequence[str], config: ClientConfig):
        self.config = config
        self.model_dir = model_dir
        self.model_config = load_config(model_dir)
        self.model = model_name(model_dir, self.model_config)
        self.num_blocks = self.model_config.num_hidden_layers
        self.head = LocalHead(model_dir, self.model_config)
        self.initial_peers = list(initial_peers)
        self.bans = BanList(config.ban_duration_s)
        self.latency: dict[str, float] = {}
        self.record_owners: dict[str, str] = {}  # peer id -> the DHT signing key the peer itself reports
        self.direct_endpoints: dict[str, DirectEndpoint] = {}  # peer id -> its direct stream endpoint (from rpc_info)
        self._records: list[ServerRecord] = []
        self._records_at = 0.0
        self.dht: DHT | None = None
        self.p2p: P2P | None = None
        self.billing: ClientBilling | None = None
        self._contributor: ContributorKey | None = None  # made on the first feedback pass (contributor)
        url = config.standing_chain_url
        # Read only when routing depends on it: min_stake 0 keeps a free swarm's client off the chain.
        self.standing = ProviderStanding(url, config.standing_ttl_s) if url and config.min_stake > 0 else None

    async def start(self) -> None:
        dht, _ = await asyncio.to_thread(start_dht, self.initial_peers, client_mode=True)
        self.dht = dht
        self.p2p = await dht.replicate_p2p()
        if self.config.billing is not None:
            self.billing = ClientBilling(self.config.billing, self.p2p, self.dht, self.model)
            await self.billing.start()

    async def close(self) -> None:
        if self.billing is not None:
            billing, self.billing = self.billing, None
            await billing.close()
        if self.standing is not None:
            standing, self.standing = self.standing, None
            await standing.close()
        if self.p2p is not None:  # the replica's unix socket file stays in /tmp otherwise
            p2p, self.p2p = self.p2p, None
            await p2p.shutdown()
        if self.dht is not None:
            await asyncio.to_thread(self.dht.shutdown)
            self.dht = None

    # --- routing -------------------------------------------------------------------------------

    async def records(self, refresh: bool = False) -> list[ServerRecord]:
        if refresh or time.monotonic() - self._records_at > self.config.refresh_interval_s:
            records = await fetch_model_records(self.dht, self.model, self.num_blocks)
            self._records_at = time.monotonic()
            await self._ping_new(records)
            # Anyone can announce a record naming another peer's id under their own key; only the key the
            # peer itself reports over its authenticated connection may speak for it.
            self._records = [r for r in records if self.record_owners.get(r.peer_id, r.owner) == r.owner]
        return self._records

    async def _ping_new(self, records: list[ServerRecord]) -> None:
        new = {r.peer_id for r in records} - set(self.latency)
        await asyncio.gather(*(self.ping(p) for p in new))

    async def ping(self, peer_id: str, timeout: float = 2.0, samples: int = 2) -> float:
        """Round-trip time of rpc_info to `peer_id` (inf if unreachable); cached for routing.

        The first call to a new peer also dials it (handshakes, and on a busy host whichever dial the
        scheduler served last), so its time says little about the link: the fastest of `samples` calls
        counts. A peer that answered the first call is reachable whatever the later ones do."""
        try:
            started = time.perf_counter()
            reply = await self.call(peer_id, protocol.HANDLER_INFO, runtime_pb2.ExpertRequest(), timeout=timeout)
            rtt = time.perf_counter() - started
            info = protocol.unpack_metadata(reply.metadata)
            owner = info.get("record_owner")
            if isinstance(owner, str):
                self.record_owners[peer_id] = owner
            self._learn_direct_endpoint(peer_id, info.get("direct"))
        except _PING_FAILURES:
            rtt = float("inf")
        else:
            for _ in range(samples - 1):  # over the connection the first call opened: the link alone
                started = time.perf_counter()
                try:
                    await self.call(peer_id, protocol.HANDLER_INFO, runtime_pb2.ExpertRequest(), timeout=timeout)
                except _PING_FAILURES:
                    break
                rtt = min(rtt, time.perf_counter() - started)
        self.latency[peer_id] = rtt
        return rtt

    def _started_p2p(self) -> P2P:
        """The P2P replica start() made."""
        if self.p2p is None:
            raise RuntimeError("SwarmClient.start() has not run (or close() has)")
        return self.p2p

    def _learn_direct_endpoint(self, peer_id: str, value: Any) -> None:
        # rpc_info came over the P2P connection authenticated by `peer_id`: the certificate it names is the peer's.
        self.direct_endpoints.pop(peer_id, None)
        if value is None:
            return
        try:
            self.direct_endpoints[peer_id] = DirectEndpoint.from_info(value)
        except DirectEndpointError as e:
            logger.warning("peer %s advertises a malformed direct endpoint (%s); using P2P", peer_id, e)

    async def open_inference_stream(self, peer_id: str) -> InferenceStream:
        """An inference stream to `peer_id`: direct TLS if the peer offers it and it answers, else hivemind P2P.

        A failed direct attempt re-reads the peer's info once (a restarted peer has a new certificate)."""
        for attempt in range(2):
            endpoint = self.direct_endpoints.get(peer_id) if self.config.direct_streams else None
            if endpoint is None:
                break
            try:
                return await DirectInferenceStream.open(endpoint, self.config.direct_connect_timeout_s)
            except DirectStreamError as e:
                logger.info("no direct stream to %s (%s)%s", peer_id, e, "" if attempt else "; re-reading its info")
                self.direct_endpoints.pop(peer_id, None)
                if attempt == 0:
                    await self.ping(peer_id, samples=1)  # connected already: one call re-reads the info
        return await P2PInferenceStream.open(self._started_p2p(), peer_id)

    async def is_alive(self, peer_id: str) -> bool:
        """Whether `peer_id` answers rpc_info within a second."""
        return await self.ping(peer_id, timeout=1.0, samples=1) != float("inf")

    async def plan(self, start: int, end: int, learning: bool = False) -> list[Hop]:
        """A route for blocks start..end-1, waiting (up to request_timeout_s) for short bans of busy peers to end.
        `learning`: through peers that learn only (a feedback pass)."""
        deadline = time.monotonic() + self.config.request_timeout_s
        while True:
            try:
                return await self._plan_once(start, end, learning)
            except NoRouteError:
                wait = self.bans.seconds_until_next_release()
                if wait is None or time.monotonic() + wait > deadline:
                    raise
                await asyncio.sleep(wait + 0.01)

    async def _plan_once(self, start: int, end: int, learning: bool = False) -> list[Hop]:
        """A route for blocks start..end-1; re-reads the DHT once if the cached records fall short."""
        for refresh in (False, True):
            records = [r for r in await self.records(refresh) if self.latency.get(r.peer_id) != float("inf")]
            if self.config.billing is None:  # a peer that charges refuses a client that does not pay
                records = [r for r in records if not r.charges]
            records, left_out = await self._with_standing(records)
            try:
                cap = self.config.max_price_per_token
                if cap is not None:  # a peer dearer than the cap for a single block can be on no affordable route
                    records = [r for r in records if route_price([Hop(r, r.start, r.start + 1)]) <= cap]
                hops = plan_route(
                    records,
                    start,
                    end,
                    latency=self.latency,
                    banned=self.bans,
                    max_rate=self.config.max_rate,
                    learning=learning,
                )
                if cap is not None and route_price(hops) > cap:
                    raise NoRouteError(
                        f"the best route costs {route_price(hops)} planck per token, above the cap of {cap}"
                    )
                return hops
            except NoRouteError as error:
                if refresh:
                    if left_out:
                        why = "; ".join(f"{peer[-8:]}: {reason}" for peer, reason in sorted(left_out.items()))
                        raise NoRouteError(f"{error}; left out for their standing on chain: {why}") from None
                    raise
        raise AssertionError("unreachable")

    async def _with_standing(self, records: list[ServerRecord]) -> tuple[list[ServerRecord], dict[str, str]]:
        """The records whose provider may be routed to under min_stake, and why each other peer was left out.

        Routing stays a pure function of the records it is given (swarm/routing.py): this is where the client
        drops providers that are unregistered, under-staked, unbonding, slashed or with a slash pending."""
        min_stake = self.config.min_stake
        if self.standing is None or min_stake == 0:
            return records, {}
        accounts = {r.chain_account for r in records if r.chain_account}
        try:
            statuses = await self.standing.statuses(accounts)
        except StandingUnavailableError as error:  # fail closed: never route to providers that could not be checked
            raise NoRouteError(f"min_stake is {min_stake} planck but {error}") from error
        kept, left_out = [], {}
        for record in records:
            if not record.chain_account:
                left_out[record.peer_id] = "announces no chain account"
                continue
            refusal = statuses[record.chain_account].routing_refusal(min_stake)
            if refusal is None:
                kept.append(record)
            else:
                left_out[record.peer_id] = f"{record.chain_account} {refusal}"
        return kept, left_out

    def standing_of(self, record: ServerRecord) -> str:
        """The provider's standing as last read from chain, for route printouts (no chain read)."""
        if self.standing is None:
            return "stake not checked"
        if not record.chain_account:
            return "announces no chain account"
        return describe_standing(self.standing.cached(record.chain_account), self.config.min_stake)

    def report_failure(self, peer_id: str, error: Exception) -> None:
        # A busy peer (cache budget full) is healthy: skip it only briefly. Anything else is banned.
        busy = isinstance(error, protocol.PeerBusyError)
        self.bans.ban(peer_id, self.config.busy_backoff_s if busy else None)
        self._records_at = 0.0  # re-read the DHT on the next plan

    # --- RPCs ----------------------------------------------------------------------------------

    async def call(
        self, peer_id: str, handler: str, request: runtime_pb2.ExpertRequest, timeout: float | None = None
    ) -> runtime_pb2.ExpertResponse:
        response = await asyncio.wait_for(
            self._started_p2p().call_protobuf_handler(
                PeerID.from_base58(peer_id), handler, request, runtime_pb2.ExpertResponse
            ),
            timeout or self.config.request_timeout_s,
        )
        wire_errors.raise_if_error(protocol.unpack_metadata(response.metadata), peer_id)
        return response

    async def _hop_call(
        self,
        hop: Hop,
        handler: str,
        tensors: list[torch.Tensor],
        extra: dict[str, Any] | None = None,
        metered: TrainingPassBilling | None = None,
    ) -> torch.Tensor:
        """forward/backward on one hop; payloads too big for one message go through the streamed variant.

        `extra` adds request metadata (e.g. {"train": True} for a feedback pass); `metered` bills the call.
        Every failure of the hop is a RemotePeerError naming it: an error reply, or HopFailedError."""
        try:
            return await self._hop_call_once(hop, handler, tensors, extra, metered)
        except protocol.RemotePeerError:
            raise
        except protocol.CALL_FAILURES as e:
            raise protocol.HopFailedError(f"{type(e).__name__}: {e}", hop.peer_id) from e

    async def _hop_call_once(
        self,
        hop: Hop,
        handler: str,
        tensors: list[torch.Tensor],
        extra: dict[str, Any] | None,
        metered: TrainingPassBilling | None,
    ) -> torch.Tensor:
        metadata = {"model": self.model, "blocks": [hop.start, hop.end], **(extra or {})}
        if metered is not None:
            metadata.update(metered.request_metadata(hop))
        encoded = [encode(t) for t in tensors]
        if handler == protocol.HANDLER_BACKWARD and metadata.get("train"):  # the pass is filed under its signer
            example = _PASS_EXAMPLE.get()  # the signature binds the pass to the published text it trains on
            metadata["contributor"] = self.contributor().sign_pass(
                self.model, hop.peer_id, (hop.start, hop.end), encoded, example.content_hash() if example else None
            )
            if example is not None:
                metadata["example"] = example.to_json()
        if sum(len(t.buffer) for t in encoded) <= _UNARY_PAYLOAD_BYTES:
            request = runtime_pb2.ExpertRequest(tensors=encoded, metadata=protocol.pack_metadata(metadata))
            response = await self.call(hop.peer_id, handler, request)
            replies = list(response.tensors)
        else:
            replies = await self._streamed_call(hop.peer_id, _STREAMED[handler], chunks.requests(metadata, encoded))
        if len(replies) != 1:
            raise InvalidTensorError(f"peer {hop.peer_id} returned {len(replies)} tensors, expected 1")
        out = decode(replies[0], max_bytes=2**40)
        check_hidden_states(out, tensors[0].shape[-1], 2**31, f"reply of peer {hop.peer_id}")
        if out.shape != tensors[0].shape:
            raise InvalidTensorError(
                f"peer {hop.peer_id} returned shape {list(out.shape)}, expected {list(tensors[0].shape)}"
            )
        if metered is not None:
            metered.observe(hop, handler, tensors, out)
        return out

    async def _streamed_call(
        self, peer_id: str, handler: str, requests: Iterable[runtime_pb2.ExpertRequest]
    ) -> list[runtime_pb2.Tensor]:
        async def produce() -> AsyncIterator[runtime_pb2.ExpertRequest]:
            for request in requests:
                yield request

        async def run() -> list[runtime_pb2.Tensor]:
            stream = await self._started_p2p().iterate_protobuf_handler(
                PeerID.from_base58(peer_id), handler, produce(), runtime_pb2.ExpertResponse
            )
            metadata, tensors = await chunks.receive(stream, max_bytes=2**40)
            wire_errors.raise_if_error(metadata, peer_id)
            return tensors

        return await asyncio.wait_for(run(), self.config.request_timeout_s * 4)

    async def _with_failover(
        self, start: int, end: int, run: Callable[[list[Hop]], Awaitable[_T]], learning: bool = False
    ) -> tuple[list[Hop], _T]:
        last: Exception | None = None
        for _ in range(self.config.max_retries + 1):
            hops = await self.plan(start, end, learning)
            try:
                return hops, await run(hops)
            except (protocol.InvalidRequestError, protocol.InvalidTensorRemoteError):
                raise
            except protocol.RemotePeerError as e:
                last = e
                if e.peer_id:
                    self.report_failure(e.peer_id, e)
                logger.warning("request failed (%s); retrying on another route", e)
        raise RuntimeError(f"request failed after {self.config.max_retries + 1} attempts: {last}") from last

    async def forward_hidden(
        self, hidden: torch.Tensor, extra: dict[str, Any] | None = None, metered: TrainingPassBilling | None = None
    ) -> tuple[torch.Tensor, list[Hop], list[torch.Tensor]]:
        """Runs a full sequence through all blocks (no cache); returns output, route, per-hop inputs."""

        async def run(hops: list[Hop]) -> tuple[torch.Tensor, list[torch.Tensor]]:
            inputs: list[torch.Tensor] = []
            x = hidden
            for hop in hops:
                inputs.append(x)
                x = await self._hop_call(hop, protocol.HANDLER_FORWARD, [x], extra, metered)
            return x, inputs

        learning = bool(extra and extra.get("train"))  # a feedback pass: every hop must learn
        hops, (out, inputs) = await self._with_failover(0, self.num_blocks, run, learning)
        return out, hops, inputs

    async def backward_hidden(
        self,
        hops: list[Hop],
        inputs: list[torch.Tensor],
        grad_out: torch.Tensor,
        extra: dict[str, Any] | None = None,
        metered: TrainingPassBilling | None = None,
    ) -> torch.Tensor:
        """Gradient w.r.t. the first hop's inputs, walking the route backwards."""
        grad = grad_out
        for hop, x in zip(reversed(hops), reversed(inputs), strict=True):
            try:
                grad = await self._hop_call(hop, protocol.HANDLER_BACKWARD, [x, grad], extra, metered)
            except (protocol.InvalidRequestError, protocol.InvalidTensorRemoteError):
                raise
            except protocol.RemotePeerError as e:
                # The peer that holds those blocks is gone: recompute through another route for them.
                self.report_failure(hop.peer_id, e)
                alt = await self.plan(hop.start, hop.end, learning=bool(extra and extra.get("train")))
                grad = await self._backward_segment(alt, x, grad, extra, metered)
        return grad

    async def _backward_segment(
        self,
        hops: list[Hop],
        x: torch.Tensor,
        grad: torch.Tensor,
        extra: dict[str, Any] | None = None,
        metered: TrainingPassBilling | None = None,
    ) -> torch.Tensor:
        inputs = []
        for hop in hops:
            inputs.append(x)
            x = await self._hop_call(hop, protocol.HANDLER_FORWARD, [x], extra, metered)
        for hop, inp in zip(reversed(hops), reversed(inputs), strict=True):
            grad = await self._hop_call(hop, protocol.HANDLER_BACKWARD, [inp, grad], extra, metered)
        return grad

    def contributor(self) -> ContributorKey:
        """The account signing the running feedback pass: the pass's own, else this client's (made once)."""
        key = _PASS_CONTRIBUTOR.get()
        if key is not None:
            return key
        if self._contributor is None:
            uri = self.config.contributor_key or (self.config.billing.client_key if self.config.billing else None)
            self._contributor = ContributorKey.from_uri(uri) if uri else ContributorKey.generate()
        return self._contributor

    async def feedback_pass(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        contributor: ContributorKey | None = None,
        example: FeedbackExample | None = None,
    ) -> FeedbackResult:
        """One training pass through a route of learning peers: forward, loss on `labels` (-100: ignored), backward.

        Each peer on the route files its adapter gradients under the chain account that signs the pass
        (`contributor`, else this client's: `contributor()`) and steps its adapters; the update goes live after
        the span's replicas average and check it. Returns the loss and, with billing configured, the pass's
        billing: each hop's forward and backward are metered and paid like a session.

        `example` is the signed text of the pass (swarm/feedback_records.py; `feedback_example` makes it): every
        hop's backward request carries it, the pass's signature names its hash, and the peers that train on it
        store and publish it. Peers refuse a training pass without one.
        """
        with self.signing_pass(contributor, example):
            return await self._feedback_pass(input_ids, labels)

    @contextlib.contextmanager
    def signing_pass(
        self, contributor: ContributorKey | None = None, example: FeedbackExample | None = None
    ) -> Generator[None, None, None]:
        """Training backward requests sent inside (in this task) are signed by `contributor` (else this client's
        account) and carry `example`, the published text they train on (feedback_pass uses it)."""
        token = _PASS_CONTRIBUTOR.set(contributor)
        example_token = _PASS_EXAMPLE.set(example)
        try:
            yield
        finally:
            _PASS_EXAMPLE.reset(example_token)
            _PASS_CONTRIBUTOR.reset(token)

    async def share_prompt(self, example: FeedbackExample) -> str:
        """Hands an opted-in inference prompt (a signed record of kind "shared-prompt") to the first peer of a
        route, which stores, commits and replicates it like feedback (never trains on it); returns that peer's
        id. A peer that refuses the record itself (invalid_feedback) is not retried."""
        request = runtime_pb2.ExpertRequest(metadata=protocol.pack_metadata({"example": example.to_json()}))
        last: Exception | None = None
        for _ in range(self.config.max_retries + 1):
            peer_id = (await self.plan(0, self.num_blocks))[0].peer_id
            try:
                await self.call(peer_id, protocol.HANDLER_FEEDBACK_SHARE, request)
                return peer_id
            except protocol.InvalidRequestError:
                raise
            except protocol.RemotePeerError as e:
                last = e
                self.report_failure(peer_id, e)
            except protocol.CALL_FAILURES as e:
                last = protocol.HopFailedError(f"{type(e).__name__}: {e}", peer_id)
                self.report_failure(peer_id, last)
        raise RuntimeError(f"no peer took the shared prompt: {last}") from last

    def feedback_example(
        self, prompt: str, completion: str, contributor: ContributorKey | None = None, kind: str = "feedback"
    ) -> FeedbackExample:
        """`prompt` + `completion` signed by `contributor` (else this client's account) for publication
        (FeedbackRecordError if oversized or not text)."""
        key = contributor or self.contributor()
        return sign_example(key.keypair, self.model, prompt, completion, kind=kind)

    async def _feedback_pass(self, input_ids: torch.Tensor, labels: torch.Tensor) -> FeedbackResult:
        train = {"train": True}
        metered = TrainingPassBilling(self.billing.session(sampled=False, spot_checks=False)) if self.billing else None
        try:
            out, hops, inputs = await self.forward_hidden(self.head.embed_tokens(input_ids), train, metered)
            with torch.enable_grad():
                out = out.detach().requires_grad_(True)
                loss = causal_lm_loss(self.head.logits(out), labels)
                (grad,) = torch.autograd.grad(loss, [out])
            await self.backward_hidden(hops, inputs, grad, train, metered)
        finally:
            if metered is not None:  # pay for the work served, even if the pass failed half-way
                try:
                    await metered.finish()
                except Exception as e:  # in a finally: any billing failure goes in the result, not over the outcome
                    logger.warning("billing the training pass failed: %s", e)
                    metered.session.errors.append(e)
        return FeedbackResult(float(loss.detach()), metered)

    # --- generation ----------------------------------------------------------------------------

    def inference_session(
        self, max_length: int, batch: int = 1, billing: SessionBilling | None = None
    ) -> InferenceSession:
        return InferenceSession(
            self.open_inference_stream,
            self.model,
            self.num_blocks,
            self.plan,
            self.report_failure,
            self.is_alive,
            max_length=max_length,
            batch=batch,
            timeout=self.config.request_timeout_s,
            max_failovers=self.config.max_failovers,
            observer=billing.observe if billing else None,
            open_extra=billing.open_extra if billing else None,
            on_payment_required=billing.on_payment_required if billing else None,
        )

    async def quote(self, prompt_tokens: int, max_new_tokens: int, sampled: bool = False) -> Quote:
        """Worst-case price of a request on the route the client would take now (PriceCapExceededError over the cap)."""
        hops = await self.plan(0, self.num_blocks)
        return price_quote(
            self.model,
            route_hops(hops),
            prompt_tokens,
            max_new_tokens,
            sampled=sampled,
            max_price_per_token=self.config.max_price_per_token,
        )

    def generate_tokens(self, prompt_ids: list[int], params: GenerationParams, eos_ids: set[int]) -> TokenStream:
        """New token ids one by one, as an async iterator that also holds this request's quote, billing session
        and inference session (stop strings are the caller's business). Nothing runs before the first token is
        awaited."""
        stream = TokenStream()
        stream._tokens = self._generate(stream, prompt_ids, params, eos_ids)
        return stream

    async def _generate(
        self, into: TokenStream, prompt_ids: list[int], params: GenerationParams, eos_ids: set[int]
    ) -> AsyncGenerator[int, None]:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        total = len(prompt_ids) + params.max_new_tokens
        if total > getattr(self.model_config, "max_position_embeddings", total):
            raise ValueError(
                f"prompt ({len(prompt_ids)}) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
                f"context of {self.model_config.max_position_embeddings} tokens"
            )
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        sampled = params.temperature > 0
        priced = self.billing is not None or self.config.max_price_per_token is not None
        into.quote = await self.quote(len(prompt_ids), params.max_new_tokens, sampled) if priced else None
        billing = into.billing = self.billing.session(sampled) if self.billing is not None else None
        session = into.session = self.inference_session(max_length=total, billing=billing)
        head = self.head.in_dtype(swarm_dtype(await self.records()))

        # Grad modes are thread-local: a `with torch.inference_mode()` held across an await or a yield would
        # leak into every other coroutine on this loop (and into tensors they return), so only the local,
        # synchronous head computations run in it.
        def embed(ids: list[list[int]]) -> torch.Tensor:
            with torch.inference_mode():
                return head.embed_tokens(torch.tensor(ids))

        def choose(hidden: torch.Tensor) -> int:
            with torch.inference_mode():
                return next_token(head.logits(hidden[0, -1]), params, generator)

        try:
            hidden = await session.step(embed([prompt_ids]))
            for _ in range(params.max_new_tokens):
                token = choose(hidden)
                yield token
                if token in eos_ids and not params.ignore_eos:
                    return
                hidden = await session.step(embed([[token]]))
                if billing is not None:
                    await billing.after_step(session.hops)
        finally:
            if billing is not None:  # bill what was served, even if generation stopped early
                try:
                    await billing.finish(session.hops)
                except Exception as e:  # in a finally: any billing failure goes in the result, not over the outcome
                    logger.warning("billing the session failed: %s", e)
                    billing.errors.append(e)
            await session.close()


class _TextStreamBase:
    """What both text streams hold: this request's token stream and, once iteration ended, its result."""

    def __init__(self, tokens: TokenStream) -> None:
        self._tokens = tokens
        self.result: GenerationResult | None = None  # set once the last piece has been read

    @property
    def session(self) -> InferenceSession | None:
        """This request's inference session (route, transports, failovers), once the generation has started."""
        return self._tokens.session


class TextStream(_TextStreamBase):
    """Pieces of text of one generation as they arrive (iterate it once); `close()` stops the generation."""

    def __init__(self, tokens: TokenStream, run: Callable[[Callable[[str], None]], Future[GenerationResult]]) -> None:
        super().__init__(tokens)
        self._pieces = self._iterate(run)

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()

    def _iterate(self, run: Callable[[Callable[[str], None]], Future[GenerationResult]]) -> Generator[str, None, None]:
        pieces: queue.SimpleQueue[str | None] = queue.SimpleQueue()  # None: the generation ended
        future = run(pieces.put)
        future.add_done_callback(lambda _: pieces.put(None))
        try:
            while (piece := pieces.get()) is not None:
                yield piece
        finally:
            if not future.done():  # abandoned: stop paying for tokens nobody reads
                future.cancel()
        self.result = future.result()  # re-raises a failure


class AsyncTextStream(_TextStreamBase):
    """Pieces of text of one generation as they arrive (`async for`, once); `aclose()` cancels the generation."""

    def __init__(self, tokens: TokenStream, run: Callable[[Callable[[str], None]], Future[GenerationResult]]) -> None:
        super().__init__(tokens)
        self._pieces = self._iterate(run)

    def __aiter__(self) -> AsyncTextStream:
        return self

    async def __anext__(self) -> str:
        return await self._pieces.__anext__()

    async def aclose(self) -> None:
        await self._pieces.aclose()

    async def _iterate(
        self, run: Callable[[Callable[[str], None]], Future[GenerationResult]]
    ) -> AsyncGenerator[str, None]:
        caller = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()  # None: the generation ended

        def emit(piece: str) -> None:  # called on the client's loop thread
            caller.call_soon_threadsafe(pieces.put_nowait, piece)

        future = run(emit)
        future.add_done_callback(lambda _: caller.call_soon_threadsafe(pieces.put_nowait, None))
        try:
            while (piece := await pieces.get()) is not None:
                yield piece
        finally:
            if not future.done():
                future.cancel()
        self.result = future.result()


class _LoopThread:
    """A private asyncio loop on a daemon thread; sync code submits coroutines to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="dllm-client-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(cancel_rest(), timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)


class DistributedModel:
    """A language model served by the swarm. Create with `DistributedModel.from_pretrained(...)`."""

    def __init__(self, core: SwarmClient, tokenizer: PreTrainedTokenizerBase, loop: _LoopThread):
        self._core = core
        self._loop = loop
        self.tokenizer = tokenizer
        self.model_name = core.model
        self.config = core.model_config

    @classmethod
    def from_pretrained(
        cls, model: str, initial_peers: Sequence[str], *, config: ClientConfig | None = None
    ) -> DistributedModel:
        """Loads the tokenizer, embeddings and head of `model` locally and joins the swarm."""
        model_dir = resolve_model(model)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        core = SwarmClient(model_dir, initial_peers, config or ClientConfig())
        loop = _LoopThread()
        try:
            loop.run(core.start())
        except BaseException:
            loop.stop()
            raise
        return cls(core, tokenizer, loop)

    @property
    def core(self) -> SwarmClient:
        return self._core

    def close(self) -> None:
        try:
            self._loop.run(self._core.close(), timeout=15)
        finally:
            self._loop.stop()

    def __enter__(self) -> DistributedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- generation ----------------------------------------------------------------------------

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids: list[int] = self.tokenizer(prompt)["input_ids"]
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    @property
    def _eos_ids(self) -> set[int]:
        eos = self.tokenizer.eos_token_id
        return {eos} if eos is not None else set()

    def _decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if not isinstance(text, str):  # transformers types decode() for batches too; one list of ids is one text
            raise TypeError(f"the tokenizer decoded one sequence to {type(text).__name__}")
        return text

    async def _stream_on_loop(
        self, tokens: TokenStream, prompt_tokens: int, params: GenerationParams, emit: Callable[[str], None]
    ) -> GenerationResult:
        """Runs on the private loop; `emit(delta)` is called for each piece of new text."""
        ids: list[int] = []
        text = ""
        finish: Literal["stop", "length"] = "length"
        # aclosing: stopping early (EOS, stop string) must finish the session (bill, close hops) before the
        # result is built, not whenever the abandoned generator is garbage-collected.
        async with contextlib.aclosing(tokens):
            async for token in tokens:
                ids.append(token)
                if token in self._eos_ids and not params.ignore_eos:
                    finish = "stop"
                    break
                full = self._decode(ids)
                if full.endswith("\ufffd"):
                    continue  # an incomplete multi-byte character: wait for the rest
                hit = min((full.find(s) for s in params.stop if s and full.find(s) >= 0), default=-1)
                if hit >= 0:
                    full, finish = full[:hit], "stop"
                if len(full) > len(text):
                    emit(full[len(text) :])
                text = full if len(full) >= len(text) else text
                if finish == "stop":
                    break
        session, billing = tokens.session, tokens.billing
        return GenerationResult(
            text=text,
            token_ids=ids,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(ids),
            route=[f"{h.hop.peer_id}:{h.hop.start}:{h.hop.end}" for h in (session.hops if session else [])],
            route_standing=[self._core.standing_of(h.hop.record) for h in (session.hops if session else [])],
            route_versions=[
                h.hop.record.adapter_version if h.hop.record.learning else None
                for h in (session.hops if session else [])
            ],
            failovers=session.failovers if session else 0,
            quote=tokens.quote,
            bill=billing.bill(self.model_name) if billing is not None else None,
            session=session,
            billing=billing,
        )

    def _start(
        self, prompt: str | list[int], params: GenerationParams
    ) -> tuple[TokenStream, Callable[[Callable[[str], None]], Future[GenerationResult]]]:
        """This request's token stream, and a function that runs it on the private loop emitting text pieces."""
        prompt_ids = self._prompt_ids(prompt)
        tokens = self._core.generate_tokens(prompt_ids, params, self._eos_ids)

        def run(emit: Callable[[str], None]) -> Future[GenerationResult]:
            coro = self._stream_on_loop(tokens, len(prompt_ids), params, emit)
            return asyncio.run_coroutine_threadsafe(coro, self._loop.loop)

        return tokens, run

    def generate(self, prompt: str | list[int], params: GenerationParams | None = None) -> GenerationResult:
        """Generates a completion of `prompt` (text or token ids)."""
        _, run = self._start(prompt, params or GenerationParams())
        return run(lambda _: None).result()

    def stream(self, prompt: str | list[int], params: GenerationParams | None = None) -> TextStream:
        """Pieces of text as tokens arrive; the stream's `result` holds the GenerationResult once it ends."""
        return TextStream(*self._start(prompt, params or GenerationParams()))

    async def agenerate(self, prompt: str | list[int], params: GenerationParams | None = None) -> GenerationResult:
        _, run = self._start(prompt, params or GenerationParams())
        return await asyncio.wrap_future(run(lambda _: None))

    def astream(self, prompt: str | list[int], params: GenerationParams | None = None) -> AsyncTextStream:
        """Pieces of text as tokens arrive (`async for`); the stream's `result` holds the GenerationResult once it
        ends. Closing the stream early (e.g. an HTTP client went away) cancels the generation."""
        return AsyncTextStream(*self._start(prompt, params or GenerationParams()))

    # --- learning from feedback ------------------------------------------------------------------

    def _feedback_tensors(self, prompt: str, completion: str) -> tuple[torch.Tensor, torch.Tensor]:
        return feedback_tensors(self.tokenizer, prompt, completion)

    def feedback(self, prompt: str, completion: str, contributor: ContributorKey | None = None) -> float:
        """Teaches the swarm that `completion` is the preferred answer to `prompt` (one training pass).

        Returns the loss of the completion before this pass. Updates go live after the peers' next
        averaging round accepts them (peers must run with --adapter-rank > 0). The pass is signed by
        `contributor`'s chain account (default: ClientConfig.contributor_key, billing's key, or one fresh
        account per client); peers rate-limit each account. The prompt and completion are public: signed by the
        same account (swarm/feedback_records.py), stored by the peers that train on them and committed on chain
        (docs/data.md).
        """
        ids, labels = self._feedback_tensors(prompt, completion)
        example = self._core.feedback_example(prompt, completion, contributor)
        return self._loop.run(self._core.feedback_pass(ids, labels, contributor, example)).loss

    train_step = feedback

    def share_prompt(self, prompt: str, completion: str, contributor: ContributorKey | None = None) -> str:
        """Publishes `prompt` and the swarm's `completion` (an inference the user opted to share: `--share-prompts`)
        as a record of kind "shared-prompt" signed by `contributor` (default: this client's account); it is
        stored, committed on chain and replicated by peers, and never trained on. Returns the receiving peer's
        id. Inference prompts are private unless shared this way."""
        example = self._core.feedback_example(prompt, completion, contributor, kind="shared-prompt")
        return self._loop.run(self._core.share_prompt(example))

    async def ashare_prompt(self, prompt: str, completion: str, contributor: ContributorKey | None = None) -> str:
        example = self._core.feedback_example(prompt, completion, contributor, kind="shared-prompt")
        future = asyncio.run_coroutine_threadsafe(self._core.share_prompt(example), self._loop.loop)
        return await asyncio.wrap_future(future)

    async def afeedback(self, prompt: str, completion: str, contributor: ContributorKey | None = None) -> float:
        ids, labels = self._feedback_tensors(prompt, completion)
        example = self._core.feedback_example(prompt, completion, contributor)
        future = asyncio.run_coroutine_threadsafe(
            self._core.feedback_pass(ids, labels, contributor, example), self._loop.loop
        )
        return (await asyncio.wrap_future(future)).loss

    # --- full-sequence forward / backward --------------------------------------------------------

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, tokens, vocab] for `input_ids`; differentiable w.r.t. the embeddings if grad is on."""
        hidden = self._core.head.embed_tokens(input_ids)
        return self.forward_embeddings(hidden)

    def forward_embeddings(self, hidden: torch.Tensor) -> torch.Tensor:
        out = _RemoteBlocks.apply(hidden, self)  # type: ignore[no-untyped-call]
        return self._core.head.logits(out)


def feedback_tensors(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) of one feedback example: the loss counts the completion's tokens only. `dllm lineage
    --reproduce` tokenizes committed examples with this too, as the client that sent them did."""
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise ValueError("feedback needs a prompt and a non-empty preferred completion (strings)")
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + completion)["input_ids"]
    if len(full) <= len(prompt_ids):
        raise ValueError("the completion adds no tokens to the prompt")
    labels = [-100] * len(prompt_ids) + full[len(prompt_ids) :]
    return torch.tensor([full]), torch.tensor([labels])


class _RemoteBlocks(torch.autograd.Function):
    """All remote blocks as one autograd op: forward RPCs going out, backward RPCs coming back."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, model: DistributedModel) -> torch.Tensor:  # ctx: as torch types it
        out, hops, inputs = model._loop.run(model._core.forward_hidden(hidden.detach()))
        ctx.model, ctx.hops, ctx.inputs = model, hops, inputs
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad_in = ctx.model._loop.run(ctx.model._core.backward_hidden(ctx.hops, ctx.inputs, grad_out.contiguous()))
        return grad_in, None
