"""Progress of a long stage: a tqdm bar on a terminal, plain periodic lines anywhere else.

A bar redraws itself with carriage returns, which turns a CI log or a redirected file into one
unreadable line per redraw; there the caller's own periodic line (every log_every steps) is printed
instead. The test is on stderr, where both the bar and the logs go.
"""
from __future__ import annotations

import sys
from typing import Callable, TextIO

from tqdm import tqdm


class Progress:
    """advance() once per unit of work (no host sync); report(line, **postfix) at the caller's cadence:
    on a terminal the postfix goes to the bar, elsewhere `line` is printed through `emit`."""

    def __init__(self, total: int, desc: str, *, initial: int = 0, enabled: bool = True, unit: str = "step",
                 emit: Callable[[str], None] | None = None, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.emit = emit if emit is not None else (lambda line: print(line, file=self.stream, flush=True))
        isatty = getattr(self.stream, "isatty", None)
        self.bar = None
        if enabled and isatty is not None and isatty():
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, leave=False,
                            dynamic_ncols=True)

    @property
    def is_bar(self) -> bool:
        return self.bar is not None

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def report(self, line: str, **postfix) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=True)
        else:
            self.emit(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
