"""Helpers for the tests that run learning peers (`--adapter-rank`) in a real local swarm."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from hivemind.proto import runtime_pb2

from swarm import protocol
from swarm.client import DistributedModel, SwarmClient
from swarm.feedback_records import FeedbackExample
from swarm.local_head import causal_lm_loss

T = TypeVar("T")

FACTS = [("Q: what colour? the sky is A:", " blue"), ("Q: what colour? grass is A:", " green")]
# Held-out phrasings of the taught facts, the canary an operator teaching them would keep.
FACTS_CANARY = (
    "# canary for the colour facts\n"
    "Q: what colour is the sky? A:\t blue\nQ: what colour? the sky is A:\t blue\n"
    "Q: what colour is grass? A:\t green\nQ: what colour? grass is A:\t green\n"
)


def learning_args(period: float = 6.0, canary_file: Path | None = None, *extra: str) -> tuple[str, ...]:
    """`dllm peer join` options of a quickly learning peer (one optimizer step per pass)."""
    args = (
        "--adapter-rank",
        "4",
        "--averaging-period",
        str(period),
        "--train-step-batch",
        "1",
        "--learning-rate",
        "1e-2",
        *extra,
    )
    return args + (("--canary-file", str(canary_file)) if canary_file else ())


def start_canary_gated_pair(local_swarm, canary_dir: Path, period: float = 6.0):
    """Two learning peers (head 0:4, tail 4:8) whose canary is the FACTS set; returns (head, tail), ready."""
    canary = canary_dir / "canary.txt"
    canary.write_text(FACTS_CANARY)
    head = local_swarm.start_peer("0:4", *learning_args(period, canary), name="head", wait=False)
    tail = local_swarm.start_peer("4:8", *learning_args(period, canary), name="tail", wait=False)
    for peer in (head, tail):
        local_swarm.wait_ready(peer, timeout=120)
    return head, tail


def peer_info(model: DistributedModel, peer_id: str) -> dict:
    """The peer's rpc_info reply (adapter_version, adapter_fingerprint, last_canary, last_averaging, ...)."""
    response = model._loop.run(model.core.call(peer_id, protocol.HANDLER_INFO, runtime_pb2.ExpertRequest()))
    return protocol.unpack_metadata(response.metadata)


def wait_for_peers(
    model: DistributedModel, peer_ids: dict[str, str], ready: Callable[[dict], bool], timeout: float, what: str
) -> dict[str, dict]:
    """Polls the named peers' rpc_info until `ready(info)` holds for every one; returns name -> info."""

    def poll() -> dict[str, dict] | None:
        infos = {name: peer_info(model, pid) for name, pid in peer_ids.items()}
        poll.last = infos
        return infos if all(ready(info) for info in infos.values()) else None

    poll.last = None
    try:
        return wait_until(poll, timeout, what)
    except AssertionError as e:
        raise AssertionError(f"{e}; peers said {poll.last}") from None


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    """Polls `check` until it returns something truthy; fails with `what` and the last value."""
    deadline = time.monotonic() + timeout
    value = check()
    while not value:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {value!r}")
        time.sleep(interval)
        value = check()
    return value


def just_after_round(period: float, margin: float = 0.5) -> None:
    """Sleeps until `margin` s after the next multiple of `period` (rounds run then, in DHT time), so a
    burst of feedback passes lands inside one averaging period."""
    now = time.time()
    time.sleep((period - now % period) + margin if now % period > margin else margin - now % period)


def live_loss(model: DistributedModel, examples: list[tuple[str, str]]) -> float:
    """Mean loss of the completions under the live adapters (what generation uses)."""
    losses = []
    for prompt, completion in examples:
        ids, labels = model._feedback_tensors(prompt, completion)
        with torch.no_grad():
            losses.append(float(causal_lm_loss(model.forward(ids), labels)))
    return sum(losses) / len(losses)


async def poisoned_pass(
    core: SwarmClient, input_ids: torch.Tensor, labels: torch.Tensor, scale: float, example: FeedbackExample
) -> float:
    """A malicious client's feedback pass: the honest gradient multiplied by `scale` (e.g. -1000: scaled-up
    gradient ascent on the taught completion) before it is sent back through the route, with its signed
    `example` (peers train only on published text: the attack is public too)."""
    with core.signing_pass(example=example):
        return await _scaled_pass(core, input_ids, labels, scale)


async def _scaled_pass(core: SwarmClient, input_ids: torch.Tensor, labels: torch.Tensor, scale: float) -> float:
    train = {"train": True}
    out, hops, inputs = await core.forward_hidden(core.head.embed_tokens(input_ids), train)
    with torch.enable_grad():
        out = out.detach().requires_grad_(True)
        loss = causal_lm_loss(core.head.logits(out), labels)
        (grad,) = torch.autograd.grad(loss, [out])
    await core.backward_hidden(hops, inputs, grad * scale, train)
    return float(loss.detach())
