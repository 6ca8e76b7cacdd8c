"""Progress over denoising steps, on a terminal only."""
from __future__ import annotations

import sys
from typing import Callable


def step_progress(enabled: bool, total: int, label: str) -> Callable[[int, int], None]:
    """A `progress(step, total)` callback drawing a tqdm bar on stderr (a no-op when not enabled)."""
    if not enabled:
        return lambda step, total: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, unit="step", leave=False, file=sys.stderr)

    def update(step: int, steps: int) -> None:
        bar.total = steps
        bar.update(1)
        if step == steps:
            bar.close()

    return update
