"""Progress bars on a terminal (stderr), silence elsewhere."""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int, desc: str, unit: str = "B"):
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False,
                disable=not sys.stderr.isatty(), file=sys.stderr)
