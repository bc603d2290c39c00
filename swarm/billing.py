"""The client side of billing: meter every hop, countersign receipts, pay, hand work to verifiers.

For each hop of an inference session the client runs its own `UsageMeter` over exactly the tensors
it sent and received (the session's `StepObserver` hook), and keeps those tensors for spot checks.
At the end of a session (and whenever a hop has `receipt_every_tokens` unbilled tokens, or unbilled
work worth half the credit limit the hop announces) it asks
each hop for its signed receipt (`dllm.v1.receipt` op propose), refuses any claim above its own
meter (`check_claim`), countersigns, signs ONE settlement extrinsic paying the segment's receipts
(explicit nonce, see economy/presigned_settlement.py), and delivers receipt + extrinsic to every
hop. It then submits the extrinsic itself (providers hold the same bytes, so payment happens even
if this process dies), and sends each receipt selected by the keyed spot-check lottery, as a
`WorkSample`, to verifiers found in the DHT (`dllm.v1.verify`).

Only verifiers the council authorized (`chain.council.Council.authorized_verifiers`, or `BillingConfig.verifiers`)
are sent samples and counted: anyone can announce a verifier in the DHT, and a provider's own verifier reporting
passes would otherwise lower that provider's rate. A sample goes to ONE of them first, drawn by a keyed hash of
this client's secret and the receipt (`VerifierDispatch`), and to more only after a failing verdict (until
`verifiers_per_sample` have judged it), an abstention or an uncountable answer, a disagreement (then to all), or
the keyed audit lottery (`audit_rate`) after a pass: docs/economy.md states the detection bound with lying
verifiers.

The lottery's rate is per provider (`AdaptiveSpotCheck`): it falls with the provider's passed checks and
jumps back to the maximum after a failed one, and it stays at or above the probation floor until the provider
has served this client `probation_requests` requests. The history lives here, in `ClientBilling.check_history`,
fed only by verdicts of authorized verifiers that verify against the verifier's announced account and name
the sampled receipt and its provider (never signed by the provider itself): a provider cannot lower its own
rate with made-up passes, and one failing verdict outweighs any number of passing ones. Its request count is
fed only by this client's own draws (`selects_for_check`, once per receipt it co-signed and paid, training
passes excepted): a provider cannot make it count requests it did not serve. A provider this client has no
history of starts at the maximum.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import msgpack
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from chain.council import Council
from chain.errors import ChainConnectionError, ChainError, EconomyError, UnavailableError
from economy import signing
from economy.canonical import CanonicalFormatError
from economy.metering import StepKind, UsageMeter, step_kind_at
from economy.presigned_settlement import (
    account_nonce,
    included_nonce,
    payments_for,
    release_expired_markers,
    sign_at_nonce,
)
from economy.pricing import Bill, Line, ProviderRate, RouteHop, provider_amount, route_price_per_token
from economy.receipts import (
    RECEIPT_DOMAIN,
    TRAINING_ADAPTERS,
    ForgedReceiptError,
    MalformedReceiptError,
    SignedReceipt,
    UsageReceipt,
    WrongSignerError,
    check_claim,
    check_expiry,
    sign_as_client,
)
from economy.verification import (
    DEFAULT_AUDIT_RATE,
    DEFAULT_MAX_SAMPLE_RATE,
    DEFAULT_MIN_SAMPLE_RATE,
    DEFAULT_PROBATION_RATE,
    DEFAULT_PROBATION_REQUESTS,
    DEFAULT_SAMPLE_DECAY,
    AdaptiveSpotCheck,
    CheckHistory,
    SignedVerdict,
    Verdict,
    VerificationError,
    VerifierDispatch,
    validate_verdict,
)
from economy.work_sample import SampledStep, WorkSample
from swarm import protocol, wire_errors
from swarm.protocol import ReceiptRefusedError
from swarm.routing import Hop

if TYPE_CHECKING:  # substrate-interface loads with the first chain connection (start()), not with this module
    from substrateinterface import Keypair

    from chain.ledger import ComputeLedger

_T = TypeVar("_T")

MARKER_RELEASE_INTERVAL_S = 600.0
"""How often a paying client releases the markers of its expired receipts (economy.presigned_settlement
.release_expired_markers): its locked deposits cover its last RECEIPT_LIFETIME_BLOCKS of receipts plus this."""

_DELIVERY_FAILURES: tuple[type[Exception], ...] = (protocol.RemotePeerError, *protocol.CALL_FAILURES)
"""How delivering a receipt to a hop fails: an error reply, or the call itself."""

logger = logging.getLogger(__name__)

MAX_SAMPLE_MESSAGE_BYTES = protocol.MAX_UNARY_MESSAGE_BYTES - protocol.ENVELOPE_ROOM_BYTES
"""Larger samples are not sent: they would not fit one unary message."""
CHAIN_RETRY_INTERVAL_S = 1.0
CHAIN_RETRY_MAX_INTERVAL_S = 8.0
"""Retries of a settlement the chain could not take start CHAIN_RETRY_INTERVAL_S apart and double up to this."""


@dataclass
class BillingConfig:
    """How a paying client bills its sessions (part of ClientConfig)."""

    chain_url: str
    client_key: str
    """sr25519 key of the paying account: //Name, mnemonic or 0x seed."""
    receipt_every_tokens: int = 512
    sample_rate: float | None = None
    """A fixed spot-check rate for every provider (0 disables checks, 1 checks every receipt); None: the
    adaptive per-provider rate of the five fields below (economy.verification.AdaptiveSpotCheck)."""
    sample_rate_max: float = DEFAULT_MAX_SAMPLE_RATE
    """Rate for a provider with no passed check since its last failure (a new identity starts here)."""
    sample_rate_min: float = DEFAULT_MIN_SAMPLE_RATE
    """Floor the rate never goes below, after probation: the bound for any timing rests on it (docs/economy.md)."""
    sample_decay: float = DEFAULT_SAMPLE_DECAY
    """Factor the rate falls by with each passed check."""
    sample_probation_rate: float = DEFAULT_PROBATION_RATE
    """Floor over a provider's probation: the 99 % bound for a cheater from its first request rests on it."""
    sample_probation_requests: int = DEFAULT_PROBATION_REQUESTS
    """Requests a provider serves this client (since first met or its last failed check) before the floor drops."""
    sample_secret: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    verifiers_per_sample: int = 2
    """Distinct verifiers a FAILED sample goes to (the council's threshold); a passing one goes to one verifier,
    two when the audit lottery draws it (economy.verification.VerifierDispatch)."""
    audit_rate: float = DEFAULT_AUDIT_RATE
    """Share of passed samples confirmed by a second verifier: what exposes a verifier that lies "passed"."""
    verifiers: tuple[str, ...] = ()
    """Accounts whose verdicts count and that get samples; empty: the dev council's authorized verifiers (the
    chain's default council, chain.council.Council.dev, as the ledger and `dllm council` use)."""
    submit_settlements: bool = True
    """False leaves submission to the providers (each holds the signed extrinsic)."""
    request_timeout_s: float = 30.0
    settlement_retry_s: float = 120.0
    """How long paying co-signed receipts is retried while the chain is unreachable (close() waits for it)."""

    def __post_init__(self) -> None:
        if self.receipt_every_tokens < 1 or self.verifiers_per_sample < 1 or self.settlement_retry_s < 0:
            raise ValueError("receipt_every_tokens and verifiers_per_sample must be >= 1, settlement_retry_s >= 0")
        self.spot_check_rule()  # raises ValueError on rates outside [0, 1] or a floor above the maximum
        self.verifier_dispatch()  # raises ValueError on an audit rate outside [0, 1]
        self.authorized_verifier_ids()  # raises InvalidAddressError on an address that names no account

    def spot_check_rule(self) -> AdaptiveSpotCheck:
        """The lottery these settings describe, keyed with `sample_secret`."""
        if self.sample_rate is not None:
            return AdaptiveSpotCheck.fixed(self.sample_rate, self.sample_secret)
        return AdaptiveSpotCheck(
            self.sample_secret,
            self.sample_rate_max,
            self.sample_rate_min,
            self.sample_decay,
            self.sample_probation_rate,
            self.sample_probation_requests,
        )

    def verifier_dispatch(self) -> VerifierDispatch:
        """Which verifiers judge a selected sample, keyed with `sample_secret`."""
        return VerifierDispatch(self.sample_secret, self.audit_rate, self.verifiers_per_sample)

    def authorized_verifier_ids(self) -> frozenset[bytes]:
        """Account ids of the verifiers whose verdicts count."""
        from chain.account_derivation import account_id

        if self.verifiers:
            return frozenset(account_id(v) for v in self.verifiers)
        return Council.dev().authorized_verifier_ids()


