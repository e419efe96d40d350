"""The router's choices as the runtime made them: one row per (token, MoE layer), for cache profiling."""

from __future__ import annotations

TRACE_COLUMNS = ("prompt", "step", "position", "layer", "experts", "weights")


class RouterTrace:
    """Rows of TRACE_COLUMNS as tuples (cheap enough for a decode step's host work). `prompt` (an id, or
    one per batch row) and `step` label the rows recorded next; `enabled` False records nothing."""

    def __init__(self):
        self.rows: list[tuple] = []
        self.prompt, self.step, self.enabled = 0, 0, True

    def context(self) -> tuple:
        """The labels as they are now, for rows recorded later (a settled step's, see decode.Graph)."""
        return self.prompt, self.step

    def record(self, layer: int, chosen: list[list[int]], weights: list[list[float]], positions: list[int],
               context: tuple | None = None) -> None:
        """chosen and weights: one list per token, tokens in [B, T] order; positions: the T positions."""
        if not self.enabled:
            return
        prompt, step = context or self.context()
        per_row = isinstance(prompt, (list, tuple))
        for i, (experts, ws) in enumerate(zip(chosen, weights)):
            row, t = divmod(i, len(positions))
            self.rows.append((prompt[row] if per_row else prompt, step, positions[t], layer, experts, ws))
