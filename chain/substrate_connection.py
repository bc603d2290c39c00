"""A substrate-interface client that survives the chain's node restarting.

substrate-interface reconnects only when *sending* on a socket it already knows is closed. After
the node restarts, the first request usually goes out on the dead socket without error and fails
while waiting for the reply ("Connection to remote host was lost"), and a node that is still down
fails with "Connection refused". Both leave callers with untyped transport errors.

`ResilientSubstrate` turns every transport failure into `ChainConnectionError` and, for plain
requests (reads, queries), reconnects and sends the request once more. Submissions and
subscriptions are never re-sent: whether a submitted extrinsic was included is unknown after a drop,
and callers find out from the chain (the settler reconciles against the receipt markers).

It also signs against the genesis hash the runtime checks (`System.BlockHash(0)`, what the
CheckGenesis signed extension compares with) rather than the node's `chain_getBlockHash(0)`: the
two are equal on a real node, but chopsticks resuming from its database reports another block-0
hash, and every extrinsic signed over it was refused as `badProof` after a dev chain restart.

Replies are not UTF-8-checked frame by frame: websocket-client does that in pure Python (about a second
of CPU per 2 MB, most of a provider's CPU when it settles 500 receipts), and then decodes the same bytes
as UTF-8 in C, which raises UnicodeDecodeError on invalid text all the same.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from substrateinterface import SubstrateInterface
from websocket import WebSocketException

from chain.errors import ChainConnectionError

logger = logging.getLogger(__name__)

# What a dropped or refused websocket raises (ConnectionError covers refused, reset and broken pipe).
_TRANSPORT_ERRORS = (WebSocketException, ConnectionError)


class ResilientSubstrate(SubstrateInterface):  # type: ignore[misc]  # substrate-interface is untyped
    """SubstrateInterface that reconnects after the endpoint went away and signs for the runtime's genesis."""

    _runtime_genesis: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ws_options"] = {"skip_utf8_validation": True, **(kwargs.get("ws_options") or {})}
        super().__init__(*args, **kwargs)

    def get_block_hash(self, block_id: int | None = None) -> str:
        if block_id != 0:
            block_hash: str = super().get_block_hash(block_id)
            return block_hash
        if self._runtime_genesis is None:
            stored = self.query("System", "BlockHash", [0]).value
            # An empty entry (all zeros) would mean a runtime that does not keep it: use the node's answer.
            self._runtime_genesis = stored if stored and int(stored, 16) else super().get_block_hash(0)
        return self._runtime_genesis

    def rpc_request(
        self, method: str, params: list[Any], result_handler: Callable[..., Any] | None = None
    ) -> Any:  # the JSON-RPC reply, or what result_handler returned for a subscription
        try:
            return super().rpc_request(method, params, result_handler=result_handler)
        except _TRANSPORT_ERRORS as first:
            if result_handler is not None or method.startswith("author_"):
                self._reconnect_quietly()
                raise ChainConnectionError(
                    f"lost the chain at {self.url} during {method}; its outcome is unknown: "
                    f"check on chain before retrying ({type(first).__name__}: {first})"
                ) from first
            try:
                self._reconnect()
                logger.info("reconnected to %s; retrying %s", self.url, method)
                return super().rpc_request(method, params, result_handler=result_handler)
            except _TRANSPORT_ERRORS as e:
                raise ChainConnectionError(
                    f"cannot reach the chain at {self.url} ({type(e).__name__}: {e}); retry when it is back"
                ) from e

    def _reconnect(self) -> None:
        old = getattr(self.transport, "websocket", None)
        if old is not None:
            # Free the dead socket's descriptor; any error closing it is moot, it is dead already.
            with contextlib.suppress(Exception):
                old.close(timeout=0)
        self.connect_websocket()

    def _reconnect_quietly(self) -> None:
        try:
            self._reconnect()
        except _TRANSPORT_ERRORS as e:  # still down: the next request tries again
            logger.debug("reconnect to %s failed: %s", self.url, e)
