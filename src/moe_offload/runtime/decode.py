"""The decode strategies: how one token's step runs, chosen once per generation (gpt-fast's
`decode_one_token`, with an expert cache under it). Each is a small class with `step(tok, position)`.

- Careful: each MoE layer shows its routing to the host and loads its experts before they run; a miss
  costs its transfer. The CPU's default: nothing runs ahead there. Batch 1 runs through the fused step
  (on CUDA as per-layer graphs); batches, and a cache whose policy may evict an expert the token still
  needs (not LRU), through the reference model.
- Graph: the whole token as if every routed expert were resident (one CUDA graph replay; plain calls
  off CUDA), then one host read of the step's routing (`settle`). A step that routed to an absent expert
  is redone from that layer the careful way. With in-place misses nothing is ever redone.
- Pipelined: the next step's graph is launched before this one is settled, since each graph picks its
  token (greedy or sampled, sampler.py) and writes it as the other's input itself. A step that missed
  discards the one launched after it, so a step is launched ahead only after one that settled with every
  expert resident.

A step that loaded experts predicts another, so after one the graph strategies go careful until a step
loads none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError
from .cache_policy import step_accesses
from .fused_step import FusedStep
from .graphs import LayerGraphs, StepGraphs
from .sampler import Sampler

PATHS = ("careful", "graph", "pipelined")


class Careful:
    def __init__(self, step: FusedStep, sampler: Sampler):
        self.fused, self.model, self.cache, self.sampler = step, step.model, step.cache, sampler
        dev = self.model.embed.device
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.position = 0
        # each MoE layer's next one, whose experts a prefetching cache loads ahead from this layer's input
        moes = [i for i, b in enumerate(self.model.layers) if b.moe is not None]
        self.next_moe = dict(zip(moes, moes[1:])) if self.cache.prefetches else {}
        rows = 3 if self.cache.prefetches else 2  # experts, weights (and the next layer's predicted experts)
        self.record = torch.empty(rows, step.cfg.experts_per_token, dtype=torch.float32, device=dev)
        self.graphs = None

    def step(self, tok: torch.Tensor, position: int, last: bool = False):
        """tok [B] at position -> (logits [B, V], the next token [B] on the device, the same as host ints)."""
        if tok.numel() != 1 or not self.cache.keeps_step_resident:
            self.pos.fill_(position)
            return self.picked(self.model.forward(tok.view(-1, 1), self.pos, [position])[:, -1])
        self.model.kv.end_of([position])
        x = self.layers_from(F.embedding(tok.view(-1), self.model.embed).view(-1), position, 0)
        return self.picked(self.fused.head(x).view(1, -1))

    def picked(self, logits: torch.Tensor):
        tok = self.sampler(logits, self.pos)
        return logits, tok, tok.tolist()

    def layers_from(self, x: torch.Tensor, position: int, start: int) -> torch.Tensor:
        """Layers start.. for one token whose layer-`start` input is x [H]; returns the final hidden [H]."""
        self.position = position
        self.pos.fill_(position)
        kv = self.model.kv
        if x.is_cuda:
            if self.graphs is None or self.graphs.kv_version != kv.version:
                self.graphs = LayerGraphs(self.fused, self.route, self.load, self.record, kv.version)
            x = self.graphs.run(x, self.pos, start)
        else:
            mask = kv.mask(self.pos)
            for i in range(start, len(self.model.layers)):
                h, resid, logits = self.fused.attention(i, x, self.pos, mask)
                if logits is None:
                    x = self.fused.experts(i, h, resid, None, None)
                    continue
                top_i, top_w, _ = self.route(i, h, logits, self.record)
                self.load(i, self.record.tolist())
                x = self.fused.experts(i, h, resid, top_i, top_w)
        self.cache.wait_prefetch()  # whatever runs next may read the experts loaded ahead
        return x

    def route(self, i: int, h, logits, record):
        """Layer i's routing into record (see __init__): top_i, top_w and the slots as the table has them
        now (an absent expert's reads as 0)."""
        top_i, top_w, slots, _ = self.fused.route(i, logits, record[:2])
        if i in self.next_moe:  # router lookahead: the next layer's router on this layer's input
            nxt = self.model.layers[self.next_moe[i]].moe.router
            record[2].copy_(torch.topk(F.linear(h, nxt), self.fused.cfg.experts_per_token).indices)
        return top_i, top_w, slots

    def load(self, i: int, routing: list[list[float]]) -> bool:
        """Layer i's routing as the host read it: recorded, its experts made resident (misses read in
        parallel) and the predicted ones loaded ahead. Returns whether anything missed."""
        layer, chosen = self.model.layers[i].moe.layer, [int(e) for e in routing[0]]
        self.model.trace.record(layer, [chosen], [routing[1]], [self.position])
        misses = self.cache.misses
        self.cache.get_many(layer, step_accesses([chosen]))
        if i in self.next_moe:
            self.cache.prefetch(self.model.layers[self.next_moe[i]].moe.layer, [int(e) for e in routing[2]])
        self.cache.wait_prefetch()
        return self.cache.misses != misses

    def flush(self) -> None:
        """Nothing is deferred: every layer's bookkeeping is done as it runs."""


class Graph:
    pipelined = False

    def __init__(self, careful: Careful):
        self.careful, self.fused, self.sampler = careful, careful.fused, careful.sampler
        self.model, self.cache = careful.model, careful.cache
        self.graphs: dict[tuple, StepGraphs] = {}  # per sampler key: what a capture samples with
        self.expect_resident = True
        self.deferred = None  # a settled step's bookkeeping, not yet done (see flush)
        self.ahead = None  # pipelined: the graph launched for the next step, not yet settled
        # the last step settled with every expert resident; only then is launching the next one before this
        # one settles likely to pay (a miss throws the step launched ahead away)
        self.clean = False
        self.discarded = 0  # steps launched ahead and thrown away

    def step(self, tok: torch.Tensor, position: int, last: bool = False):
        """tok [1] at position -> (logits [1, V], the next token [1] on the device, as host ints). last: no
        step follows this one (nothing is launched ahead)."""
        self.model.kv.end_of([position])
        if not self.expect_resident:
            self.flush()
            misses = self.cache.misses
            out = self.careful.step(tok, position)
            self.expect_resident, self.clean = self.cache.misses == misses, False
            return out
        if self.fused.in_place:
            self.cache.to_device()  # the device's copy of the cache's policy decides from here
        graphs = self.graphs.get(self.sampler.key)
        if graphs is None or graphs.kv_version != self.model.kv.version:  # captures read the old buffers
            graphs = self.graphs[self.sampler.key] = StepGraphs(self.fused, self.model.kv.version, self.sampler)
        k, self.ahead = self.ahead, None
        if k is None:  # nothing launched for this step yet
            k = 0
            graphs.launch(0, tok, position)
        if self.pipelined and not last and self.clean:
            graphs.launch(1 - k)  # the next step, from the token this one picked, before this one settles
            self.ahead = 1 - k
        self.flush()  # the previous step's bookkeeping, while the GPU runs
        host, token = graphs.wait(k)
        logits, inputs, _ = graphs.out[k]
        start = self.settle(host, position)
        self.clean = start == len(self.model.layers)
        if not self.clean:  # an expert was absent: redo from that layer, loading as it goes
            self.discarded += self.ahead is not None
            self.ahead = None  # a step launched ahead read this one's wrong token
            self.expect_resident = False
            return self.careful.picked(self.fused.head(self.careful.layers_from(inputs[start], position, start)).view(1, -1))
        return logits.view(1, -1), graphs.ids[1 - k].view(-1).clone(), [token]  # the graph picked the token

    def settle(self, host: list, position: int) -> int:
        """The step's routing as the host read it ([MoE layers][rows][k]). Returns the number of layers when
        every routed expert was resident (or read in place), else the first layer that routed to an absent
        one: the caller redoes the step from there (its KV entries at this position are overwritten). The
        bookkeeping of the layers that ran right waits for `flush`."""
        layers, n = self.fused.moe_layers, len(self.model.layers)
        context = (*self.model.trace.context(), position)
        if not self.fused.in_place:
            for j, (layer, (experts, _)) in enumerate(zip(layers, host)):
                if not all(self.cache.is_resident(layer, int(e)) for e in experts):
                    self.deferred = (layers[:j], host[:j], context)
                    self.flush()  # the hits before it, now: the careful redo goes on from here
                    return layer
        self.deferred = (layers, host, context)
        return n

    def flush(self) -> None:
        """A settled step's bookkeeping in order: recency in the cache's policy, counters, trace rows.
        Deferred from `settle` so that the host does it while the GPU runs the next step; callers that read
        the cache's counters call it first (generate does)."""
        if self.deferred is None:
            return
        (layers, host, (prompt, step, position)), self.deferred = self.deferred, None
        for layer, (experts, weights, *outcomes) in zip(layers, host):
            chosen = [int(e) for e in experts]
            if outcomes:  # in place: the device's policy served them; count what it did
                self.cache.count_step(layer, chosen, outcomes[0])
            else:  # all hits: counted, recency refreshed in order
                self.cache.get_many(layer, step_accesses([chosen]))
            self.model.trace.record(layer, [chosen], [weights], [position], context=(prompt, step))


class Pipelined(Graph):
    pipelined = True


STRATEGIES = {"careful": Careful, "graph": Graph, "pipelined": Pipelined}


def default_path(step: FusedStep, batch: int) -> str:
    """On CUDA the host must not wait for the GPU layer by layer; one-token steps of an LRU cache (which
    keeps a step's experts resident) can run ahead."""
    if not step.model.embed.is_cuda or batch != 1 or not step.cache.keeps_step_resident:
        return "careful"
    return "pipelined"


def check_path(step: FusedStep, path: str, batch: int) -> None:
    if path not in PATHS:
        raise InputError(f"unknown decode path {path!r} (one of {', '.join(PATHS)})")
    if path != "careful" and (batch != 1 or not step.cache.keeps_step_resident):
        raise InputError(f"the {path} decode path needs batch 1 and an LRU expert cache")


def make_decoder(step: FusedStep, path: str, sampler: Sampler):
    careful = Careful(step, sampler)
    return careful if path == "careful" else STRATEGIES[path](careful)
