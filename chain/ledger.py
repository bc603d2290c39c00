"""ComputeLedger: DLLM's economy on the standard pallets of an Asset Hub-like runtime.

Synchronous (substrate-interface is): async callers run it in a thread (`asyncio.to_thread`),
one ledger per thread. See docs/chain.md for the design and who can move which funds.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scalecodec.types import GenericCall
from substrateinterface import Keypair

from chain.account_derivation import (
    BURN_ACCOUNT,
    RECEIPT_REGISTRY_ACCOUNT,
    account_id,
    address,
    blake2_256,
    escrow_account,
    escrow_indices,
    multisig_account,
)
from chain.council import Council
from chain.errors import (
    AlreadyRegisteredError,
    ChainConnectionError,
    DispatchError,
    DisputePendingError,
    DoubleSettlementError,
    InsufficientBalanceError,
    InsufficientStakeError,
    InvalidPaymentError,
    NotRegisteredError,
    QuorumError,
    SlashPendingError,
    UnbondNotReadyError,
    UnknownAccountError,
)
from chain.history import MAX_DISPUTE_REASON, LedgerIndex
from chain.lineage import adapter_version_body, data_batch_body
from chain.pro_rata import split_pro_rata, split_shares
from chain.records import (
    ChainResult,
    ComputeTotals,
    DisputeRecord,
    ExtrinsicEffects,
    OpenSlashProposal,
    Payment,
    ProviderState,
    ProviderStatus,
    SettledReceipt,
)
from chain.remarks import encode_remark
from chain.settlement_codec import SettlementLayout
from chain.storage_keys import blake2_128_concat, storage_prefix, twox64_concat
from chain.submission import ExtrinsicSubmitter
from chain.substrate_connection import ResilientSubstrate
from chain.units import PLANCK_PER_TOKEN

logger = logging.getLogger(__name__)

# Far above any fee this client's extrinsics pay on Asset Hub (a 100-receipt settlement: ~1e9).
_FEE_CEILING = PLANCK_PER_TOKEN
# Extrinsics whose effects paid_on_chain keeps (a settlement is read once, then its receipts in any order).
_EFFECTS_CACHE_SIZE = 4096


@dataclass
class LedgerConfig:
    """One ledger client's settings (defaults match the dev chain)."""

    url: str
    council: Council = field(default_factory=Council.dev)
    min_stake: int = 1 * PLANCK_PER_TOKEN
    unbond_delay_blocks: int = 10
    # Blocks a provider's dispute stays open (holding its unbond; council members re-run its evidence once more).
    dispute_window_blocks: int = 20
    # Blocks an open slash proposal holds its provider's unbond: the other members' time to re-check and join.
    # Past it, a proposal nobody joined (a lone member's, or one the others refused) no longer traps the stake.
    slash_hold_blocks: int = 30
    # First block that can hold protocol records (the deployment block on a real chain).
    start_block: int = 0
    burn_account: bytes = BURN_ACCOUNT


