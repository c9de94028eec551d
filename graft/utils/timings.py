"""Wall seconds per phase of one command (``graft fit --timings``): where a run's time goes, summed in order."""

from __future__ import annotations

import time

__all__ = ["IMPORTED_AT", "Timings"]

# When graft was first imported (graft/__init__ imports this module first): the start of `graft fit`'s process as
# near as Python can see it, so the first phase holds the imports and the argument parsing.
IMPORTED_AT = time.perf_counter()


class Timings:
    """``timings.lap("scan")`` adds the seconds since the previous lap (or the start) to the phase ``scan``."""

    def __init__(self, start: float | None = None, first: str = "start-up") -> None:
        self.start = time.perf_counter() if start is None else start
        self._mark = self.start
        self.phases: dict[str, float] = {}
        if first and start is not None:
            self.lap(first)

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._mark
        self._mark = now

    def to_dict(self) -> dict[str, float]:
        """Each phase's seconds in the order first seen, then ``total`` (start to the last lap)."""
        return {**{name: round(seconds, 3) for name, seconds in self.phases.items()},
                "total": round(self._mark - self.start, 3)}

    def line(self) -> str:
        """One plain line: ``timings: start-up 2.1 s, scan 0.4 s, ... total 9.4 s``."""
        return "timings: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.to_dict().items())
