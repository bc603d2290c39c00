"""Test-only launcher: a real `dllm` peer whose forward and inference steps each take `delay` seconds longer.

Usage: python -m tests.chaos.slow_peer DELAY_SECONDS <dllm arguments...>
The delay is an asyncio sleep before the real handler runs, as a congested link or a busy machine
would add; `dllm.v1.info` is not delayed, so the peer looks alive to liveness probes.
"""

from __future__ import annotations

import asyncio
import sys


def main() -> None:
    delay = float(sys.argv[1])
    from peer.handler import BlockHandler

    original_step, original_forward = BlockHandler._inference_step, BlockHandler.rpc_forward

    async def slow_step(self, *args, **kwargs):
        await asyncio.sleep(delay)
        return await original_step(self, *args, **kwargs)

    async def slow_forward(self, *args, **kwargs):
        await asyncio.sleep(delay)
        return await original_forward(self, *args, **kwargs)

    BlockHandler._inference_step, BlockHandler.rpc_forward = slow_step, slow_forward
    from dllm.cli import main as dllm_main

    dllm_main(sys.argv[2:])


if __name__ == "__main__":
    main()