class ComputeLedger:
    """Typed client for registration, compute records, settlement, slashing and queries."""

    def __init__(self, url: str | None = None, config: LedgerConfig | None = None) -> None:
        if config is None:
            if url is None:
                raise ValueError("give the chain url or a LedgerConfig")
            config = LedgerConfig(url=url)
        self.config = config
        try:
            # Survives node restarts (see chain/substrate_connection.py); transport failures: ChainConnectionError.
            self.substrate = ResilientSubstrate(url=config.url)
            self.substrate.init_runtime()
        except (ConnectionError, OSError) as exc:
            raise ChainConnectionError(f"cannot reach the chain at {config.url}: {exc}") from exc
        self.ss58_format: int = self.substrate.ss58_format
        self.council_account = config.council.account()
        self.submitter = ExtrinsicSubmitter(self.substrate)
        self.index = LedgerIndex(self.substrate, self.council_account, config.start_block, config.council.member_ids())
        # Keyed by (block hash, extrinsic index): a block read at a height that a re-org replaced is never reused.
        self._effects: OrderedDict[tuple[str, int], ExtrinsicEffects] = OrderedDict()
        self._layout: tuple[object, SettlementLayout] | None = None

    def close(self) -> None:
        self.substrate.close()

    def __enter__(self) -> ComputeLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- helpers -------------------------------------------------------------------------------
    def address(self, account: bytes) -> str:
        return address(account, self.ss58_format)

    def escrow_of(self, provider_ss58: str) -> str:
        """The SS58 address of a provider's stake escrow."""
        return self.address(escrow_account(self.council_account, account_id(provider_ss58)))

    def _call(self, module: str, function: str, params: dict[str, Any]) -> GenericCall:
        # Encoded against the runtime metadata loaded by the last query or signature (every operation
        # queries the chain before composing): substrate-interface's compose_call re-checks the runtime
        # with 3 RPCs per call, which made a 500-receipt settlement spend most of a second composing.
        if self.substrate.metadata is None:
            self.substrate.init_runtime()
        call = self.substrate.runtime_config.create_scale_object("Call", metadata=self.substrate.metadata)
        call.encode({"call_module": module, "call_function": function, "call_args": params})
        return call

    def _remark(self, kind: str, body: dict[str, Any]) -> GenericCall:
        return self._call("System", "remark_with_event", {"remark": "0x" + encode_remark(kind, body).hex()})

    def _batch(self, calls: list[GenericCall]) -> GenericCall:
        return self._call("Utility", "batch_all", {"calls": calls})

    def _from_escrow(self, provider: bytes, call: GenericCall) -> GenericCall:
        """Wrap `call` so it dispatches from the provider's escrow (when sent by the council)."""
        for index in reversed(escrow_indices(provider)):
            call = self._call("Utility", "as_derivative", {"index": index, "call": call})
        return call

    def _account_info(self, account: bytes) -> dict[str, Any]:
        info: dict[str, Any] = self.substrate.query("System", "Account", ["0x" + account.hex()]).value
        return info

    def _spendable(self, account: bytes) -> int:
        data = self._account_info(account)["data"]
        frozen = max(data.get("misc_frozen", 0), data.get("fee_frozen", 0), data.get("frozen", 0))
        spendable: int = data["free"] - frozen
        return spendable

    def _require_funds(self, signer: Keypair, call: GenericCall, outflow: int) -> None:
        """Refuse before submitting when the signer cannot cover `outflow` plus the fee:
        the chain state stays untouched (a dispatch failure would still charge the fee)."""
        info = self._account_info(signer.public_key)
        if info["providers"] == 0 and info["data"]["free"] == 0:
            raise UnknownAccountError(
                f"account {signer.ss58_address} does not exist on this chain (no balance); fund it first"
            )
        existential = int(self.substrate.get_constant("Balances", "ExistentialDeposit").value)
        spendable = self._spendable(signer.public_key)
        if spendable >= outflow + existential + _FEE_CEILING:
            return  # clearly enough: skip the fee estimate (a runtime call) on the hot path
        fee = int(self.substrate.get_payment_info(call, signer)["partialFee"])
        needed = outflow + fee + existential
        if spendable < needed:
            raise InsufficientBalanceError(
                f"{signer.ss58_address} has {spendable} planck spendable but needs {needed} "
                f"({outflow} + fee {fee} + existential deposit {existential})"
            )

    # ---- provider registration ----------------------------------------------------------------
    def register_provider(self, provider: Keypair, stake: int) -> ChainResult:
        """Bond `stake` into the provider's escrow and record the registration (one batch_all)."""
        if not isinstance(stake, int) or stake < self.config.min_stake:
            raise InsufficientStakeError(f"stake must be at least {self.config.min_stake} planck, got {stake!r}")
        self.index.sync()
        entry = self.index.providers.get(provider.public_key)
        if entry is not None and entry.unbonded_at is None:
            raise AlreadyRegisteredError(
                f"{provider.ss58_address} is already registered (since block {entry.registered_at})"
            )
        escrow = escrow_account(self.council_account, provider.public_key)
        owner = self.index.escrow_owner.get(escrow)
        if owner is not None and owner != provider.public_key:
            raise AlreadyRegisteredError(f"escrow {self.address(escrow)} already belongs to {self.address(owner)}")
        call = self._batch(
            [
                self._call("Balances", "transfer_keep_alive", {"dest": self.address(escrow), "value": stake}),
                self._remark("register", {"escrow": escrow.hex(), "stake": stake}),
            ]
        )
        self._require_funds(provider, call, stake)
        return self.submitter.submit(provider, call)

    def request_unbond(self, provider: Keypair) -> ChainResult:
        """Ask the council to return the stake; possible after `unbond_delay_blocks`."""
        status = self.provider_status(provider.ss58_address)
        if status.state is not ProviderState.REGISTERED:
            raise NotRegisteredError(f"{provider.ss58_address} cannot request an unbond: {status.state.value}")
        call = self._remark("unbond-request", {})
        self._require_funds(provider, call, 0)
        return self.submitter.submit(provider, call)

    def unbond(self, council: list[Keypair], provider_ss58: str) -> ChainResult:
        """Council returns the whole remaining stake to the provider once the delay has passed, no slash of it is
        pending (a member's open slash proposal: `propose_slash`, for `slash_hold_blocks` after it opened) and no
        dispute of its is open (`file_dispute`)."""
        provider = account_id(provider_ss58)
        status = self.provider_status(provider_ss58)
        if status.state is not ProviderState.UNBONDING:
            raise UnbondNotReadyError(f"{provider_ss58} has no pending unbond request ({status.state.value})")
        head = self.substrate.get_block_number(None)
        if status.unbond_ready_at is not None and head < status.unbond_ready_at:
            raise UnbondNotReadyError(
                f"unbond of {provider_ss58} is possible from block {status.unbond_ready_at} (now {head})"
            )
        if status.slash_holds:
            raise SlashPendingError(
                f"{provider_ss58} has {len(status.open_slashes)} slash(es) pending in the council "
                f"({', '.join('0x' + h.hex()[:16] for h in status.open_slashes)}): execute or cancel them first, "
                f"or wait until the council's hold ends (block {status.slash_hold_until}, now {head})"
            )
        if status.open_disputes:
            last = max(d.open_until for d in status.open_disputes)
            disputed = ", ".join(d.evidence_hash.hex()[:16] for d in status.open_disputes)
            raise DisputePendingError(
                f"{provider_ss58} disputes evidence {disputed}"
                f": no unbond before the council's decision window closes (block {last}, now {head})"
            )
        calls = [self._remark("unbond", {"provider": provider.hex()})]
        if status.stake > 0:
            calls.append(
                self._from_escrow(
                    provider, self._call("Balances", "transfer_all", {"dest": provider_ss58, "keep_alive": False})
                )
            )
        return self._council_execute(council, self._batch(calls))

    # ---- compute records -------------------------------------------------------------------------
    def record_compute(
        self, provider: Keypair, receipts_hash: bytes, tokens_x_params: int, requests: int
    ) -> ChainResult:
        """Record compute `provider` claims to have served, tied to the hash of the signed receipts it covers.

        Self-reported: `compute_ledger` lists it under `claimed`, never in the totals, which come only
        from the compute the paying clients' settlements record."""
        if not isinstance(receipts_hash, (bytes, bytearray)) or len(receipts_hash) != 32:
            raise InvalidPaymentError("receipts_hash must be 32 bytes (the hash of the signed receipts)")
        if not isinstance(tokens_x_params, int) or not isinstance(requests, int) or tokens_x_params < 0 or requests < 0:
            raise InvalidPaymentError("tokens_x_params and requests must be non-negative integers")
        call = self._remark(
            "compute",
            {
                "receipts": bytes(receipts_hash).hex(),
                "tokens_x_params": tokens_x_params,
                "requests": requests,
            },
        )
        self._require_funds(provider, call, 0)
        return self.submitter.submit(provider, call)

    # ---- lineage records (chain/lineage.py) --------------------------------------------------------
    def commit_data_batch(self, peer: Keypair, model: str, span: Sequence[int], hashes: Sequence[bytes]) -> ChainResult:
        """A `data-batch` record of feedback content hashes (1..256, in order) from the peer's own account."""
        return self._commit_record(peer, "data-batch", data_batch_body(model, span, hashes))

    def commit_adapter_version(
        self,
        peer: Keypair,
        model: str,
        span: Sequence[int],
        version: int,
        parent: int,
        sha256: bytes,
        parent_sha256: bytes | None,
        data_roots: Sequence[bytes],
        replicas: Sequence[str],
        canary_before: Mapping[str, float],
        canary_after: Mapping[str, float],
    ) -> ChainResult:
        """An `adapter-version` record (a version that went live on this peer) from the peer's own account."""
        body = adapter_version_body(
            model, span, version, parent, sha256, parent_sha256, data_roots, replicas, canary_before, canary_after
        )
        return self._commit_record(peer, "adapter-version", body)

    def _commit_record(self, signer: Keypair, kind: str, body: dict[str, Any]) -> ChainResult:
        """Submit one record paid by `signer`: a bad body is refused before signing (MalformedRemarkError), a
        signer that cannot pay before submitting (UnknownAccountError, InsufficientBalanceError)."""
        call = self._remark(kind, body)
        self._require_funds(signer, call, 0)
        return self.submitter.submit(signer, call)

    # ---- settlement ------------------------------------------------------------------------------
    def marker_account(self, client_ss58: str) -> bytes:
        """The 2-of-2 multisig (client + keyless registry) whose open operations mark settled receipts."""
        return multisig_account([account_id(client_ss58), RECEIPT_REGISTRY_ACCOUNT], 2)

    def settled_on_chain(self, client_ss58: str, receipt_ids: list[bytes]) -> list[bytes]:
        """The receipts among `receipt_ids` whose settlement marker exists on chain (O(1) each).

        A marker blocks any further settlement of its receipt, but anyone holding the client's key can
        make one without paying (a bare `approve_as_multi`): a provider asks `paid_on_chain` instead."""
        marker = self.marker_account(client_ss58)
        prefix = storage_prefix("Multisig", "Multisigs") + twox64_concat(marker)
        keys = {"0x" + (prefix + blake2_128_concat(r)).hex(): r for r in receipt_ids}
        settled = []
        key_list = list(keys)
        for start in range(0, len(key_list), 500):  # keep each RPC request small
            reply = self.substrate.rpc_request("state_queryStorageAt", [key_list[start : start + 500]])
            for change_set in reply["result"]:
                for key, value in change_set["changes"]:
                    if value is not None:
                        settled.append(keys[key])
        return settled

    def marker_timepoints(self, client_ss58: str, receipt_ids: list[bytes]) -> dict[bytes, tuple[int, int]]:
        """For each marked receipt among `receipt_ids`: (block height, extrinsic index) of the approval that
        created its marker (the `when` of its `Multisig.Multisigs` entry; a marker only says that, not paid)."""
        marker = self.marker_account(client_ss58)
        prefix = storage_prefix("Multisig", "Multisigs") + twox64_concat(marker)
        keys = {"0x" + (prefix + blake2_128_concat(r)).hex(): r for r in receipt_ids}
        found: dict[bytes, tuple[int, int]] = {}
        key_list = list(keys)
        for start in range(0, len(key_list), 500):  # keep each RPC request small
            reply = self.substrate.rpc_request("state_queryStorageAt", [key_list[start : start + 500]])
            for change_set in reply["result"]:
                for key, value in change_set["changes"]:
                    if value is not None:
                        raw = bytes.fromhex(value.removeprefix("0x"))  # Multisig { when: Timepoint {u32, u32}, ..}
                        found[keys[key]] = (int.from_bytes(raw[0:4], "little"), int.from_bytes(raw[4:8], "little"))
        return found

    def open_markers(self, client_ss58: str) -> dict[bytes, tuple[int, int]]:
        """Every receipt marker the client holds open: receipt id -> (height, index) of the extrinsic that made it."""
        marker = self.marker_account(client_ss58)
        prefix = "0x" + (storage_prefix("Multisig", "Multisigs") + twox64_concat(marker)).hex()
        ids: list[bytes] = []
        start_key: str | None = None
        while True:  # keys are prefix + blake2_128(receipt id) + receipt id: the id is the last 32 bytes
            page = self.substrate.rpc_request("state_getKeysPaged", [prefix, 1000, start_key])["result"]
            ids += [bytes.fromhex(key[-64:]) for key in page]
            if len(page) < 1000:
                break
            start_key = page[-1]
        return self.marker_timepoints(client_ss58, ids) if ids else {}

    def release_markers(self, client: Keypair, receipt_ids: list[bytes]) -> ChainResult | None:
        """Cancels the client's markers of `receipt_ids` in one batch (`Multisig.cancel_as_multi` each), which
        returns each marker's deposit. Ids without a marker are skipped; None when none has one.

        Only for receipts that have EXPIRED (economy.receipts): a released marker no longer blocks a second
        settlement of its receipt, and what refuses one then is the receipt's expiry (the settlement era).
        """
        registry = "0x" + RECEIPT_REGISTRY_ACCOUNT.hex()
        timepoints = self.marker_timepoints(client.ss58_address, receipt_ids)
        if not timepoints:
            return None
        calls = [
            self._call(
                "Multisig",
                "cancel_as_multi",
                {
                    "threshold": 2,
                    "other_signatories": [registry],
                    "timepoint": {"height": height, "index": index},
                    "call_hash": "0x" + rid.hex(),
                },
            )
            for rid, (height, index) in timepoints.items()
        ]
        call = self._batch(calls)
        self._require_funds(client, call, 0)
        return self.submitter.submit(client, call)

    def extrinsic_effects(self, height: int, index: int) -> ExtrinsicEffects:
        """What extrinsic `index` of block `height` did (its events); cached, one block read per extrinsic."""
        block_hash = str(self.substrate.get_block_hash(height))
        cached = self._effects.get((block_hash, index))
        if cached is not None:
            self._effects.move_to_end((block_hash, index))
            return cached
        events = (
            (r.value["module_id"], r.value["event_id"], r.value["attributes"])
            for r in self.substrate.get_events(block_hash)
            if r.value.get("extrinsic_idx") == index
        )
        return self._keep_effects(block_hash, index, events)

    def _keep_effects(self, block_hash: str, index: int, events: Iterable[tuple[str, str, Any]]) -> ExtrinsicEffects:
        """The effects of extrinsic `index` of block `block_hash` from its events (as substrate-interface decodes
        them), cached for extrinsic_effects."""
        success, multisigs, transfers = False, [], []
        for module, name, attrs in events:
            if (module, name) == ("System", "ExtrinsicSuccess"):
                success = True
            elif (module, name) == ("Multisig", "NewMultisig"):
                call_hash = bytes.fromhex(str(attrs["call_hash"]).removeprefix("0x"))
                multisigs.append((account_id(attrs["approving"]), account_id(attrs["multisig"]), call_hash))
            elif (module, name) == ("Balances", "Transfer"):
                transfers.append((account_id(attrs["from"]), account_id(attrs["to"]), int(attrs["amount"])))
        effects = ExtrinsicEffects(success, tuple(multisigs), tuple(transfers))
        self._effects[(block_hash, index)] = effects
        if len(self._effects) > _EFFECTS_CACHE_SIZE:
            self._effects.popitem(last=False)
        return effects

    def _submitted(self, result: ChainResult) -> ChainResult:
        """Keeps the effects of an extrinsic this ledger submitted, read from the events its submission already
        decoded (the same block's events, filtered by its index): paid_on_chain then reads no block again."""
        events = ((e.module, e.name, e.attributes) for e in result.events)
        self._keep_effects(result.block_hash, result.extrinsic_index, events)
        return result

    def paid_on_chain(
        self,
        client_ss58: str,
        provider_ss58: str,
        receipt_ids: list[bytes],
        amounts: Callable[[set[bytes]], Mapping[bytes, int]],
    ) -> set[bytes]:
        """The receipts among `receipt_ids` that the chain shows PAID to the provider, not merely marked.

        A receipt is paid when the extrinsic that created its marker succeeded, was the client's, and
        transferred from the client to the provider at least the sum of ALL of that provider's receipts
        it marked. `amounts(ids)` answers, for the ids an extrinsic marked, the amount of each one the
        provider knows as its own (ids it does not know belong to other providers and are not counted).
        A marker made without its transfer (a bare `approve_as_multi`), or with too small a transfer,
        leaves the receipts unpaid, and forever so: the marker blocks any later settlement of them.
        One block read per extrinsic (cached), so a 500-receipt settlement costs one read.
        """
        client = account_id(client_ss58)
        provider = account_id(provider_ss58)
        marker = self.marker_account(client_ss58)
        by_extrinsic: dict[tuple[int, int], set[bytes]] = defaultdict(set)
        for rid, when in self.marker_timepoints(client_ss58, receipt_ids).items():
            by_extrinsic[when].add(rid)
        paid: set[bytes] = set()
        for (height, index), ids in by_extrinsic.items():
            effects = self.extrinsic_effects(height, index)
            if not effects.success:
                continue
            marked = effects.marked_by(client, marker)
            owed = dict(amounts(marked))
            if not owed or effects.transferred(client, provider) < sum(owed.values()):
                continue
            paid |= ids & marked & owed.keys()
        return paid

    def build_settlement(self, client: Keypair, payments: list[Payment]) -> tuple[GenericCall, int]:
        """Validate and compose the settlement call (markers + transfers + record in one batch_all)."""
        if not payments:
            raise InvalidPaymentError("a settlement needs at least one payment")
        ids = [p.receipt_id for p in payments]
        for payment in payments:
            split_pro_rata(payment)  # validates
        if len(set(ids)) != len(ids):
            raise InvalidPaymentError("the same receipt appears twice in one settlement")
        already = self.settled_on_chain(client.ss58_address, ids)
        if already:
            raise DoubleSettlementError(already)
        per_provider: dict[bytes, int] = defaultdict(int)
        records = []
        for payment in payments:
            # v2 record: [receipt, [[provider, planck, params served], ...], tokens, requests] (docs/chain.md)
            shares = [
                (account_id(s.provider), a, s.params_served)
                for s, a in zip(payment.shares, split_shares(payment), strict=True)
            ]
            for provider, amount, _ in shares:
                if amount > 0:
                    per_provider[provider] += amount
            records.append(
                [
                    payment.receipt_id.hex(),
                    [[p.hex(), a, params] for p, a, params in shares],
                    payment.tokens,
                    payment.requests,
                ]
            )
        calls = [self._marker(rid) for rid in ids]
        calls += [self._transfer(p, amount) for p, amount in per_provider.items()]
        calls.append(self._remark("settle", {"receipts": records}))
        deposit = int(self.substrate.get_constant("Multisig", "DepositBase").value) + 2 * int(
            self.substrate.get_constant("Multisig", "DepositFactor").value
        )
        outflow = sum(per_provider.values()) + deposit * len(ids)
        return self._batch(calls), outflow

    def settle(self, client: Keypair, payments: list[Payment]) -> ChainResult:
        """Pay many receipts in one extrinsic; each receipt at most once (see docs/chain.md)."""
        call, outflow = self.build_settlement(client, payments)
        self._require_funds(client, call, outflow)
        return self._submitted(self.submitter.submit(client, call))

    def _marker(self, receipt_id: bytes) -> GenericCall:
        """A settlement's marker of one receipt: the client's approval, in its 2-of-2 with the keyless registry,
        of an operation whose call hash is the receipt id (docs/chain.md)."""
        return self._call(
            "Multisig",
            "approve_as_multi",
            {
                "threshold": 2,
                "other_signatories": ["0x" + RECEIPT_REGISTRY_ACCOUNT.hex()],
                "maybe_timepoint": None,
                "call_hash": "0x" + receipt_id.hex(),
                "max_weight": 0,
            },
        )

    def _transfer(self, dest: bytes, amount: int) -> GenericCall:
        return self._call("Balances", "transfer_keep_alive", {"dest": self.address(dest), "value": amount})

    def settlement_layout(self) -> SettlementLayout:
        """The byte templates of a settlement's calls on the current runtime, made by the same encoder as
        build_settlement (chain/settlement_codec.py parses offers against them); cached per runtime version."""
        if self.substrate.metadata is None:
            self.substrate.init_runtime()
        version = self.substrate.runtime_version
        if self._layout is None or self._layout[0] != version:
            marker_hash, dest = blake2_256(b"dllm:layout:marker"), blake2_256(b"dllm:layout:dest")
            layout = SettlementLayout.from_templates(
                empty_batch=bytes(self._batch([]).data.data),
                marker=bytes(self._marker(marker_hash).data.data),
                marker_hash=marker_hash,
                transfer=bytes(self._transfer(dest, 0).data.data),
                transfer_dest=dest,
                empty_remark=bytes(self._call("System", "remark_with_event", {"remark": "0x"}).data.data),
                signed_extensions=list(self.substrate.metadata.get_signed_extensions()),
            )
            self._layout = (version, layout)
        return self._layout[1]

    def sign_settlement(self, client: Keypair, payments: list[Payment]) -> bytes:
        """A signed settlement extrinsic as SCALE bytes, to submit later with submit_signed()."""
        call, outflow = self.build_settlement(client, payments)
        self._require_funds(client, call, outflow)
        return bytes(self.submitter.sign(client, call).data.data)

    def submit_signed(self, extrinsic: bytes) -> ChainResult:
        """Submit an extrinsic signed elsewhere; a forged signature raises InvalidSignatureError."""
        return self._submitted(self.submitter.submit_encoded(extrinsic))

    def is_settled(self, receipt_id: bytes, client_ss58: str | None = None) -> bool:
        """Whether a receipt was paid: an on-chain marker lookup when the client is known,
        else the indexed settlement history."""
        if client_ss58 is not None:
            return bool(self.settled_on_chain(client_ss58, [receipt_id]))
        self.index.sync()
        return receipt_id in self.index.settled

    # ---- slashing ----------------------------------------------------------------------------------
    def _slash_call(
        self, provider_ss58: str, amount: int | None, evidence_hash: bytes, beneficiary_ss58: str | None
    ) -> GenericCall:
        """The council call that moves `amount` (None: all) of the stake out of the provider's escrow,
        checked against the provider's status now."""
        provider = account_id(provider_ss58)
        if not isinstance(evidence_hash, (bytes, bytearray)) or len(evidence_hash) != 32:
            raise InvalidPaymentError("evidence_hash must be 32 bytes")
        status = self.provider_status(provider_ss58)
        if status.state is ProviderState.NOT_REGISTERED or status.state is ProviderState.UNBONDED:
            raise NotRegisteredError(f"{provider_ss58} is not a registered provider")
        if amount is not None and (not isinstance(amount, int) or amount <= 0):
            raise InsufficientStakeError(f"slash amount must be a positive integer, got {amount!r}")
        if status.stake == 0 or (amount is not None and amount > status.stake):
            raise InsufficientStakeError(f"{provider_ss58} has {status.stake} planck staked; cannot slash {amount}")
        beneficiary = account_id(beneficiary_ss58) if beneficiary_ss58 else self.config.burn_account
        move = (
            self._call("Balances", "transfer_all", {"dest": self.address(beneficiary), "keep_alive": False})
            if amount is None
            else self._call("Balances", "transfer", {"dest": self.address(beneficiary), "value": amount})
        )
        body = {
            "provider": provider.hex(),
            "amount": amount,
            "evidence": bytes(evidence_hash).hex(),
            "beneficiary": beneficiary.hex(),
        }
        return self._batch([self._remark("slash", body), self._from_escrow(provider, move)])

    def propose_slash(
        self,
        member: Keypair,
        provider_ss58: str,
        amount: int | None,
        evidence_hash: bytes,
        beneficiary_ss58: str | None = None,
    ) -> bytes:
        """One council member opens a slash: its approval of the slash call plus a `slash-open` record naming
        the provider and the call hash (one batch_all). Nothing moves; until the slash executes (`slash` with
        the same arguments and the remaining approvals) or is cancelled, the provider's unbond is refused.
        Returns the call hash."""
        if not self.config.council.is_member(member.public_key):
            raise QuorumError(f"{member.ss58_address} is not a council member")
        call = self._slash_call(provider_ss58, amount, evidence_hash, beneficiary_ss58)
        call_hash = blake2_256(call.data.data)
        if self._pending_council_operation(call_hash) is not None:
            return call_hash  # already open: a second proposal would only fail in the runtime
        approve = self._call(
            "Multisig",
            "approve_as_multi",
            {
                "threshold": self.config.council.threshold,
                "other_signatories": self._other_signatories(member),
                "maybe_timepoint": None,
                "call_hash": "0x" + call_hash.hex(),
                "max_weight": 0,
            },
        )
        # Names the evidence so that every other member re-checks and approves this exact call (open_slash_proposals).
        record = self._remark(
            "slash-open",
            {"provider": account_id(provider_ss58).hex(), "call": call_hash.hex(), "evidence": evidence_hash.hex()},
        )
        batch = self._batch([approve, record])
        self._require_funds(member, batch, 0)
        self.submitter.submit(member, batch)
        return call_hash

    def protocol_slash_hash(self, provider_ss58: str, evidence_hash: bytes) -> bytes:
        """The call hash of the protocol's slash citing `evidence_hash` (the whole stake, burnt): what a member
        compares an open proposal's call hash with before approving it (another call is never approved)."""
        return blake2_256(self._slash_call(provider_ss58, None, evidence_hash, None).data.data)

    def open_slash_proposals(self, provider_ss58: str | None = None) -> list[OpenSlashProposal]:
        """Slashes council members opened that are neither executed nor cancelled (of one provider, or of all),
        oldest first, each with the evidence its `slash-open` record names."""
        self.index.sync()
        providers = [self.address(p) for p in self.index.providers] if provider_ss58 is None else [provider_ss58]
        found = []
        for provider in providers:
            entry = self.index.providers.get(account_id(provider))
            if entry is None or not entry.slash_proposals:
                continue
            for call_hash in self.provider_status(provider).open_slashes:
                evidence, proposer = entry.slash_proposers.get(call_hash, (None, b""))
                found.append(
                    OpenSlashProposal(
                        provider, call_hash, evidence, self.address(proposer), entry.slash_proposals[call_hash]
                    )
                )
        return sorted(found, key=lambda p: (p.block_number, p.call_hash))

    def withdraw_slash(self, member: Keypair, call_hash: bytes) -> bool:
        """Cancels a slash proposal `member` itself opened (only the opener, the Multisig depositor, can): its
        deposit returns and it no longer holds the provider's unbond. False if it is not open or not this member's."""
        pending = self._pending_council_operation(call_hash)
        if pending is None or account_id(pending["depositor"]) != member.public_key:
            return False
        self._cancel_pending(member, self._other_signatories(member), dict(pending["when"]), "0x" + call_hash.hex())
        return self._pending_council_operation(call_hash) is None

    def file_dispute(
        self, provider: Keypair, evidence_hash: bytes, provider_passed: bool, worst_error_ppm: int, reason: str = ""
    ) -> ChainResult:
        """The provider's signed dispute of the evidence `evidence_hash` against it, with its own re-run's outcome
        (a `dispute` record sent from its own account). Open for `dispute_window_blocks`, or until a slash citing
        the evidence is on chain: meanwhile its unbond is refused and council members re-run the evidence once more
        before signing its slash. The record binds only the sender: nobody disputes on another provider's behalf."""
        if not isinstance(evidence_hash, (bytes, bytearray)) or len(evidence_hash) != 32:
            raise InvalidPaymentError("evidence_hash must be 32 bytes")
        if not isinstance(worst_error_ppm, int) or worst_error_ppm < 0:
            raise InvalidPaymentError(f"worst_error_ppm must be a non-negative integer, got {worst_error_ppm!r}")
        if len(reason) > MAX_DISPUTE_REASON:
            raise InvalidPaymentError(f"a dispute's reason holds at most {MAX_DISPUTE_REASON} characters")
        status = self.provider_status(provider.ss58_address)
        if status.state not in (ProviderState.REGISTERED, ProviderState.UNBONDING):
            raise NotRegisteredError(f"{provider.ss58_address} cannot dispute: {status.state.value}")
        body = {
            "evidence": bytes(evidence_hash).hex(),
            "passed": bool(provider_passed),
            "worst_error_ppm": worst_error_ppm,
            "reason": reason,
        }
        call = self._remark("dispute", body)
        self._require_funds(provider, call, 0)
        return self.submitter.submit(provider, call)

    def slash(
        self,
        council: list[Keypair],
        provider_ss58: str,
        amount: int | None,
        evidence_hash: bytes,
        beneficiary_ss58: str | None = None,
    ) -> ChainResult:
        """Move `amount` (None: all) of the provider's stake to the burn sink (or a beneficiary),
        approved by a threshold of council members; the evidence hash is recorded on chain. Possible while the
        provider is unbonding. A slash a member already opened (`propose_slash`) is continued from its approval."""
        self._check_members(council)
        call = self._slash_call(provider_ss58, amount, evidence_hash, beneficiary_ss58)
        return self._council_execute(council, call)

    def approve_slash(
        self,
        member: Keypair,
        provider_ss58: str,
        evidence_hash: bytes,
        amount: int | None = None,
        beneficiary_ss58: str | None = None,
    ) -> ChainResult | None:
        """One council member's signature on the slash citing `evidence_hash`, as a process holding ONE key
        gives it: the first member opens the Multisig operation (`propose_slash`), a later one approves it,
        and the one whose signature reaches the threshold executes it. Returns the execution's result, or
        None when this signature only opened or approved the slash (or this member had signed it already)."""
        if not self.config.council.is_member(member.public_key):
            raise QuorumError(f"{member.ss58_address} is not a council member")
        call = self._slash_call(provider_ss58, amount, evidence_hash, beneficiary_ss58)
        raw_hash = blake2_256(call.data.data)
        pending = self._pending_council_operation(raw_hash)
        if pending is None:
            self.propose_slash(member, provider_ss58, amount, evidence_hash, beneficiary_ss58)
            return None
        approved = {account_id(a) for a in pending["approvals"]}
        if member.public_key in approved:
            return None
        if len(approved) + 1 < self.config.council.threshold:
            self._multisig_approve(member, "0x" + raw_hash.hex(), dict(pending["when"]))
            return None
        return self._council_execute([member], call)

    # ---- council multisig ----------------------------------------------------------------------------
    def _check_members(self, council: list[Keypair]) -> dict[bytes, Keypair]:
        """The distinct signers, each a council member (else QuorumError)."""
        seen: dict[bytes, Keypair] = {}
        for kp in council:
            if not self.config.council.is_member(kp.public_key):
                raise QuorumError(f"{kp.ss58_address} is not a council member")
            seen[kp.public_key] = kp
        return seen

    def _council_execute(self, council: list[Keypair], call: GenericCall) -> ChainResult:
        """Dispatch `call` from the council account via Multisig: approvals, then execution. An operation
        already open on chain for the same call (a member's proposal) is continued: its approvers do not sign again."""
        signers = self._check_members(council)
        raw_hash = blake2_256(call.data.data)
        call_hash = "0x" + raw_hash.hex()
        pending = self._pending_council_operation(raw_hash)
        approved = {account_id(a) for a in pending["approvals"]} if pending else set()
        threshold = self.config.council.threshold
        fresh = [kp for key, kp in signers.items() if key not in approved][: threshold - len(approved)]
        if len(approved) + len(fresh) < threshold:
            raise QuorumError(
                f"{len(approved)} approval(s) on chain and {len(fresh)} other distinct council member(s) signing; "
                f"{threshold} of {len(self.config.council.members)} needed"
            )
        approvers, executor = fresh[:-1], fresh[-1]
        weight = int(self.substrate.get_payment_info(call, executor)["weight"])
        # The first approval's timepoint, which every later signature names.
        timepoint: dict[str, Any] | None = dict(pending["when"]) if pending else None
        opened_here: Keypair | None = None
        try:
            for kp in approvers:
                approval = self._multisig_approve(kp, call_hash, timepoint)
                if timepoint is None:
                    timepoint = {"height": approval.block_number, "index": approval.extrinsic_index}
                    opened_here = kp
            result = self._multisig_execute(executor, call, weight, timepoint)
        except Exception:  # whatever failed, withdraw an approval opened here so it cannot linger; then re-raise
            if timepoint is not None and opened_here is not None:
                self._cancel_pending(opened_here, self._other_signatories(opened_here), timepoint, call_hash)
            raise
        self._raise_if_dispatch_failed(result)
        return result

    def _pending_council_operation(self, call_hash: bytes) -> dict[str, Any] | None:
        """The council's open Multisig operation for `call_hash` ({when, deposit, depositor, approvals}), if any."""
        entry = self.substrate.query(
            "Multisig", "Multisigs", ["0x" + self.council_account.hex(), "0x" + call_hash.hex()]
        )
        value: dict[str, Any] | None = entry.value if entry is not None else None
        return value or None

    def _other_signatories(self, kp: Keypair) -> list[str]:
        """The council members other than `kp`, sorted, as Multisig wants them."""
        return ["0x" + m.hex() for m in sorted(self.config.council.member_ids()) if m != kp.public_key]

    def _multisig_approve(self, kp: Keypair, call_hash: str, timepoint: dict[str, Any] | None) -> ChainResult:
        return self.submitter.submit(
            kp,
            self._call(
                "Multisig",
                "approve_as_multi",
                {
                    "threshold": self.config.council.threshold,
                    "other_signatories": self._other_signatories(kp),
                    "maybe_timepoint": timepoint,
                    "call_hash": call_hash,
                    "max_weight": 0,
                },
            ),
        )

    def _multisig_execute(
        self, kp: Keypair, call: GenericCall, weight: int, timepoint: dict[str, Any] | None
    ) -> ChainResult:
        """The last signature: the call itself, dispatched once it reaches the threshold."""
        return self.submitter.submit(
            kp,
            self._call(
                "Multisig",
                "as_multi",
                {
                    "threshold": self.config.council.threshold,
                    "other_signatories": self._other_signatories(kp),
                    "maybe_timepoint": timepoint,
                    "call": call,
                    "store_call": False,
                    "max_weight": weight,
                },
            ),
        )

    def _raise_if_dispatch_failed(self, result: ChainResult) -> None:
        """The executed call's own error (the Multisig extrinsic succeeds even when the call it dispatches fails)."""
        executed = result.find("Multisig", "MultisigExecuted")
        outcome = executed[0].attributes.get("result") if executed else None
        if isinstance(outcome, dict) and "Err" in outcome:
            raise self._inner_failure(outcome["Err"], result)

    def _cancel_pending(self, kp: Keypair, others: list[str], timepoint: dict[str, Any], call_hash: str) -> None:
        try:
            self.submitter.submit(
                kp,
                self._call(
                    "Multisig",
                    "cancel_as_multi",
                    {
                        "threshold": self.config.council.threshold,
                        "other_signatories": others,
                        "timepoint": timepoint,
                        "call_hash": call_hash,
                    },
                ),
            )
        except Exception as exc:  # best effort; the original error matters more
            logger.warning("could not cancel the pending council approval %s: %s", call_hash, exc)

    def _inner_failure(self, err: object, result: ChainResult) -> Exception:
        """Decode the module error of a council call that ran but failed (its effects rolled back)."""
        if isinstance(err, dict) and isinstance(err.get("Module"), dict):
            module = err["Module"]
            index = int(module["index"])
            code = module["error"]
            code = int(code[2:4], 16) if isinstance(code, str) else int(code)
            pallet = next((p for p in self.substrate.metadata.pallets if p.value.get("index") == index), None)
            if pallet is not None:
                errors = pallet.errors or []
                for e in errors:
                    if e.value.get("index") == code:
                        name, docs = e.name, " ".join(e.docs or [])
                        if name in ("InsufficientBalance", "KeepAlive", "ExistentialDeposit"):
                            return InsufficientStakeError(f"escrow cannot pay: {pallet.name}.{name}: {docs}")
                        return DispatchError(pallet.name, name, docs, result.block_hash)
        return DispatchError("Runtime", str(err), "council call failed", result.block_hash)

    # ---- queries -------------------------------------------------------------------------------------
    def balance(self, ss58: str) -> int:
        """Free balance (planck) of an account."""
        return int(self._account_info(account_id(ss58))["data"]["free"])

    def provider_status(self, provider_ss58: str) -> ProviderStatus:
        """Registration state and stake (the escrow's free balance, read from chain now)."""
        provider = account_id(provider_ss58)
        head = self.index.sync()
        escrow = escrow_account(self.council_account, provider)
        stake = int(self._account_info(escrow)["data"]["free"])
        entry = self.index.providers.get(provider)
        if entry is None:
            return ProviderStatus(provider_ss58, ProviderState.NOT_REGISTERED, self.address(escrow), stake)
        if entry.unbonded_at is not None:
            state = ProviderState.UNBONDED
        elif entry.unbond_requested_at is not None:
            state = ProviderState.UNBONDING
        else:
            state = ProviderState.REGISTERED
        ready = (
            entry.unbond_requested_at + self.config.unbond_delay_blocks
            if entry.unbond_requested_at is not None
            else None
        )
        # A proposal stays pending while its Multisig operation exists: executed or cancelled, it is gone.
        open_slashes = tuple(h for h in entry.slash_proposals if self._pending_council_operation(h) is not None)
        entry.slash_proposals = {h: b for h, b in entry.slash_proposals.items() if h in open_slashes}
        holds = [entry.slash_proposals[h] + self.config.slash_hold_blocks for h in open_slashes]
        cited = {s.evidence_hash for s in entry.slashes}
        window = self.config.dispute_window_blocks
        open_disputes = tuple(
            DisputeRecord(provider_ss58, d.evidence_hash, d.provider_passed, d.worst_error_ppm, d.reason, d.block, end)
            for d in entry.disputes.values()
            if (end := d.block + window) > head and d.evidence_hash not in cited
        )
        return ProviderStatus(
            provider_ss58,
            state,
            self.address(escrow),
            stake,
            entry.registered_at,
            entry.unbond_requested_at,
            ready,
            tuple(entry.slashes),
            open_slashes,
            max(holds) if holds else None,
            open_disputes,
            head,
        )

    def compute_ledger(self, provider_ss58: str) -> ComputeTotals:
        """A provider's compute: totals of what its clients' settlements recorded (one record per paid
        receipt), plus its own `record_compute` claims, apart and not totalled."""
        provider = account_id(provider_ss58)
        self.index.sync()
        records = tuple(self.index.compute.get(provider, ()))
        return ComputeTotals(
            provider_ss58,
            sum(r.tokens_x_params for r in records),
            sum(r.requests for r in records),
            records,
            tuple(self.index.claimed_compute.get(provider, ())),
        )

    def settlement_history(
        self, client_ss58: str | None = None, provider_ss58: str | None = None
    ) -> list[SettledReceipt]:
        """Settled receipts, oldest first, optionally filtered by paying client and/or paid provider."""
        client = self.address(account_id(client_ss58)) if client_ss58 else None
        provider = self.address(account_id(provider_ss58)) if provider_ss58 else None
        self.index.sync()
        return [
            s
            for s in self.index.settlement_log
            if (client is None or s.client == client) and (provider is None or any(p == provider for p, _ in s.payouts))
        ]
