"""Start-up of a serving process without the cyclic garbage collector (`CollectionPause`).

Importing torch, hivemind and transformers allocates ~400k objects that live as long as the process. The
collector, run every 700 allocations, examines them again and again while they are imported: about 0.7 s
of CPU in a peer's start of ~4 s (2 cores). A pause turns collection off for the start-up and back on
once the process serves, moving every object start-up made to the permanent generation (`gc.freeze`),
so later collections skip them too.

Invariants: collection is on again once the service is ready (`resume()`) or start-up fails (the context
exits); a process forked during the pause (hivemind's DHT, the averager) turns it back on in the child
at once; a pause entered while collection is already off (someone else's choice) changes nothing.
Price: cycles that became garbage during start-up are never freed (~13k objects, ~9 MiB for a peer).
"""

from __future__ import annotations

import gc
import os
from types import TracebackType

_child_hook_registered = False


class CollectionPause:
    """`with CollectionPause() as pause:` ... `pause.resume()` once serving."""

    def __init__(self) -> None:
        self._paused = False

    def __enter__(self) -> CollectionPause:
        global _child_hook_registered
        if gc.isenabled():
            if not _child_hook_registered:  # hooks cannot be removed: one for the whole process
                os.register_at_fork(after_in_child=gc.enable)
                _child_hook_registered = True
            gc.disable()
            self._paused = True
        return self

    def resume(self) -> None:
        """Collection on again, start-up's objects out of its way; idempotent."""
        if self._paused:
            self._paused = False
            gc.freeze()
            gc.enable()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.resume()