class SettlementSubmitError(UnavailableError):
    """The chain refused this client's submission of a settlement, and the receipts it pays are still unpaid."""

    def __init__(self, nonce: int, cause: ChainError):
        super().__init__(f"the chain refused the settlement at nonce {nonce}: {type(cause).__name__}: {cause}")
        self.nonce = nonce


class SettlementFailedError(EconomyError):
    """A block included a transaction at the settlement's nonce, and the receipts it pays are still unpaid.

    The settlement failed in the runtime (or another transaction took its nonce): the nonce is spent, so no
    retry of these bytes can pay them."""

    def __init__(self, nonce: int, reason: str):
        super().__init__(f"settlement at nonce {nonce} failed: {reason}; its receipts stay unpaid")
        self.nonce = nonce


def route_hops(hops: list[Hop]) -> list[RouteHop]:
    """Pricing's view of a route: who is paid, for which blocks, how many parameters, at what rate."""
    return [
        RouteHop(
            h.record.chain_account or h.peer_id,
            h.start,
            h.end,
            (h.end - h.start) * h.record.params_per_block,
            ProviderRate.from_advertised(h.record.rate),
        )
        for h in hops
    ]


def route_price(hops: list[Hop], context_tokens: int = 0, sampled: bool = False) -> int:
    """Planck per generated token of a whole route."""
    return route_price_per_token(route_hops(hops), context_tokens, sampled)


