"""A peer killed mid-generation: the client re-routes, replays the session, and output is unchanged."""

from __future__ import annotations

import signal

import pytest

from swarm.client import ClientConfig, DistributedModel
from swarm.sampling import GenerationParams

PROMPT = "The module"


@pytest.mark.parametrize("direct", [True, False], ids=["direct-streams", "p2p-streams"])
def test_sigkill_of_the_peer_in_use_does_not_change_greedy_output(local_swarm, direct):
    first = local_swarm.start_peer("0:4", wait=False)
    b = local_swarm.start_peer("4:8", wait=False, name="peer-b")
    c = local_swarm.start_peer("4:8", wait=False, name="peer-c")
    for p in (first, b, c):
        local_swarm.wait_ready(p)
    by_id = {p.info["peer_id"]: p for p in (first, b, c)}
    params = GenerationParams(max_new_tokens=64, ignore_eos=True)

    model = DistributedModel.from_pretrained(
        local_swarm.model, local_swarm.initial_peers, config=ClientConfig(direct_streams=direct)
    )
    try:
        expected = model.generate(PROMPT, params)
        victim, pieces = None, []
        stream = model.stream(PROMPT, params)
        for piece in stream:
            pieces.append(piece)
            if len(pieces) == 10:  # mid-generation: kill whichever 4:8 peer this session uses
                assert stream.session is not None
                in_use = next(h.hop.peer_id for h in stream.session.hops if h.hop.start == 4)
                victim = by_id[in_use]
                victim.signal(signal.SIGKILL)
        assert stream.result is not None and stream.result.session is stream.session
        session = stream.session

        assert {h.transport for h in session.hops} == {"direct" if direct else "p2p"}
        assert victim is not None and victim.popen.wait(5) == -signal.SIGKILL
        assert session.failovers >= 1
        assert "".join(pieces) == expected.text  # identical greedy output despite the failover
        survivor = next(p for p in (b, c) if p is not victim)
        assert [h.hop.peer_id for h in session.hops if h.hop.start == 4] == [survivor.info["peer_id"]]
        assert max(session.stall_seconds) < 5.0

        # The dead peer is banned: the next generation goes straight to the survivor.
        again = model.generate(PROMPT, params)
        assert again.token_ids == expected.token_ids and again.failovers == 0
    finally:
        model.close()
