"""The decode loop's step: one token in, the next out, on a path chosen explicitly.

A one-token step can go four ways (gpt-fast's `decode_one_token`, with a cache under it):

- careful: each MoE layer shows its routing to the host and loads its experts before they run
  (`Transformer.forward`); a miss costs its transfer. The CPU's default: nothing runs ahead there.
- optimistic: the whole token assuming every routed expert is resident, then one host read of the
  step's routing (`Transformer.settle`). A step that routed to an absent expert is redone from that
  layer the careful way.
- graph: the optimistic step as a CUDA graph replay (`StepGraphs`).
- pipelined: greedy only; the next step's graph is launched before this one is settled, since each
  graph writes the other's input itself. A step that missed discards the one launched after it, so a
  step is launched ahead only after a step that settled with every expert resident.

A step that loaded experts predicts another, so after one the steps go careful until one loads none.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import InputError
from .model import Transformer
from .step_graphs import StepGraphs

PATHS = ("careful", "optimistic", "graph", "pipelined")


def default_path(model: Transformer, batch: int, greedy: bool) -> str:
    """On CUDA the host must not wait for the GPU layer by layer; one-token steps of an LRU cache (which
    keeps a step's experts resident) can run ahead."""
    if not model.embed.is_cuda or batch != 1 or not model.cache.keeps_step_resident:
        return "careful"
    return "pipelined" if greedy else "graph"


def check_path(model: Transformer, path: str, batch: int, greedy: bool) -> None:
    if path not in PATHS:
        raise InputError(f"unknown decode path {path!r} (one of {', '.join(PATHS)})")
    if path != "careful" and (batch != 1 or not model.cache.keeps_step_resident):
        raise InputError(f"the {path} decode path needs batch 1 and an LRU expert cache")
    if path == "pipelined" and not greedy:
        raise InputError("the pipelined decode path is greedy only (temperature 0)")


class Decoder:
    """`step(tok, position, last)` feeds tok [B] at position and returns (logits [B, V], the next token
    [B] on the device, the same as host ints). pick: logits -> tokens (the sampler)."""

    def __init__(self, model: Transformer, path: str, pick: Callable[[torch.Tensor], torch.Tensor]):
        self.model, self.path, self.pick = model, path, pick
        self.pos = torch.zeros(1, dtype=torch.long, device=model.embed.device)
        self.expect_resident = True
        self.ahead = None  # pipelined: the graph launched for the next step, not yet settled
        # pipelined: the last step settled with every expert resident; only then is launching the next one
        # before this one settles likely to pay (a miss throws the step launched ahead away)
        self.clean = False
        self.discarded = 0  # steps launched ahead and thrown away

    def _graphs(self) -> StepGraphs:
        m = self.model
        if m.step_graphs is None or m.step_graphs.kv_version != m._kv_version:
            m.step_graphs = StepGraphs(m)  # the KV cache was reallocated: captures read the old buffers
        return m.step_graphs

    def step(self, tok: torch.Tensor, position: int, last: bool):
        """last: no step follows this one (nothing is launched ahead)."""
        m = self.model
        m.check_positions([position])
        if self.path in ("careful", "optimistic") or not self.expect_resident:
            self.pos.fill_(position)  # on the device: a tensor built from the host would sync (graphs hold their own)
        if self.path == "careful" or not self.expect_resident:
            misses = m.cache.misses
            logits = m.forward(tok.view(-1, 1), self.pos, [position])[:, -1]
            self.expect_resident = m.cache.misses == misses
            self.clean = False
            return self._picked(logits)
        if m.in_place:
            m.cache.to_device()  # the device's copy of the cache's policy decides from here
        if self.path == "optimistic":
            m.begin_step([position])
            logits, inputs, (layers, routing) = m.optimistic_step(tok.view(1, 1), self.pos)
            host, greedy = (routing.cpu().tolist() if layers else []), None
        else:
            graphs = self._graphs()
            k, self.ahead = self.ahead, None
            if k is None:  # nothing launched for this step yet
                k = 0
                graphs.launch(0, tok, position)
            if self.path == "pipelined" and not last and self.clean:
                graphs.launch(1 - k)  # the next step, from this one's greedy token, before this one settles
                self.ahead = 1 - k
            m.begin_step([position])  # the previous step's bookkeeping, while the GPU runs
            host, token = graphs.wait(k)
            logits, inputs, layers, _ = graphs.out[k]
            greedy = (graphs.ids[1 - k].view(-1).clone(), [token]) if self.path == "pipelined" else None
        start = m.settle(layers, host)
        self.clean = start == len(m.layers)
        if not self.clean:  # an expert was absent: redo from that layer, loading as it goes
            self.discarded += self.ahead is not None
            self.ahead = None  # a step launched ahead read this one's wrong token
            self.expect_resident = False
            self.pos.fill_(position)
            return self._picked(m.head(m.careful_from(inputs[start], self.pos, start, position + 1))[:, -1])
        if greedy is not None:  # the graph picked the token
            return (logits[:, -1], *greedy)
        return self._picked(logits[:, -1])

    def _picked(self, logits: torch.Tensor):
        tok = self.pick(logits)
        return logits, tok, tok.tolist()
