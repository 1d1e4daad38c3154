"""``--time-budget-min``: fit a run's length to the time it is given (:class:`TimeBudget`)."""
from __future__ import annotations

import logging
import time

from . import distributed as dist_utils
from .run import Run

log = logging.getLogger("xcit.train")


class TimeBudget:
    """``--time-budget-min``: the speed is measured over steps 3..15, then again every 12 steps (which follows a
    machine that speeds up or slows down), and the run's total steps are fitted to the time left."""

    FIRST, LAST = 3, 15

    def __init__(self, minutes: float | None, run: Run, step: int, max_steps: int) -> None:
        self.seconds = minutes * 60 if minutes else None
        self.run, self.max_steps = run, max_steps
        self.mark: tuple[int, float | None] = (step, None)
        self.per_step: float | None = None
        self._t0, self._s0 = time.time(), step

    def fit(self, step: int, total: int) -> int | None:
        """A new total step count when it is time to refit (``step`` itself when the budget is used up), else None."""
        if not self.seconds or step < self.FIRST or (self.mark[1] is not None and step - self.mark[0] < self.LAST -
                                                     self.FIRST):
            return None
        previous, self.mark = self.mark, (step, time.time())
        if previous[1] is None:
            return None
        self.per_step = (time.time() - previous[1]) / (step - previous[0])
        env = self.run.env
        if dist_utils.broadcast_object(self.run.elapsed() + self.per_step >= self.seconds, env):
            log.warning("time budget of %.1f min used up at step %d of %d: stopping here", self.seconds / 60, step,
                        total)
            return step
        fit = dist_utils.broadcast_object(step + int((0.98 * self.seconds - self.run.elapsed()) / self.per_step), env)
        new_total = max(step + 1, min(fit, self.max_steps))
        if abs(new_total - total) > 0.05 * total:
            log.info("time budget %.1f min: %.3f s/step, so %d steps in all", self.seconds / 60, self.per_step,
                     new_total)
        return new_total

    def eta(self, step: int, total: int) -> float:
        """Seconds left by the speed so far."""
        per_step = self.per_step or (time.time() - self._t0) / max(step - self._s0, 1)
        return max(total - step, 0) * per_step
