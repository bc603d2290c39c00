"""Billing of training (feedback) passes: metered and paid like any other request.

A feedback pass is a forward and a backward RPC per hop, not an inference stream. Each hop of a pass
gets its own metered session id; the request metadata names the paying client (`client`,
`session_id`), so the peer meters the forward as a prompt step and the backward as a backward step
(priced at economy.pricing's BACKWARD_FACTOR times the prompt rate). The client meters the same
tensors as they crossed the wire, and at the end of the pass countersigns each hop's receipt and
pays them in one settlement, through the same `SessionBilling` as inference sessions.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import torch

from economy.metering import StepKind
from swarm import protocol
from swarm.billing import SessionBilling
from swarm.routing import Hop


@dataclass(frozen=True)
class PassHop:
    """One hop's metered session within a training pass (what SessionBilling calls a stream)."""

    session_id: str
    hop: Hop


class TrainingPassBilling:
    """The metered sessions of one training pass, one per (peer, blocks) it used."""

    def __init__(self, session: SessionBilling):
        self.session = session
        self._hops: dict[tuple[str, int, int], PassHop] = {}

    def _pass_hop(self, hop: Hop) -> PassHop:
        key = (hop.peer_id, hop.start, hop.end)
        if key not in self._hops:
            self._hops[key] = PassHop(f"train-{uuid.uuid4().hex}", hop)
        return self._hops[key]

    def request_metadata(self, hop: Hop) -> dict[str, Any]:
        """Fields that make the peer meter this request under the hop's session for this client."""
        return {"session_id": self._pass_hop(hop).session_id, **self.session.open_extra}

    def observe(self, hop: Hop, handler: str, tensors: list[torch.Tensor], output: torch.Tensor) -> None:
        """Meters a completed forward ([hidden] -> out) or backward ([hidden, grad_out] -> grad_in)."""
        if handler == protocol.HANDLER_BACKWARD:
            self.session.observe(self._pass_hop(hop), tensors[1], output, 0, kind=StepKind.BACKWARD)
        else:
            self.session.observe(self._pass_hop(hop), tensors[0], output, 0, kind=StepKind.PROMPT)

    async def finish(self) -> None:
        """Countersigns every hop's receipt and pays them in one settlement."""
        await self.session.finish(list(self._hops.values()))