def _same_account(a: str | None, b: str) -> bool:
    from chain.account_derivation import account_id

    try:
        return a is not None and account_id(a) == account_id(b)
    except Exception:  # an unparsable address matches nothing
        return False


def _account_key(address: str) -> bytes | None:
    """The account id behind an SS58 address of any prefix; None for anything else."""
    from chain.account_derivation import account_id

    try:
        return account_id(address)
    except ValueError:  # InvalidAddressError: a DHT record or verdict naming no account matches nothing
        return None


@dataclass
class HopMeter:
    """The client's meter of one hop stream and the tensors a spot check would need."""

    hop: Hop
    meter: UsageMeter
    steps: list[SampledStep] = field(default_factory=list)


class ClientBilling:
    """One paying client: its key, its chain connection (on a private thread), its verifiers."""

    def __init__(self, config: BillingConfig, p2p: P2P, dht: Any, model: str):
        self.config = config
        self.p2p, self.dht, self.model = p2p, dht, model
        self.spot_check = config.spot_check_rule()
        self.check_history: dict[str, CheckHistory] = {}  # provider account -> its spot checks seen by this client
        self.dispatch = config.verifier_dispatch()
        self.authorized_verifiers = config.authorized_verifier_ids()
        self.contradictions: list[str] = []  # samples on which authorized verifiers disagreed (one of them lies)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dllm-billing-chain")
        self.ledger: ComputeLedger | None = None  # both set by start()
        self.keypair: Keypair | None = None
        self.network = ""
        self._next_nonce = 0
        self._background: set[asyncio.Task[object]] = set()
        self._submissions: set[asyncio.Task[object]] = set()  # of them, settlements being submitted
        self.verdicts: list[SignedVerdict] = []
        self.sample_failures: list[str] = []
        self.unverifiable_samples: list[str] = []  # receipt ids drawn for a check but training passes
        self.settlement_failures: list[str] = []  # co-signed receipts this client could not get paid in time
        self.markers_released = 0  # receipt markers of expired receipts released (their deposits returned)
        self._last_release = float("-inf")  # loop time of the last release_markers round

    async def _chain(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args))

    async def start(self) -> None:
        from chain.ledger import ComputeLedger

        ledger = await self._chain(ComputeLedger, self.config.chain_url)
        self.ledger = ledger
        self.keypair = signing.load_keypair(self.config.client_key, ledger.ss58_format)
        self.network = await self._chain(ledger.substrate.get_block_hash, 0)

    def _connected(self) -> tuple[ComputeLedger, Keypair]:
        """The chain connection and key that start() set."""
        if self.ledger is None or self.keypair is None:
            raise RuntimeError("ClientBilling.start() has not run")
        return self.ledger, self.keypair

    @property
    def account(self) -> str:
        address: str = self._connected()[1].ss58_address
        return address

    async def close(self) -> None:
        await self.flush()
        if self.ledger is not None:
            await self._chain(self.ledger.close)
        self._executor.shutdown(wait=False)

    async def flush(self) -> None:
        """Waits for background submissions and spot-check deliveries."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> asyncio.Task[object]:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def settled(self) -> None:
        """Waits for this client's settlement submissions in flight (paid, left to providers, or given up)."""
        while self._submissions:
            await asyncio.gather(*list(self._submissions), return_exceptions=True)

    def session(self, sampled: bool, spot_checks: bool = True) -> SessionBilling:
        return SessionBilling(self, sampled, spot_checks)

    # --- chain ---------------------------------------------------------------------------------

    async def sign_settlement(self, receipts: list[UsageReceipt]) -> tuple[int, bytes]:
        """Signs one settlement paying `receipts` at this client's next unused nonce."""

        def sign() -> tuple[int, bytes]:
            ledger, keypair = self._connected()
            nonce = max(self._next_nonce, account_nonce(ledger, self.account))
            expires_at = min(r.expires_at for r in receipts)  # the era ends by then: the runtime refuses it after
            extrinsic = sign_at_nonce(ledger, keypair, payments_for(receipts), nonce, expires_at)
            self._next_nonce = nonce + 1
            return nonce, extrinsic

        return await self._chain(sign)

    async def chain_head(self) -> int:
        """The chain's best block number."""
        ledger = self._connected()[0]
        return int(await self._chain(ledger.substrate.get_block_number, None))

    async def release_markers(self) -> list[bytes]:
        """Releases the markers of this client's expired receipts (their deposits return); the receipt ids."""
        ledger, keypair = self._connected()
        released = await self._chain(release_expired_markers, ledger, keypair)
        self.markers_released += len(released)
        if released:
            logger.info("released the markers of %d expired receipts", len(released))
        return released

    def release_markers_when_due(self) -> None:
        """Starts a background release_markers() at most every MARKER_RELEASE_INTERVAL_S."""
        now = asyncio.get_running_loop().time()
        if now - self._last_release < MARKER_RELEASE_INTERVAL_S:
            return
        self._last_release = now

        async def release() -> None:
            try:
                await self.release_markers()
            except Exception as e:  # a background task: logged, retried at the next interval
                logger.warning("releasing expired receipt markers failed: %s: %s", type(e).__name__, e)

        self._spawn(release())

    def submit_later(
        self, nonce: int, extrinsic: bytes, receipt_ids: list[bytes], providers_hold_it: bool = True
    ) -> None:
        """Submits a signed settlement in the background (chain calls stay in nonce order).

        While the chain is unreachable or refuses the submission, it retries with backoff for
        `settlement_retry_s`; so it does while a submission at its nonce waits in the pool, and while an
        earlier nonce is missing if no provider holds this extrinsic (a failed delivery), else it leaves it
        to them. Once a block has used its nonce without paying the receipts (the settlement failed in the
        runtime), no retry can pay them. A settlement unpaid either way is counted in `settlement_failures`
        and logged as an error: a payment is never dropped silently, nor taken as done because its nonce moved."""

        def paid_or_spent(ledger: ComputeLedger, cause: str) -> bool:
            """True if the chain paid the receipts; raises SettlementFailedError if a block spent the nonce unpaid."""
            spent = included_nonce(ledger, self.account) > nonce  # read first: a block after it can only pay more
            if len(ledger.settled_on_chain(self.account, receipt_ids)) == len(receipt_ids):
                return True
            if spent:
                raise SettlementFailedError(nonce, cause)
            return False

        def submit() -> bool:
            """True when done: paid, submitted, or left to the providers; False to look again after a pause."""
            ledger = self._connected()[0]
            if paid_or_spent(ledger, "a block used its nonce (a submission failed in the runtime)"):
                return True  # a provider was faster
            next_nonce = account_nonce(ledger, self.account)
            if next_nonce > nonce:
                return False  # a submission at its nonce waits in the pool: see whether its block pays
            if next_nonce < nonce:
                if not providers_hold_it:
                    return False  # only this client holds it: wait for the earlier nonce
                logger.info(
                    "settlement at nonce %d left to the providers (the account is at nonce %d)", nonce, next_nonce
                )
                return True
            try:
                ledger.submit_signed(extrinsic)
            except ChainConnectionError:
                raise
            except ChainError as e:  # a refusal, or a failure in the runtime (DispatchError, InsufficientBalance...)
                if paid_or_spent(ledger, f"{type(e).__name__}: {e}"):
                    return True  # a provider submitted the same bytes a moment earlier
                raise SettlementSubmitError(nonce, e) from e
            return True

        async def until_done() -> None:
            deadline = asyncio.get_running_loop().time() + self.config.settlement_retry_s
            delay, failure = CHAIN_RETRY_INTERVAL_S, "the chain did not confirm it"
            while True:
                try:
                    if await self._chain(submit):
                        return
                except (ChainConnectionError, SettlementSubmitError) as e:  # each try re-reads what the chain holds
                    failure = str(e)
                    logger.warning("settlement at nonce %d: %s; retrying in %.0f s", nonce, e, delay)
                except SettlementFailedError as e:  # the nonce is spent: retrying these bytes cannot pay
                    self.settlement_failures.append(str(e))
                    logger.error("%s", e)
                    return
                except Exception as e:  # a background task: an unforeseen failure is counted, never dropped
                    logger.exception("settlement at nonce %d failed", nonce)
                    self.settlement_failures.append(f"settlement at nonce {nonce} failed: {type(e).__name__}: {e}")
                    return
                if asyncio.get_running_loop().time() + delay > deadline:
                    self.settlement_failures.append(
                        f"settlement at nonce {nonce} not paid in {self.config.settlement_retry_s:.0f} s: {failure}"
                    )
                    logger.error("settlement at nonce %d given up: %s", nonce, failure)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, CHAIN_RETRY_MAX_INTERVAL_S)

        task = self._spawn(until_done())
        self._submissions.add(task)
        task.add_done_callback(self._submissions.discard)

    # --- verifiers -----------------------------------------------------------------------------

    async def verifier_peers(self) -> list[tuple[str, str]]:
        """(peer_id, account) of verifiers announced in the DHT for this model (authorized or not)."""
        found = await self.dht.get(protocol.VERIFIERS_KEY, latest=True, return_future=True)
        if found is None or not isinstance(found.value, dict):
            return []
        peers = []
        for entry in found.value.values():
            value = getattr(entry, "value", None)
            if isinstance(value, dict) and value.get("model") == self.model and isinstance(value.get("peer_id"), str):
                peers.append((value["peer_id"], str(value.get("account", ""))))
        return sorted(peers)

    async def authorized_verifier_peers(self) -> dict[bytes, tuple[str, list[str]]]:
        """Announced verifiers whose account the council authorized, by account id: (the account as announced,
        its peer ids). One account is one verifier however many peers announce it (one chance to be drawn); a
        peer announcing someone else's account gets asked, but its verdicts do not verify against that account."""
        authorized: dict[bytes, tuple[str, list[str]]] = {}
        for peer_id, account in await self.verifier_peers():
            key = _account_key(account)
            if key is not None and key in self.authorized_verifiers:
                authorized.setdefault(key, (account, []))[1].append(peer_id)
        return authorized

    async def send_sample(self, sample: WorkSample) -> list[SignedVerdict]:
        """Hands a work sample to the authorized verifiers `VerifierDispatch` picks; returns the countable verdicts.

        One verifier first (a keyed draw), more only after a failure, an abstention or an uncountable answer, a
        disagreement, or an audit draw. The provider itself is never asked, even if it is an authorized verifier.
        Adapted work is sent too: verifiers fetch the adapters the receipt names by digest and re-run it.
        Only a training pass (unpublished working adapters, priced as unverifiable: docs/economy.md) is not."""
        receipt = sample.receipt.receipt
        if receipt.adapter_version == TRAINING_ADAPTERS:
            self.unverifiable_samples.append(sample.receipt.receipt_id)
            logger.info("receipt %s is not spot-checked: a training pass", sample.receipt.receipt_id)
            return []
        data = sample.encode()
        if len(data) > MAX_SAMPLE_MESSAGE_BYTES:
            self.sample_failures.append(f"sample of {len(data)} bytes is over the RPC limit; not checked")
            return []
        announced = await self.authorized_verifier_peers()
        announced.pop(_account_key(receipt.provider) or b"", None)
        if not announced:
            self.sample_failures.append("no verifier the council authorized is announced in the DHT")
            return []
        work_id = receipt.receipt_id_bytes
        order, audited = self.dispatch.order(work_id, announced), self.dispatch.audits(work_id)
        request = runtime_pb2.ExpertRequest(metadata=msgpack.packb({"sample": data}, use_bin_type=True))
        counted: list[tuple[str, SignedVerdict]] = []
        outcomes: list[bool] = []
        for key in order:
            if len(outcomes) >= self.dispatch.wanted(outcomes, audited, len(order)):
                break
            account, peer_ids = announced[key]
            for peer_id in peer_ids:
                signed = await self._ask_verifier(peer_id, request)
                verdict = None if signed is None else self._countable(sample, account, signed)
                if signed is not None and verdict is not None:
                    counted.append((account, signed))
                    outcomes.append(verdict.passed)
                    break
        if len(set(outcomes)) == 2:
            judged = ", ".join(f"{account}: {'passed' if s.verdict.passed else 'failed'}" for account, s in counted)
            self.contradictions.append(f"receipt {sample.receipt.receipt_id}: {judged}")
            logger.warning("authorized verifiers disagree on receipt %s (%s)", sample.receipt.receipt_id, judged)
        verdicts = [signed for _, signed in counted]
        self.verdicts.extend(verdicts)
        self._record_outcomes(sample, outcomes)
        return verdicts

    async def _ask_verifier(self, peer_id: str, request: runtime_pb2.ExpertRequest) -> SignedVerdict | None:
        """One verifier's signed verdict on the sample in `request`; None if it abstains, errs or does not answer."""
        try:
            response = await asyncio.wait_for(
                self.p2p.call_protobuf_handler(
                    PeerID.from_base58(peer_id), protocol.HANDLER_VERIFY, request, runtime_pb2.ExpertResponse
                ),
                self.config.request_timeout_s,
            )
            meta = msgpack.unpackb(response.metadata, raw=False) if response.metadata else {}
            wire_errors.raise_if_error(meta, peer_id)
            return SignedVerdict.decode(meta["verdict"])
        except Exception as e:  # one verifier failing must not stop the others: the next one is asked
            self.sample_failures.append(f"verifier {peer_id}: {type(e).__name__}: {e}")
            return None

    def selects_for_check(self, signed: SignedReceipt) -> bool:
        """The lottery for one co-signed receipt, at the rate its provider's history with this client gives; the
        receipt counts as one request of the provider's probation. Call it once per receipt this client co-signed."""
        provider = signed.receipt.provider
        selected, history = self.spot_check.draw(
            self.check_history.get(provider, CheckHistory()), signed.receipt.receipt_id_bytes
        )
        self.check_history[provider] = history
        return selected

    def _countable(self, sample: WorkSample, account: str, signed: SignedVerdict) -> Verdict | None:
        """The verdict if it counts: an authorized verifier's, signed by the account it announced, about this
        receipt and provider, not by the provider itself; else None (the reason goes to `sample_failures`)."""
        receipt = sample.receipt
        key = _account_key(account)
        if key is None or key not in self.authorized_verifiers:
            self.sample_failures.append(f"verdict from {account or 'an unnamed verifier'} not counted: not authorized")
            return None
        if _account_key(signed.verdict.verifier) != key:  # compared as account ids: SS58 prefixes differ
            self.sample_failures.append(f"verdict on {receipt.receipt_id} not counted: not signed by {account}")
            return None
        try:
            verdict = validate_verdict(signed, [signed.verdict.verifier])
        except VerificationError as e:
            self.sample_failures.append(f"verdict on {receipt.receipt_id} not counted: {e}")
            return None
        if verdict.receipt_id != receipt.receipt.receipt_id_bytes or verdict.provider != receipt.receipt.provider:
            self.sample_failures.append(f"verdict from {account} is not about receipt {receipt.receipt_id}")
            return None
        if key == _account_key(receipt.receipt.provider):
            self.sample_failures.append(f"verdict from {account} not counted: the provider judging its own work")
            return None
        return verdict

    def _record_check(self, sample: WorkSample, answers: list[tuple[str, SignedVerdict]]) -> None:
        """Updates the provider's history from the countable verdicts among `answers` (announced account,
        verdict); a failing one wins; none countable (no verifier, abstention, garbage) changes nothing."""
        outcomes = []
        for account, signed in answers:
            verdict = self._countable(sample, account, signed)
            if verdict is not None:
                outcomes.append(verdict.passed)
        self._record_outcomes(sample, outcomes)

    def _record_outcomes(self, sample: WorkSample, outcomes: list[bool]) -> None:
        if not outcomes:
            return
        receipt = sample.receipt
        provider = receipt.receipt.provider
        passed = all(outcomes)
        self.check_history[provider] = self.spot_check.after(self.check_history.get(provider, CheckHistory()), passed)
        if not passed:
            logger.warning(
                "provider %s failed a spot check of receipt %s: its check rate is back to %.2f",
                provider,
                receipt.receipt_id,
                self.spot_check.rate(self.check_history[provider]),
            )


