"""Sessions beyond a peer's attention-cache budget are refused with PeerBusyError; the peer keeps serving."""

from __future__ import annotations

import asyncio

import pytest
import torch

from swarm.protocol import PeerBusyError
from swarm.session import SessionFailedError
from tests.chaos.harness import ChaosSwarm, ClientFleet

pytestmark = pytest.mark.timeout(180)

# dllm-tiny-llama: 2 (k, v) x 4 kv heads x 32 dims x 4 bytes = 1 KiB per token per block; 8 KiB for 0:8.
SESSION_TOKENS = 32  # 256 KiB per session: four fit in --cache-mb 1


async def test_sessions_over_the_cache_budget_are_refused_and_the_peer_survives(tiny_model_path, tmp_path):
    swarm = ChaosSwarm(str(tiny_model_path), workdir=tmp_path)
    fleet = ClientFleet(tiny_model_path, [], 1)
    try:
        swarm.start_bootstrap()
        peer = swarm.start_peer_with("0:8", "--cache-mb", "1", name="small-cache")
        fleet.initial_peers = swarm.initial_peers
        await fleet.start()
        client = fleet.clients[0]
        prompt = client.head.embed_tokens(torch.tensor([[5, 6, 7]]))
        sessions = [client.inference_session(max_length=SESSION_TOKENS) for _ in range(4)]
        for s in sessions:
            assert (await s.step(prompt)).shape == prompt.shape
        fifth = client.inference_session(max_length=SESSION_TOKENS)
        with pytest.raises(SessionFailedError) as refused:
            await fifth.step(prompt)
        busy = refused.value.__cause__
        assert isinstance(busy, PeerBusyError), repr(busy)
        assert "MiB of attention cache" in str(busy) and "0.0 MiB of 1.0 MiB are free" in str(busy)
        await fifth.close()

        # the peer is alive and, once a session ends, takes a new one
        assert peer.alive
        await sessions.pop().close()
        client.bans = type(client.bans)(client.bans.duration)  # the refusal banned it: a fresh client's view
        again = client.inference_session(max_length=SESSION_TOKENS)
        for _ in range(20):  # the closed stream frees its cache when the peer sees the end of it
            try:
                await again.step(prompt)
                break
            except SessionFailedError:
                client.bans = type(client.bans)(client.bans.duration)
                again = client.inference_session(max_length=SESSION_TOKENS)
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the peer never accepted a session after one was closed")
        await again.close()
        for s in sessions:
            await s.close()
    finally:
        await fleet.close()
        swarm.stop()
