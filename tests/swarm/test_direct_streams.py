"""Direct TLS inference streams: same tokens as hivemind P2P, pinned certificates, fallback to P2P."""

from __future__ import annotations

import asyncio

import pytest

from peer.direct_server import DirectServer
from swarm.client import ClientConfig, DistributedModel, GenerationResult
from swarm.direct import DirectEndpoint, DirectStreamError, TlsIdentity, connect
from swarm.sampling import GenerationParams

pytestmark = pytest.mark.timeout(240)

GREEDY = GenerationParams(max_new_tokens=32, ignore_eos=True)


def _transports(result: GenerationResult) -> list[str]:
    assert result.session is not None
    return [h.transport for h in result.session.hops]


def test_direct_and_p2p_streams_give_the_same_tokens(swarm, distributed_model):
    direct = distributed_model.generate("The module", GREEDY)
    assert _transports(direct) == ["direct", "direct"]
    with DistributedModel.from_pretrained(
        str(swarm.model_path), swarm.initial_peers, config=ClientConfig(direct_streams=False)
    ) as p2p_only:
        over_p2p = p2p_only.generate("The module", GREEDY)
        assert _transports(over_p2p) == ["p2p", "p2p"]
    assert over_p2p.token_ids == direct.token_ids


def test_a_stale_or_forged_endpoint_is_re_read_from_the_peer(swarm, distributed_model):
    """A wrong certificate digest (a restarted peer, or someone else at that address) is never used: the client
    re-reads the endpoint over the authenticated P2P connection and connects with the real one."""
    expected = distributed_model.generate("Return the", GREEDY).token_ids
    core = distributed_model.core
    for peer_id, endpoint in list(core.direct_endpoints.items()):
        core.direct_endpoints[peer_id] = DirectEndpoint(endpoint.host, endpoint.port, bytes(32))
    again = distributed_model.generate("Return the", GREEDY)
    assert again.token_ids == expected
    assert _transports(again) == ["direct", "direct"]
    assert all(e.tls_sha256 != bytes(32) for e in core.direct_endpoints.values())


def test_unreachable_direct_endpoints_fall_back_to_p2p(swarm):
    with DistributedModel.from_pretrained(str(swarm.model_path), swarm.initial_peers) as model:
        expected = model.generate("The file", GREEDY).token_ids
        core = model.core
        # As behind a firewall: every endpoint the peers advertise points at a closed port.
        learn = core._learn_direct_endpoint

        def firewalled(peer_id, value):
            learn(peer_id, value)
            if peer_id in core.direct_endpoints:
                core.direct_endpoints[peer_id] = DirectEndpoint(
                    "127.0.0.1", 9, core.direct_endpoints[peer_id].tls_sha256
                )

        core._learn_direct_endpoint = firewalled
        for peer_id in list(core.direct_endpoints):
            firewalled(peer_id, core.direct_endpoints[peer_id].to_info())
        fallback = model.generate("The file", GREEDY)
        assert fallback.token_ids == expected
        assert _transports(fallback) == ["p2p", "p2p"]


def test_a_peer_started_without_direct_streams_is_served_over_p2p(local_swarm):
    head = local_swarm.start_peer("0:4", "--no-direct", wait=False)
    tail = local_swarm.start_peer("4:8", wait=False)
    for peer in (head, tail):
        local_swarm.wait_ready(peer)
    with DistributedModel.from_pretrained(local_swarm.model, local_swarm.initial_peers) as model:
        assert _transports(model.generate("The module", GREEDY)) == ["p2p", "direct"]
        assert head.info["peer_id"] not in model.core.direct_endpoints


def test_connect_refuses_a_server_with_another_certificate():
    async def run():
        server = DirectServer(lambda requests: requests, max_frame_bytes=1024)
        endpoint = await server.start("127.0.0.1", 0, "127.0.0.1")
        try:
            impostor = DirectEndpoint(endpoint.host, endpoint.port, TlsIdentity.generate().sha256)
            with pytest.raises(DirectStreamError, match="another TLS certificate"):
                await connect(impostor, 5.0)
            _, writer = await connect(endpoint, 5.0)  # the pinned certificate is accepted
            writer.close()
        finally:
            await server.close()

    asyncio.run(run())
