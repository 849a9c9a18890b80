"""Progress of long calls: logged to the ``"repquant_jax"`` logger, printed if asked.

Like JAX libraries, `transform` is quiet by default: its messages go to `logging` at
INFO (shown by ``logging.basicConfig(level=logging.INFO)`` or absl's ``--v``), and
``verbose=True`` also prints them with the elapsed time and a bar for counted steps.
"""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["logger", "Progress"]

logger = logging.getLogger("repquant_jax")

_BAR_WIDTH = 20


class Progress:
    """Reports the steps of one call.

    Args:
      verbose: also print each message (with the elapsed time) to stdout.
    """

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.start = time.perf_counter()

    def __call__(self, message: str, done: int | None = None, total: int | None = None) -> None:
        """Reports ``message``; with ``done`` of ``total`` steps, a bar in front of it."""
        if done is not None and total:
            filled = round(_BAR_WIDTH * done / total)
            message = f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {done}/{total} {message}"
        logger.info(message)
        if self.verbose:
            print(f"[repquant {time.perf_counter() - self.start:7.1f}s] {message}", file=sys.stdout, flush=True)
