"""A route of spans assembled in one process, for testing adapters, training and canary gates.

It runs the same per-span steps the swarm does (span forward; backward with the working adapters
from the last span to the first) without the network, on the embedded default model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from peer.adapters import AdapterSet, LoraConfig
from peer.blocks import load_span_layers
from peer.span import SpanRunner
from peer.training import AdapterTrainer, TrainingConfig, span_backward
from swarm.local_head import causal_lm_loss
from swarm.model_files import load_config, read_tensors


@dataclass
class Example:
    prompt: str
    completion: str


@dataclass
class RouteSpan:
    runner: SpanRunner
    adapters: AdapterSet
    trainer: AdapterTrainer


class LocalRoute:
    def __init__(
        self,
        model_dir: Path,
        spans: list[tuple[int, int]],
        lora: LoraConfig | None = None,
        training: TrainingConfig | None = None,
    ):
        self.config = load_config(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        head = read_tensors(model_dir, ["model.embed_tokens.", "model.norm.", "lm_head."])
        self.embed = head["model.embed_tokens.weight"]
        self.norm_weight = head["model.norm.weight"]
        self.lm_head = head.get("lm_head.weight", self.embed)
        self.spans = []
        for start, end in spans:
            layers = load_span_layers(model_dir, self.config, start, end)
            adapters = AdapterSet(layers, start, lora)
            self.spans.append(
                RouteSpan(SpanRunner(self.config, layers, start, end), adapters, AdapterTrainer(adapters, training))
            )

    def encode(self, example: Example) -> tuple[torch.Tensor, torch.Tensor]:
        prompt = self.tokenizer(example.prompt)["input_ids"]
        full = self.tokenizer(example.prompt + example.completion)["input_ids"]
        labels = [-100] * len(prompt) + full[len(prompt) :]
        return torch.tensor([full]), torch.tensor([labels])

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        variance = hidden.pow(2).mean(-1, keepdim=True)
        normed = hidden * torch.rsqrt(variance + self.config.rms_norm_eps) * self.norm_weight
        return normed @ self.lm_head.T

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, versions: dict[int, int | None] | None = None) -> torch.Tensor:
        """Forward with adapter version versions[i] on span i (default: each span's live version)."""
        versions = versions or {}
        hidden = self.embed[input_ids]
        for i, span in enumerate(self.spans):
            with span.adapters.use(versions.get(i)):
                hidden = span.runner.forward(hidden)
        return self.head(hidden)

    def loss(self, examples: list[Example], versions: dict[int, int | None] | None = None) -> float:
        losses = [
            float(causal_lm_loss(self.logits(ids, versions), labels)) for ids, labels in map(self.encode, examples)
        ]
        return sum(losses) / len(losses)

    def train_pass(self, example: Example, contributor: str, grad_scale: float = 1.0) -> float:
        """One feedback pass: forward, loss, then backward span by span from the last (as the swarm does).

        `grad_scale` != 1 plays a malicious client that scales the gradient it sends back to the peers.
        """
        ids, labels = self.encode(example)
        inputs = []
        hidden = self.embed[ids]
        with torch.no_grad():
            for span in self.spans:
                inputs.append(hidden)
                with span.adapters.training():
                    hidden = span.runner.forward(hidden)
        hidden = hidden.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = causal_lm_loss(self.head(hidden), labels)
            (grad,) = torch.autograd.grad(loss, [hidden])
        grad = grad * grad_scale
        for span, span_input in zip(reversed(self.spans), reversed(inputs), strict=True):
            span.trainer.admit(contributor)
            grad, adapter_grads = span_backward(span.runner.forward, span.adapters, span_input, grad)
            span.trainer.accumulate(contributor, adapter_grads)
        return float(loss.detach())

    def step(self) -> None:
        for span in self.spans:
            span.trainer.step()

    def generate(self, prompt: str, max_new_tokens: int = 8) -> list[int]:
        ids = torch.tensor([self.tokenizer(prompt)["input_ids"]])
        for _ in range(max_new_tokens):
            next_id = self.logits(ids)[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        return ids[0].tolist()
