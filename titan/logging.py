"""One logger for the whole run; only rank 0 prints, so `srun`/`torchrun` output stays clean.

Other ranks log warnings and errors only (a failing rank must still say why).
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("titan")


def init_logger(rank: int) -> None:
    """Configure the `titan` logger once per process: INFO on rank 0, WARNING elsewhere."""
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    prefix = "" if rank == 0 else f"[rank{rank}] "
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", datefmt="%H:%M:%S")
    )
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
