"""`dllm verify --probe` (the one-shot check) against a local swarm with one honest and one cheating provider.

The serving verifier (`dllm verify` without --probe) is exercised by tests/economy/test_end_to_end.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.timeout(240)


def cheating_model(source, target):
    """A copy of the model whose blocks 4..7 are slightly wrong (what a provider cutting corners serves),
    still announced under the same model name."""
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name, tensor in tensors.items():
        if any(f"layers.{i}." in name for i in range(4, 8)) and tensor.dim() == 2:
            tensors[name] = tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_verify_passes_honest_and_fails_cheating_providers(local_swarm, tiny_model_path, tmp_path):
    honest = local_swarm.start_peer("0:4")
    cheater = local_swarm.start_peer("4:8", "--model", str(cheating_model(tiny_model_path, tmp_path / "bad-model")))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dllm.cli",
            "verify",
            "-p",
            local_swarm.initial_peers[0],
            "--model",
            str(tiny_model_path),
            "--probe",
            "--rounds",
            "2",
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    honest_rows = [line for line in lines if honest.info["peer_id"][-10:] in line]
    cheater_rows = [line for line in lines if cheater.info["peer_id"][-10:] in line]
    assert len(honest_rows) == 2 and all("pass" in line for line in honest_rows), result.stdout
    assert len(cheater_rows) == 2 and all("FAIL" in line for line in cheater_rows), result.stdout
    assert "2 of 4 checks failed" in result.stderr and cheater.info["peer_id"] in result.stderr
