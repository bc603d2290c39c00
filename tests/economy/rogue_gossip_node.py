"""A misbehaving gossip node for the gossip tests: publishes forged messages and floods.

It is the real GossipNode with its own outgoing checks switched off and two extra commands:
{"op": "publish_raw", "topic", "data"} publishes bytes as they are, and
{"op": "flood", "topic", "uri", "count", "rate"} publishes `count` validly signed envelopes from
the dev key `uri` at `rate` per second. Honest nodes must contain it.
"""

from __future__ import annotations

import base64
import sys

import trio
from substrateinterface import Keypair

from economy.envelope import seal
from economy.gossip_node import GossipNode
from economy.gossip_node import main as node_main


class RogueGossipNode(GossipNode):
    def validate(self, forwarder, msg) -> bool:
        if forwarder == self.host.get_id():
            return True  # let our own garbage out
        return super().validate(forwarder, msg)

    async def handle(self, command: dict) -> dict | None:
        op = command.get("op")
        if op == "publish_raw":
            await self.pubsub.publish(command["topic"], base64.b64decode(command["data"]))
            return {"ok": True}
        if op == "flood":
            key = Keypair.create_from_uri(command["uri"])
            for i in range(int(command["count"])):
                envelope = seal(key, command["topic"], f"flood {i}".encode())
                await self.pubsub.publish(command["topic"], envelope.encode())
                await trio.sleep(1.0 / float(command["rate"]))
            return {"ok": True}
        return await super().handle(command)


if __name__ == "__main__":
    node_main(sys.argv[1:], node_class=RogueGossipNode)
