"""A canary rollback drops the rejected round's own progress, not the progress it never drew on.

One replica (a solo round, same code path for the group's contribution) on a real DHT and averager, with a canary
whose loss falls along a "good" direction and rises along a "bad" one. Training is simulated by adding to the
working adapters, as an optimizer step does.
"""

from __future__ import annotations

import pytest
import torch

from dllm import default_model_path
from peer.adapters import AdapterSet, LoraConfig, flatten, unflatten
from peer.averaging import AdapterAverager, AveragingConfig
from peer.blocks import load_span_layers
from peer.canary import CanaryConfig, CanaryGate
from peer.replica_auth import ReplicaIdentity
from swarm.dht import start_dht
from swarm.model_files import load_config

pytestmark = pytest.mark.timeout(120)


class _Canary:
    """Loss of a version: 2 - (progress along `good`) + 10 * (progress along `bad`, if positive); runs `during`
    (a simulated training pass arriving mid-round) once, at the next evaluation."""

    def __init__(self, adapters: AdapterSet, initial: torch.Tensor, good: torch.Tensor, bad: torch.Tensor):
        self.adapters, self.initial, self.good, self.bad = adapters, initial, good, bad
        self.during: torch.Tensor | None = None

    async def __call__(self, version: int) -> float:
        if self.during is not None:
            _train(self.adapters, self.during)
            self.during = None
        moved = flatten(self.adapters.held(version), self.adapters.names) - self.initial
        return 2.0 - 0.05 * float(moved @ self.good) + 10.0 * max(0.0, float(moved @ self.bad))


def _train(adapters: AdapterSet, step: torch.Tensor) -> None:
    with adapters.lock, torch.no_grad():
        for name, delta in unflatten(step, adapters.working, adapters.names).items():
            adapters.working[name].add_(delta)


@pytest.fixture
def solo(tmp_path):
    config = load_config(default_model_path())
    adapters = AdapterSet(load_span_layers(default_model_path(), config, 0, 2), 0, LoraConfig(rank=2))
    identity_file = tmp_path / "replica.identity"
    dht, validator = start_dht(identity_path=identity_file)
    initial = flatten(adapters.state().tensors, adapters.names)
    good, bad = torch.zeros_like(initial), torch.zeros_like(initial)
    good[:100], bad[-100:] = 0.1, 0.1  # unit vectors, disjoint
    canary = _Canary(adapters, initial, good, bad)
    averager = AdapterAverager(
        dht,
        adapters,
        model="tiny",
        start=0,
        end=2,
        identity=ReplicaIdentity.from_file(identity_file, validator.local_public_key),
        config=AveragingConfig(clip_tau=1.0),
        canary=CanaryGate(canary, CanaryConfig(max_relative_rise=0.01)),
    )
    try:
        yield adapters, averager, canary
    finally:
        averager.close()
        dht.shutdown()


def _along(adapters: AdapterSet, canary: _Canary, version: int | None = None) -> tuple[float, float]:
    """(progress along good, along bad) of a held version (None: the working adapters) from the initial ones."""
    tensors = adapters.working_state() if version is None else adapters.held(version)
    moved = flatten(tensors, adapters.names) - canary.initial
    return round(float(moved @ canary.good), 4), round(float(moved @ canary.bad), 4)


async def test_a_rejected_round_keeps_the_progress_it_did_not_draw_on(solo):
    adapters, averager, canary = solo
    _train(adapters, 2.0 * canary.good)  # good progress: twice what one round may apply (clip_tau 1)
    first = await averager.run_round()
    assert first.averaged and _along(adapters, canary, adapters.live_version) == (1.0, 0.0)

    _train(adapters, 0.5 * canary.bad)  # then one bad batch, after the good progress still pending
    second = await averager.run_round()  # draws the pending good progress first: it goes live
    assert second.averaged, second.reason
    assert _along(adapters, canary, adapters.live_version) == (2.0, 0.0)

    canary.during = 0.3 * canary.good  # a good pass trained while the next round's canary runs
    third = await averager.run_round()  # draws the bad batch: rejected, and only that batch is dropped
    assert not third.averaged and "canary rejected" in third.reason
    assert adapters.live_version == 2 and _along(adapters, canary, 2) == (2.0, 0.0)
    assert _along(adapters, canary) == (2.3, 0.0)  # the pass trained meanwhile is kept

    fourth = await averager.run_round()
    assert fourth.averaged, fourth.reason
    assert _along(adapters, canary, adapters.live_version) == (2.3, 0.0)  # every good update live, no bad one
    assert averager.canary is not None and len(averager.canary.rollbacks) == 1
