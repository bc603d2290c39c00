"""One replica of a span for the averaging tests and benchmark, in its own process (and process group).

Protocol on stdin/stdout (one JSON object per line):
  -> {"event": "ready", "peer_id": ..., "maddrs": [...]}
  <- {"t0": <dht time>, "period": <s>, "rounds": [<round index>, ...]}
  for each listed round k, at t0 + k * period (its update saved to --out/<name>_r<k>_update.pt first):
  -> {"event": "round", "round": k, "status": ..., "reason": ..., "group": [...], "version": v}
     and the live adapter state saved to --out/<name>_r<k>_live.pt
  -> {"event": "done"}, then it keeps serving until stdin closes or gets a line
With --die-in-round k the process SIGKILLs its whole process group (DHT, averager, p2pd) as soon as its
averager enters the all-reduce stage of round k. With --diverge-in-round k it does not meet the others in
round k but promotes its own update alone, as a replica cut off from its group would.

Attacks and defences (tests/peer/test_learning_attacks.py): --canary gates rounds and catch-up with an
in-process canary over the whole model (the span must be all of it), and each round event then carries
`canary_loss`, the live version's canary loss after the round. --poison-state SCALE --poison-version V
makes this replica a poisoner: before serving it adopts its live adapters plus noise of norm SCALE as
version V, unchecked, so joiners and lagging replicas are offered them. --forge-votes makes it store, in
every round it commits, a forged "yes" vote for each other member (unsigned, and signed with its own key).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from hivemind import DHT
from hivemind.averaging.control import AveragingStage
from hivemind.utils import get_dht_time

from dllm import default_model_path
from peer.adapters import ATTENTION_TARGETS, MLP_TARGETS, AdapterSet, AdapterState, LoraConfig, flatten, unflatten
from peer.averaging import AdapterAverager, AveragingConfig
from peer.blocks import load_span_layers
from peer.canary import CanaryConfig, CanaryGate
from peer.canary_examples import build_canary_batch, read_canary_file
from peer.replica_auth import ReplicaIdentity
from peer.span import SpanRunner
from swarm.dht import start_dht
from swarm.local_head import LocalHead, causal_lm_loss
from swarm.model_files import load_config


def emit(**event) -> None:
    print(json.dumps(event), flush=True)


def die_when_allreducing(averager: AdapterAverager) -> None:
    while averager.stage != AveragingStage.RUNNING_ALLREDUCE:
        time.sleep(0.002)
    os.killpg(os.getpgid(0), signal.SIGKILL)


def in_process_canary(config, layers, adapters: AdapterSet, start: int, end: int) -> CanaryGate:
    """A canary over the whole model run here (the default canary set), as a peer's swarm canary computes it."""
    from transformers import AutoTokenizer

    assert (start, end) == (0, config.num_hidden_layers), "--canary needs the whole model as the span"
    head = LocalHead(default_model_path(), config)
    runner = SpanRunner(config, layers, start, end)
    batch = build_canary_batch(read_canary_file(), AutoTokenizer.from_pretrained(default_model_path()))

    async def loss(version: int) -> float:
        with torch.inference_mode(), adapters.use(version):
            hidden = runner.forward(head.embed_tokens(batch.input_ids))
            return float(causal_lm_loss(head.logits(hidden), batch.labels))

    return CanaryGate(loss, CanaryConfig(max_relative_rise=0.01))


def poison(adapters: AdapterSet, scale: float, version: int) -> None:
    """Adopts live + noise of norm `scale` as live `version`, unchecked: what a poisoning replica offers."""
    live = flatten(adapters.state().tensors, adapters.names)
    noise = torch.randn(live.shape, generator=torch.Generator().manual_seed(7))
    adapters.import_state(
        AdapterState(version, unflatten(live + noise * (scale / noise.norm()), adapters.working, adapters.names))
    )


def forge_votes(averager: AdapterAverager, dht: DHT) -> None:
    """Wraps the averager's commit: before voting, store a "yes" for every other member of the group."""
    commit = averager._commit

    async def forging(round_key: str, group: list[str], verdict: bool) -> bool:
        key = f"{averager.prefix}.commit.{round_key}"
        expires = get_dht_time() + 60
        for peer in group:
            if peer != averager.peer_id:
                forged = dict(averager.identity.sign(key, True, expires + 1), peer=peer)
                await asyncio.to_thread(dht.store, key, True, expires, subkey=peer.encode())
                await asyncio.to_thread(dht.store, key, forged, expires + 1, subkey=b"x" + peer.encode())
        return await commit(round_key, group, verdict)

    averager._commit = forging