class SessionBilling:
    """Billing of one inference session: the observer for its hops and its receipts."""

    def __init__(self, billing: ClientBilling, sampled: bool, spot_checks: bool = True):
        self.billing = billing
        self.sampled = sampled
        # Training passes run the peers' working adapters, which no verifier can reproduce: not sampled.
        self.spot_checks = spot_checks
        self.meters: dict[str, HopMeter] = {}
        self.receipts: list[SignedReceipt] = []
        self.undelivered: list[SignedReceipt] = []  # co-signed and paid by this client's own submission only
        self.errors: list[Exception] = []

    @property
    def open_extra(self) -> dict[str, Any]:
        """Opening metadata every hop gets: who pays, and whether the session samples."""
        return {"client": self.billing.account, "sampled": self.sampled}

    def observe(
        self, stream: Any, inputs: torch.Tensor, outputs: torch.Tensor, position: int, kind: StepKind | None = None
    ) -> None:
        """StepObserver: meters one completed step of a hop, exactly as it crossed the wire.

        `kind` defaults by position (prompt at 0, else generated); training passes give it explicitly."""
        hm = self.meters.get(stream.session_id)
        if hm is None:
            hop = stream.hop
            hm = HopMeter(
                hop,
                UsageMeter(
                    stream.session_id.encode(),
                    self.billing.model,
                    hop.start,
                    hop.end,
                    (hop.end - hop.start) * hop.record.params_per_block,
                    sampled=self.sampled,
                ),
            )
            self.meters[stream.session_id] = hm
        kind = kind or step_kind_at(position)
        tokens = int(inputs.shape[0] * inputs.shape[1])
        hm.meter.record_step(kind, tokens, inputs, outputs, position)
        hm.steps.append(SampledStep(kind, position, inputs.detach().clone(), outputs.detach().clone()))

    async def after_step(self, streams: list[Any]) -> None:
        """Settles the hops that have accumulated `receipt_every_tokens` unbilled tokens, or half the hop's
        credit limit in planck (so the hop never has to refuse this client: economy/credit.py)."""
        due = [s for s in streams if s.session_id in self.meters and self._due(self.meters[s.session_id])]
        if due:
            await self.settle(due)

    def _due(self, hm: HopMeter) -> bool:
        if hm.meter.segment_tokens() >= self.billing.config.receipt_every_tokens:
            return True
        record = hm.hop.record
        if record.credit_limit <= 0:
            return False
        unbilled = provider_amount(
            ProviderRate.from_advertised(record.rate), hm.meter.params_served, hm.meter.segment_usage()
        )
        return 2 * unbilled >= record.credit_limit

    async def on_payment_required(self, stream: Any, error: protocol.PaymentRequiredError) -> bool:
        """A hop refused a step until paid: settle its unbilled work, wait until this client's settlements
        are submitted, and retry the step once (True). A missing identity cannot be fixed here (False)."""
        if error.missing is not None:
            return False
        logger.info("%s asks for payment: owed %d of a %d planck limit", stream.hop.peer_id, error.owed, error.limit)
        hm = self.meters.get(stream.session_id)
        if hm is not None and hm.meter.segment_tokens() > 0:
            await self.settle([stream])
        await self.billing.settled()
        return True

    async def finish(self, streams: list[Any]) -> None:
        """Settles every hop's unbilled work at the end of the session."""
        await self.settle(
            [s for s in streams if s.session_id in self.meters and self.meters[s.session_id].meter.segment_tokens() > 0]
        )

    async def settle(self, streams: list[Any]) -> list[SignedReceipt]:
        """Receipts for the given hops' current segments, one settlement paying them, delivered to each."""
        signed: list[tuple[Any, SignedReceipt]] = []
        for stream in streams:
            try:
                signed.append((stream, await self._countersign(stream)))
            except Exception as e:  # one provider's refusal must not stop paying the others
                logger.warning("no receipt from %s: %s", stream.hop.peer_id, e)
                self.errors.append(e)
        if not signed:
            return []
        try:
            return await self._pay(signed)
        except ChainConnectionError as e:
            # The receipts are co-signed: this client owes them. Pay them once the chain is back.
            logger.warning("cannot sign the settlement now (%s); retrying in the background", e)
            self.billing._spawn(self._pay_when_reachable(signed))
            return []

    async def _pay_when_reachable(self, signed: list[tuple[Any, SignedReceipt]]) -> None:
        deadline = asyncio.get_running_loop().time() + self.billing.config.settlement_retry_s
        while True:
            await asyncio.sleep(CHAIN_RETRY_INTERVAL_S)
            try:
                await self._pay(signed)
                return
            except ChainConnectionError as e:
                if asyncio.get_running_loop().time() > deadline:
                    ids = ", ".join(s.receipt.receipt_id for _, s in signed)
                    self.billing.settlement_failures.append(f"receipts {ids} unpaid: {e}")
                    logger.error(
                        "co-signed receipts %s stay unpaid: the chain was unreachable for %.0f s",
                        ids,
                        self.billing.config.settlement_retry_s,
                    )
                    return

    async def _pay(self, signed: list[tuple[Any, SignedReceipt]]) -> list[SignedReceipt]:
        """Signs one settlement for the co-signed receipts, delivers both to each hop, submits it."""
        nonce, extrinsic = await self.billing.sign_settlement([s.receipt for _, s in signed])
        delivered, undelivered = [], []
        for stream, s in signed:
            try:
                await self._call(stream.hop.peer_id, {"op": "deliver", "signed": s.encode(), "settlement": extrinsic})
                delivered.append(s)
            except _DELIVERY_FAILURES as e:  # this client submits undelivered ones
                logger.warning("receipt delivery to %s failed: %s", stream.hop.peer_id, e)
                self.errors.append(e)
                undelivered.append(s)
        self.receipts.extend(delivered)
        self.undelivered.extend(undelivered)
        # A receipt no provider holds is paid only if this client submits (even with submit_settlements off).
        if self.billing.config.submit_settlements or undelivered:
            self.billing.submit_later(
                nonce, extrinsic, [s.receipt.receipt_id_bytes for _, s in signed], providers_hold_it=not undelivered
            )
        self.billing.release_markers_when_due()
        for stream, s in signed:
            if self.spot_checks and self.billing.selects_for_check(s):
                sample = WorkSample(s, tuple(self.meters[stream.session_id].steps))
                self.billing._spawn(self.billing.send_sample(sample))
        return delivered

    async def _countersign(self, stream: Any) -> SignedReceipt:
        hm = self.meters[stream.session_id]
        reply = await self._call(stream.hop.peer_id, {"op": "propose", "session_id": stream.session_id})
        raw_receipt, provider_signature = reply.get("receipt"), reply.get("provider_signature")
        try:
            if not isinstance(raw_receipt, bytes):
                raise MalformedReceiptError("the proposal holds no receipt bytes")
            receipt = UsageReceipt.decode(raw_receipt)
        except (MalformedReceiptError, CanonicalFormatError) as e:
            raise MalformedReceiptError(f"peer {stream.hop.peer_id} proposed a malformed receipt: {e}") from None
        if not isinstance(provider_signature, bytes):
            raise ForgedReceiptError(f"{stream.hop.peer_id}'s receipt proposal carries no provider signature")
        record = hm.hop.record
        if not _same_account(record.chain_account, receipt.provider):
            raise WrongSignerError(
                f"receipt names provider {receipt.provider}, the peer announced {record.chain_account}"
            )
        if receipt.client != self.billing.account or receipt.network != self.billing.network:
            raise WrongSignerError("the receipt names another client or another chain")
        if receipt.session_id != hm.meter.session_id or (receipt.start, receipt.end) != (hm.hop.start, hm.hop.end):
            raise MalformedReceiptError("the receipt is for another session or span")
        if not signing.verify(receipt.provider, RECEIPT_DOMAIN, receipt.encode(), provider_signature):
            raise ForgedReceiptError(f"the provider signature on {stream.hop.peer_id}'s receipt does not verify")
        check_claim(
            receipt,
            hm.meter.segment_usage(),
            hm.meter.commitment,
            ProviderRate.from_advertised(record.rate),
            (hm.hop.end - hm.hop.start) * record.params_per_block,
            announced_dtype=record.dtype,
        )
        check_expiry(receipt, await self.billing.chain_head(), proposed=True)  # bounds how long its marker stays
        hm.meter.close_segment()
        keypair = self.billing._connected()[1]
        return SignedReceipt(receipt, provider_signature, sign_as_client(receipt, keypair))

    async def _call(self, peer_id: str, metadata: dict[str, Any]) -> dict[str, Any]:
        request = runtime_pb2.ExpertRequest(metadata=protocol.pack_metadata(metadata))
        response = await asyncio.wait_for(
            self.billing.p2p.call_protobuf_handler(
                PeerID.from_base58(peer_id), protocol.HANDLER_RECEIPT, request, runtime_pb2.ExpertResponse
            ),
            self.billing.config.request_timeout_s,
        )
        meta = protocol.unpack_metadata(response.metadata)
        wire_errors.raise_if_error(meta, peer_id)  # ReceiptRefusedError for the receipt kinds
        return meta

    def bill(self, model: str) -> Bill:
        """What the session cost: one line per delivered receipt (amounts as the receipts state them)."""
        lines = []
        for s in self.receipts:
            r = s.receipt
            hop = RouteHop(r.provider, r.start, r.end, r.params_served, r.rate)
            lines.append(Line(hop, r.usage, r.amount))
        return Bill(model=model, lines=tuple(lines), total=sum(line.amount for line in lines))


__all__ = ["BillingConfig", "ClientBilling", "ReceiptRefusedError", "SessionBilling", "route_hops", "route_price"]
