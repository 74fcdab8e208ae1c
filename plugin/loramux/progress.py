"""Progress bars (tqdm) that stay quiet when stderr is not a terminal unless asked."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from tqdm import tqdm


class _Bar(tqdm):
    def update_to(self, done: int, total: int) -> None:
        """Callback form used by library functions: (items done, items in all)."""
        self.total = total
        self.update(done - self.n)


@contextlib.contextmanager
def progress_bar(*, desc: str, unit: str = "it", total: int | None = None) -> Iterator[_Bar]:
    """A tqdm bar on stderr; disabled when stderr is not a TTY and LORAMUX_PROGRESS is unset."""
    disable = not (sys.stderr.isatty() or os.environ.get("LORAMUX_PROGRESS"))
    with _Bar(desc=desc, unit=unit, total=total, disable=disable, file=sys.stderr, leave=False) as bar:
        yield bar