async def main(args: argparse.Namespace) -> None:
    config = load_config(default_model_path())
    layers = load_span_layers(default_model_path(), config, args.start, args.end)
    adapters = AdapterSet(layers, args.start, LoraConfig(rank=args.rank, targets=ATTENTION_TARGETS + MLP_TARGETS))
    out = Path(args.out)
    identity_file = out / f"{args.name}.identity"
    dht, validator = start_dht(args.initial_peers, identity_path=identity_file)
    identity = ReplicaIdentity.from_file(identity_file, validator.local_public_key)
    canary = in_process_canary(config, layers, adapters, args.start, args.end) if args.canary else None
    # Generous matchmaking: several engineers' tests share 2 cores, and a replica that misses the group
    # makes the others (correctly) skip the round.
    averaging = AveragingConfig(
        clip_tau=args.clip_tau,
        replica_ttl_s=args.ttl,
        allreduce_timeout_s=10.0,
        next_chunk_timeout_s=1.0,
        commit_timeout_s=3.0,
        min_matchmaking_time_s=3.0,
        request_timeout_s=1.5,
        matchmaking_timeout_s=10.0,
    )
    averager = AdapterAverager(
        dht, adapters, model="tiny", start=args.start, end=args.end, identity=identity, config=averaging, canary=canary
    )
    if args.poison_state:
        poison(adapters, args.poison_state, args.poison_version)
        averager._live_changed()
    if args.forge_votes:
        forge_votes(averager, dht)
    try:
        if args.fetch_state:
            loaded = await averager.load_state_from_replicas()
            refused = {"refused": averager.refused_states} if averager.refused_states else {}
            emit(event="fetched", ok=loaded, version=adapters.live_version, **refused)
        emit(
            event="ready",
            peer_id=averager.peer_id,
            maddrs=[str(m) for m in dht.get_visible_maddrs()],
            parameters=adapters.num_parameters(),
        )
        declaring = asyncio.create_task(averager.keep_declared())
        plan = json.loads(await asyncio.to_thread(sys.stdin.readline))
        for k in plan["rounds"]:
            scheduled = plan["t0"] + k * plan["period"]
            await asyncio.sleep(max(0.0, scheduled - get_dht_time() - averaging.min_matchmaking_time_s))
            generator = torch.Generator().manual_seed(sum(map(ord, args.name)) * 1000 + k)
            with torch.no_grad():
                for p in adapters.parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * args.update_scale)
            torch.save(adapters.delta(), out / f"{args.name}_r{k}_update.pt")
            if k == args.die_in_round:
                threading.Thread(target=die_when_allreducing, args=(averager,), daemon=True).start()
            if k == args.diverge_in_round:
                await asyncio.sleep(max(0.0, scheduled - get_dht_time()))
                outcome = await averager._solo_round(adapters.live_version)
            else:
                outcome = await averager.run_round(scheduled_time=scheduled)
            torch.save(adapters.state().tensors, out / f"{args.name}_r{k}_live.pt")
            emit(
                event="round",
                round=k,
                status=outcome.status,
                reason=outcome.reason,
                group=outcome.group,
                version=outcome.version,
                seconds=outcome.seconds,
                **({"canary_loss": (await canary._losses([adapters.live_version]))[0].total} if canary else {}),
            )
        emit(event="done")
        await asyncio.to_thread(sys.stdin.readline)  # stay reachable (e.g. to share state) until told to go
        declaring.cancel()
    finally:
        averager.close()
        dht.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--end", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--update-scale", type=float, default=1e-3)
    parser.add_argument("--clip-tau", type=float, default=1e6)
    parser.add_argument("--ttl", type=float, default=4.0)
    parser.add_argument("--die-in-round", type=int, default=-1)
    parser.add_argument("--diverge-in-round", type=int, default=-1)
    parser.add_argument("--fetch-state", action="store_true")
    parser.add_argument("--canary", action="store_true")
    parser.add_argument("--poison-state", type=float, default=0.0)
    parser.add_argument("--poison-version", type=int, default=3)
    parser.add_argument("--forge-votes", action="store_true")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main(parser.parse_args()))
