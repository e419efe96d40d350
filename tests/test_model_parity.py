"""Our selective-loading model against transformers' own classes on the same synthetic checkpoint.

Every expected value comes from transformers (logits, greedy tokens, router choices), never from an
earlier run of ours.
"""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, Qwen3MoeForCausalLM, Qwen3OmniMoeThinkerForConditionalGeneration

from moe_offload.runtime.generate import fidelity, generate, load_runtime, teacher_forced_logits
from moe_offload.checkpoint.extracted import build_and_extract
from moe_offload.analysis.cache_sim import access_sequence, simulate
from moe_offload.runtime.cache_policy import Scoped
from moe_offload.runtime.fused_step import TRITON_OPS
from moe_offload.runtime.trace import TRACE_COLUMNS

BASE = dict(num_layers=4, num_experts=16, experts_per_token=4, hidden_size=64, moe_intermediate_size=32, num_heads=4,
            num_kv_heads=2, head_dim=16, seed=0, max_shard_size="1MB")
SPECS = {
    "qwen3_omni_thinker": (dict(BASE, layout="qwen3_omni_thinker"), Qwen3OmniMoeThinkerForConditionalGeneration),
    "qwen3_moe": (dict(BASE, layout="qwen3_moe", mlp_only_layers=[1]), Qwen3MoeForCausalLM),
    # dimensions no kernel tile is a power of two of: head_dim 12, hidden 48, 10 experts, top-3
    "odd_dims": (dict(BASE, layout="qwen3_moe", mlp_only_layers=[1], hidden_size=48, head_dim=12, num_experts=10,
                      experts_per_token=3, moe_intermediate_size=24), Qwen3MoeForCausalLM),
}
PROMPTS = ["The capital of France is", "Once upon a time there was a small robot", "def add(a, b):"]
NEW_TOKENS = 32
TOL = 1e-4


def load_reference(cls, ckpt):
    ref = cls.from_pretrained(ckpt, dtype=torch.float32).eval()
    if not hasattr(ref.config, "vision_start_token_id"):
        # transformers 5.23's thinker config lacks this attribute, which its own text-only rope-index
        # path reads; the real checkpoint's value (it is unused without images)
        ref.config.vision_start_token_id = 151652
    return ref


@pytest.fixture(scope="module", params=sorted(SPECS))
def model(request, tmp_path_factory):
    spec, cls = SPECS[request.param]
    ex = build_and_extract(spec, tmp_path_factory.mktemp(request.param))
    ckpt, cfg = ex.ckpt, ex.config
    ref, tok = load_reference(cls, ckpt), AutoTokenizer.from_pretrained(ckpt)
    cases = []
    with torch.inference_mode():
        for text in PROMPTS:
            enc = tok(text, return_tensors="pt")
            out = ref.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
            full = ref(**enc).logits[0]
            cases.append(dict(ids=enc.input_ids, mask=enc.attention_mask, full=full,
                              tokens=out.sequences[0, enc.input_ids.shape[1]:].tolist(),
                              step_logits=[l[0] for l in out.logits]))
    runtime = lambda **kw: load_runtime(ex.dense, ex.dir, ckpt, **kw)
    return dict(name=request.param, ckpt=ckpt, cfg=cfg, ref=ref, cases=cases, runtime=runtime)


@pytest.mark.parametrize("path", ["careful", "graph", "pipelined"])
@pytest.mark.parametrize("capacity", ["all", "top_k", "between"])
def test_logits_and_greedy_tokens_match_transformers(model, capacity, path):
    """Each decode strategy on the CPU (the fused step through its PyTorch ops): `graph` is the
    one-sync-per-token step CUDA replays as a graph, here as plain calls, redo from the first layer that
    needed a load included; `pipelined` also runs step N+1 before step N is settled and throws it away
    when N missed (CUDA's greedy default)."""
    cfg = model["cfg"]
    cap = {"all": cfg.num_experts, "top_k": cfg.experts_per_token, "between": 6}[capacity]
    rt = model["runtime"](capacity=cap, use_kernels=False)
    for case in model["cases"]:
        ids = case["ids"]
        rt.model.setup_caches(1, ids.shape[1])
        with torch.inference_mode():
            prefill = rt.model.forward(ids, torch.arange(ids.shape[1]))[0]
        assert (prefill - case["full"]).abs().max().item() <= TOL
        gen = generate(rt, ids, NEW_TOKENS, return_logits=True, path=path)
        assert gen.tokens[0] == case["tokens"]
        assert len(gen.logits) == NEW_TOKENS
        for ours, theirs in zip(gen.logits, case["step_logits"]):
            assert (ours[0] - theirs).abs().max().item() <= TOL
    s = rt.cache.stats()
    assert s["bytes_loaded"] == s["misses"] * rt.cache.expert_bytes(0, 0)
    if cap == cfg.num_experts:
        assert s["evictions"] == 0
    else:
        assert s["evictions"] > 0


def test_pipelined_step_launched_ahead_of_a_miss_is_thrown_away(model):
    """Step N+1 is launched from step N's greedy token before N is settled; when N missed, N's redo gives
    a token of its own and N+1 runs again from it: transformers' tokens, with steps thrown away (capacity
    6 misses after clean steps)."""
    rt, discarded = model["runtime"](capacity=6, use_kernels=False), 0
    for case in model["cases"]:
        ids, n = case["ids"], NEW_TOKENS
        t = ids.shape[1]
        rt.model.setup_caches(1, t + n)
        with torch.inference_mode():
            tok = rt.model.forward(ids, torch.arange(t))[:, -1].argmax(-1)
            decoder, tokens = rt.decoder("pipelined"), tok.tolist()
            for step in range(1, n):
                _, tok, host = decoder.step(tok, t + step - 1, last=step + 1 == n)
                tokens += host
        assert tokens == case["tokens"]
        discarded += decoder.discarded
    assert discarded > 0


@pytest.mark.parametrize("path", ["careful", "graph"])
def test_host_tier_matches_transformers(model, path):
    """Misses served from the host tier (every expert in RAM, read once) give transformers' tokens."""
    cfg, case = model["cfg"], model["cases"][1]
    rt = model["runtime"](capacity=cfg.experts_per_token, host_tier=True, use_kernels=False)
    assert rt.cache.host_tier_bytes == len(cfg.expert_layers) * cfg.num_experts * rt.cache.expert_bytes(0, 0)
    gen = generate(rt, case["ids"], NEW_TOKENS, return_logits=True, path=path)
    assert gen.tokens[0] == case["tokens"]
    for ours, theirs in zip(gen.logits, case["step_logits"]):
        assert (ours[0] - theirs).abs().max().item() <= TOL
    assert gen.decode_stats["misses"] > 0


@pytest.mark.parametrize("path", ["careful", "pipelined"])
def test_router_lookahead_prefetch_matches_transformers(model, path):
    """With the host tier, each careful layer loads the experts the next layer's router predicts from its
    input: still transformers' tokens, and some predicted loads are then asked for (misses hidden)."""
    cfg, case = model["cfg"], model["cases"][1]
    rt = model["runtime"](capacity=6, host_tier=True, prefetch=True, use_kernels=False)
    gen = generate(rt, case["ids"], NEW_TOKENS, return_logits=True, path=path)
    assert gen.tokens[0] == case["tokens"]
    for ours, theirs in zip(gen.logits, case["step_logits"]):
        assert (ours[0] - theirs).abs().max().item() <= TOL
    s = gen.decode_stats
    assert 0 < s["prefetch_used"] <= s["prefetched"]


@pytest.mark.parametrize("path", ["careful", "pipelined"])
def test_unified_memory_matches_transformers(model, path):
    """Unified memory: every expert read once into slabs that stay where they were read (pinned host RAM
    on CUDA, which the kernels read in place), so nothing misses after the start, asked for capacity 6 or
    not; transformers' tokens and logits."""
    cfg, case = model["cfg"], model["cases"][0]
    rt = model["runtime"](capacity=6, unified=True, use_kernels=False)
    assert rt.cache.slot_count == len(cfg.expert_layers) * cfg.num_experts
    gen = generate(rt, case["ids"], NEW_TOKENS, return_logits=True, path=path)
    assert gen.tokens[0] == case["tokens"]
    for ours, theirs in zip(gen.logits, case["step_logits"]):
        assert (ours[0] - theirs).abs().max().item() <= TOL
    assert gen.prefill_stats["misses"] == gen.decode_stats["misses"] == 0
    assert gen.decode_stats["hits"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("capacity", ["all", "between", "between_prefetch"])
def test_fused_kernels_match_transformers(model, capacity, monkeypatch):
    """The decode step CUDA runs: every layer through the fused Triton kernels (here under Triton's
    interpreter, which is slow: one prompt, a few tokens), redo from a layer that missed included
    (capacity 6 misses); the prompt's norms, RoPE, SwiGLU and expert sums through the prefill kernels, as
    on CUDA."""
    from moe_offload.runtime import prefill_kernels

    from moe_offload.runtime.model import qkv_heads

    cfg, case, steps = model["cfg"], model["cases"][0], 6
    assert model["runtime"](capacity=cfg.num_experts).step.ops is not TRITON_OPS  # on the CPU only when asked for
    # asked for, the decode kernels run under the interpreter, and a prompt still through PyTorch (a long one
    # would take minutes there)
    assert model["runtime"](capacity=cfg.num_experts, use_kernels=True).model.layers[0].attn.qkv_heads is qkv_heads
    monkeypatch.setattr(prefill_kernels, "serves", lambda device: True)
    prefetch = capacity == "between_prefetch"
    rt = model["runtime"](capacity=cfg.num_experts if capacity == "all" else 6, use_kernels=True,
                          host_tier=prefetch, prefetch=prefetch)
    assert rt.step.ops is TRITON_OPS
    moe = next(block.moe for block in rt.model.layers if block.moe is not None)
    assert rt.model.layers[0].attn.qkv_heads is prefill_kernels.qkv_heads and moe.combine is prefill_kernels.combine
    gen = generate(rt, case["ids"], steps, return_logits=True, path="pipelined")
    assert gen.tokens[0] == case["tokens"][:steps]
    for ours, theirs in zip(gen.logits, case["step_logits"]):
        assert (ours[0] - theirs).abs().max().item() <= TOL
    if capacity != "all":
        assert gen.decode_stats["misses"] > 0  # the redo path ran
    if prefetch:
        assert gen.decode_stats["prefetched"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("capacity", ["top_k", "between"])
def test_in_place_misses_match_transformers_and_the_host_lru(model, capacity):
    """With the host tier, decode steps read absent experts from it in place, the LRU run by the route
    kernel on the device: transformers' tokens and logits, and exactly the hits, misses and final
    residents of the host's LRU replaying the trace (two prompts on one runtime: the policy goes to the
    device for each decode and back to the host for the next prefill)."""
    cfg, steps = model["cfg"], 6
    cap = {"top_k": cfg.experts_per_token, "between": 6}[capacity]
    rt = model["runtime"](capacity=cap, host_tier=True, use_kernels=True)
    assert rt.step.in_place and not model["runtime"](capacity=cap, host_tier=True, use_kernels=True,
                                                    in_place_misses=False).step.in_place
    hits = misses = 0
    for prompt, case in enumerate(model["cases"][:2]):
        gen = generate(rt, case["ids"], steps, return_logits=True, path="pipelined", prompt=prompt)
        assert gen.tokens[0] == case["tokens"][:steps]
        for ours, theirs in zip(gen.logits, case["step_logits"]):
            assert (ours[0] - theirs).abs().max().item() <= TOL
        assert gen.decode_stats["misses"] > 0 and gen.decode_stats["load_seconds"] == 0  # read inside the step
        for stats in (gen.prefill_stats, gen.decode_stats):
            hits, misses = hits + stats["hits"], misses + stats["misses"]
    accesses = access_sequence(pd.DataFrame(rt.model.trace.rows, columns=TRACE_COLUMNS))
    assert simulate(accesses, "lru", "per_layer", cap) == {"hits": hits, "misses": misses}
    replay = Scoped("lru", "per_layer", cap)
    for key in accesses:
        replay.access(key)
    assert rt.cache.resident_count() == len(cfg.expert_layers) * cap
    for layer in cfg.expert_layers:
        assert sorted(k for k in rt.cache.slot if k[0] == layer) == sorted(replay.pool(layer).order())
        w1, _, table = rt.cache.slabs(layer)  # each resident expert's slot holds its bytes
        for (_, expert), slot in ((k, s) for k, s in rt.cache.slot.items() if k[0] == layer):
            assert table[expert] == slot
            assert torch.equal(w1[slot, :w1.shape[1] // 2], rt.cache.get(layer, expert)[0])


def test_truncated_depth_matches_truncated_transformers(model):
    depth = 2
    ref = copy.deepcopy(model["ref"])
    decoder = ref.get_decoder()
    decoder.layers = decoder.layers[:depth]
    decoder.config.num_hidden_layers = depth
    rt = model["runtime"](depth=depth, capacity=model["cfg"].experts_per_token)
    assert sorted(rt.cache.spans) == [L for L in model["cfg"].expert_layers if L < depth]  # only those files opened
    for case in model["cases"][:2]:
        with torch.inference_mode():
            want = ref.generate(input_ids=case["ids"], attention_mask=case["mask"], max_new_tokens=8, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)
            hidden = model["ref"](input_ids=case["ids"], attention_mask=case["mask"], output_hidden_states=True)
        gen = generate(rt, case["ids"], 8, return_logits=True)
        assert gen.tokens[0] == want.sequences[0, case["ids"].shape[1]:].tolist()
        for ours, theirs in zip(gen.logits, want.logits):
            assert (ours - theirs).abs().max().item() <= TOL
        # The same through the untruncated model's hidden states: layer depth-1's output, final norm, lm_head.
        with torch.inference_mode():
            via_hidden = ref.lm_head(decoder.norm(hidden.hidden_states[depth]))[0, -1]
        assert (gen.logits[0][0] - via_hidden).abs().max().item() <= TOL


def test_router_trace_matches_transformers_router(model):
    cfg, case = model["cfg"], model["cases"][0]
    rt = model["runtime"](capacity=cfg.experts_per_token)
    gen = generate(rt, case["ids"], 3, prompt=7)
    with torch.inference_mode():
        out = model["ref"](input_ids=case["ids"], attention_mask=case["mask"], output_router_logits=True)
    t = case["ids"].shape[1]
    moe_layers = cfg.expert_layers
    assert len(out.router_logits) == len(moe_layers)
    rows = {(r["step"], r["layer"], r["position"]): r for r in gen.trace}
    assert len(gen.trace) == len(rows) == len(moe_layers) * (t + 2)  # prefill + 2 decode steps
    assert {r["prompt"] for r in gen.trace} == {7}
    for layer, logits in zip(moe_layers, out.router_logits):
        w, idx = torch.topk(logits.float().softmax(-1), cfg.experts_per_token, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        for pos in range(t):
            row = rows[(0, layer, pos)]
            assert row["experts"] == idx[pos].tolist()
            assert torch.allclose(torch.tensor(row["weights"]), w[pos], atol=1e-6)
    assert [rows[(s, moe_layers[0], t + s - 1)]["position"] for s in (1, 2)] == [t, t + 1]


def test_teacher_forcing_and_fidelity(model):
    case = model["cases"][1]
    prompt, cont = case["ids"][0].tolist(), case["tokens"]
    with torch.inference_mode():
        native = model["ref"](input_ids=torch.tensor([prompt + cont])).logits[0, len(prompt) - 1: -1]
    ours = teacher_forced_logits(model["runtime"](capacity=model["cfg"].experts_per_token), prompt, cont)
    assert ours.shape == native.shape == (len(cont), model["cfg"].vocab_size)
    assert (ours - native).abs().max().item() <= TOL
    f = fidelity(native, ours, cont)
    assert f["top1_agreement"] == 1.0 and abs(f["mean_kl"]) < 1e-6
    self_ppl = fidelity(native, native, cont)["perplexity"]
    assert f["perplexity"] == pytest.approx(self_ppl, rel=1e-5)
    worse = fidelity(native, native + 3 * torch.randn_like(native, generator=torch.Generator().manual_seed(0)))
    assert worse["mean_kl"] > 0.01 and worse["top1_agreement"] < 1.0


def test_sampling_is_seeded_and_the_same_on_every_decode_path(model):
    """A sampled token depends on the seed and its position only: the same tokens through the careful, graph
    and pipelined strategies (a miss redone included: capacity 6), another seed gives others, and top-k 1
    is greedy."""
    rt, ids = model["runtime"](capacity=6), model["cases"][0]["ids"]
    settings = dict(temperature=0.8, top_k=20, top_p=0.9, seed=3)
    a = generate(rt, ids, 16, path="careful", **settings).tokens
    assert a == generate(rt, ids, 16, path="graph", **settings).tokens
    assert a == generate(rt, ids, 16, path="pipelined", **settings).tokens
    assert a != generate(rt, ids, 16, path="pipelined", **dict(settings, seed=4)).tokens
    assert a != model["cases"][0]["tokens"][:16]
    for path in ("careful", "pipelined"):
        assert generate(rt, ids, 8, temperature=1.0, top_k=1, seed=5, path=path).tokens[0] == model["cases"][0]["tokens"][:8]


def test_eos_stops_and_timings(model):
    rt, case = model["runtime"](), model["cases"][0]
    eos = case["tokens"][4]
    gen = generate(rt, case["ids"], NEW_TOKENS, eos_token_id=eos)
    assert gen.tokens[0] == case["tokens"][: case["tokens"].index(eos) + 1]
    assert gen.prefill_seconds > 0 and gen.decode_seconds > 0 and gen.decode_tokens_per_second > 0
    assert gen.prefill_stats["misses"] > 0


def test_batch_matches_transformers_batch(model):
    a, b = model["cases"][0]["ids"][0], model["cases"][1]["ids"][0]
    n = min(len(a), len(b))
    ids = torch.stack([a[:n], b[:n]])
    with torch.inference_mode():
        want = model["ref"].generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                     do_sample=False)
    gen = generate(model["runtime"](capacity=model["cfg"].experts_per_token), ids, 12, prompt=[3, 4])
    assert gen.tokens == want[:, n:].tolist()
    assert {r["prompt"] for r in gen.trace if r["position"] == 0} == {3, 4}


def test_bfloat16_compute_stays_close(model):
    """bf16 compute is not bit-parity; it should still track float32 transformers closely."""
    case = model["cases"][1]
    prompt, cont = case["ids"][0].tolist(), case["tokens"]
    with torch.inference_mode():
        native = model["ref"](input_ids=torch.tensor([prompt + cont])).logits[0, len(prompt) - 1: -1]
    rt = model["runtime"](dtype=torch.bfloat16)
    assert rt.model.embed.dtype == torch.bfloat16 and rt.cache.get(0, 0)[0].dtype == torch.bfloat16
    f = fidelity(native, teacher_forced_logits(rt, prompt, cont), cont)
    print(model["name"], f)
    assert f["top1_agreement"] >= 0.8 and f["mean_kl"] < 0.05


def test_runtime_rejects_bad_arguments(model, tmp_path):
    from moe_offload.errors import InputError

    k = model["cfg"].experts_per_token
    with pytest.raises(InputError, match=f"cache capacity {k - 1} is below experts_per_token {k}"):
        model["runtime"](capacity=k - 1)
    with pytest.raises(InputError, match="depth 5 is out of range"):
        model["runtime"](depth=5)
    with pytest.raises(InputError, match="expert file for layer 0 does not exist"):
        load_runtime(tmp_path / "dense.safetensors", tmp_path, model["ckpt"])
    with pytest.raises(InputError, match="max_new_tokens"):
        generate(model["runtime"](), model["cases"][0]["ids"], 0)


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_checkpoint_stored_in_any_float_dtype(tmp_path, storage):
    """Fine-tunes are often saved in float16 or float32: extracted, validated and run like bf16 ones."""
    from moe_offload.checkpoint.validate import validate_dense, validate_layer

    spec = dict(BASE, layout="qwen3_omni_thinker", num_layers=2, storage_dtype=storage)
    ex = build_and_extract(spec, tmp_path)
    ckpt, cfg = ex.ckpt, ex.config
    validate_dense(ckpt, ex.dense)
    for layer, path in ex.layers.items():
        validate_layer(ckpt, layer, path)
    ref, tok = load_reference(Qwen3OmniMoeThinkerForConditionalGeneration, ckpt), AutoTokenizer.from_pretrained(ckpt)
    rt = load_runtime(ex.dense, ex.dir, ckpt, capacity=cfg.experts_per_token)
    assert {s.dtype for spans in rt.cache.spans.values() for s in spans} == {getattr(torch, storage)}
    enc = tok(PROMPTS[0], return_tensors="pt")
    with torch.inference_mode():
        want = ref.generate(**enc, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    gen = generate(rt, enc.input_ids, 8, return_logits=True)
    assert gen.tokens[0] == want.sequences[0, enc.input_ids.shape[1]:].tolist()
    for ours, theirs in zip(gen.logits, want.logits):
        assert (ours[0] - theirs[0]).abs().max().item() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("kernels", [False, True], ids=["torch_ops", "kernels"])
def test_long_prompt_through_chunked_prefill_and_split_kv_decode(model, kernels, monkeypatch):
    """A 2100-token prompt: prefilled in chunks of 700 (grouped GEMMs over the cache's slabs, misses between
    waves), then decoded with attention split along the KV cache (the kernels, under the interpreter):
    transformers' tokens and logits."""
    from moe_offload.runtime import cache_policy

    monkeypatch.setattr(cache_policy, "PREFILL_CHUNK", 700)
    cfg, steps = model["cfg"], 4
    ids = torch.randint(0, cfg.vocab_size, (1, 2100), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model["ref"].generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                     do_sample=False, output_logits=True, return_dict_in_generate=True)
    rt = model["runtime"](capacity=6, use_kernels=kernels)
    gen = generate(rt, ids, steps, return_logits=True, path="pipelined")
    assert gen.tokens[0] == want.sequences[0, ids.shape[1]:].tolist()
    for ours, theirs in zip(gen.logits, want.logits):
        assert (ours[0] - theirs[0]).abs().max().item() <= TOL
    assert gen.prefill_stats["misses"] > cfg.num_experts  # waves: more experts routed than the cache holds
    accesses = access_sequence(pd.DataFrame(rt.model.trace.rows, columns=TRACE_COLUMNS))  # chunk by chunk
    s = rt.cache.stats()
    assert simulate(accesses, "lru", "per_layer", 6) == {"hits": s["hits"], "misses": s["misses"]}
    forced = teacher_forced_logits(rt, ids[0].tolist(), gen.tokens[0])  # chunked too, logits only at the end
    assert (forced - torch.stack([l[0] for l in want.logits])).abs().max().item() <= TOL


@pytest.mark.parametrize("bits, group, spec", [(8, 8, "qwen3_omni_thinker"), (4, 12, "odd_dims")])
def test_quantized_experts_match_transformers_on_the_dequantized_weights(tmp_path, bits, group, spec, monkeypatch):
    """Layer files quantized (checkpoint.quantize) and decoded through the fused kernels, which read the
    experts from their slots as stored (under the interpreter: one prompt, a few tokens; capacity 6 misses
    and redoes), the prompt through the Triton grouped GEMM as on CUDA: the greedy tokens and logits of
    transformers' model whose experts are the dequantized weights. The PyTorch ops' path (the prompt
    through torch's grouped GEMM on dequantized slabs), the same."""
    from safetensors import safe_open

    from moe_offload.checkpoint.quantize import dequantize, qweight_name, quantize_layer, scales_name
    from moe_offload.runtime import model as model_module

    serves = model_module.quant_kernel_serves

    spec, cls = SPECS[spec]
    spec = dict(spec, num_layers=3)
    ex = build_and_extract(spec, tmp_path)
    ckpt, layout, cfg = ex.ckpt, ex.layout, ex.config
    ref = load_reference(cls, ckpt)
    decoder = ref.get_decoder()
    for layer in cfg.expert_layers:
        quantize_layer(ex.layers[layer], tmp_path / "q" / f"layer_{layer}.safetensors", bits, group)
        with safe_open(tmp_path / "q" / f"layer_{layer}.safetensors", "pt") as f:
            w = [[dequantize(f.get_tensor(qweight_name(name)), f.get_tensor(scales_name(name)), bits)
                  for name in (layout.expert(layer, e, p) for p in ("gate_proj", "up_proj", "down_proj"))]
                 for e in range(cfg.num_experts)]
        experts = decoder.layers[layer].mlp.experts
        with torch.no_grad():
            experts.gate_up_proj.copy_(torch.stack([torch.cat(ws[:2]) for ws in w]))
            experts.down_proj.copy_(torch.stack([ws[2] for ws in w]))
    enc = AutoTokenizer.from_pretrained(ckpt)(PROMPTS[0], return_tensors="pt")
    steps = 5
    with torch.inference_mode():
        want = ref.generate(**enc, max_new_tokens=steps, do_sample=False, output_logits=True,
                            return_dict_in_generate=True)
    for capacity, use_kernels in ((cfg.num_experts, True), (6, True), (6, False)):
        monkeypatch.setattr(model_module, "quant_kernel_serves", (lambda device, x: True) if use_kernels else serves)
        rt = load_runtime(ex.dense, tmp_path / "q", ckpt, capacity=capacity,
                          use_kernels=use_kernels)
        assert rt.cache.quant_slabs(cfg.expert_layers[0])[2:] == (bits, group)
        assert (rt.step.ops is TRITON_OPS) == use_kernels
        gen = generate(rt, enc.input_ids, steps, return_logits=True, path="pipelined")
        assert gen.tokens[0] == want.sequences[0, enc.input_ids.shape[1]:].tolist()
        for ours, theirs in zip(gen.logits, want.logits):
            assert (ours[0] - theirs[0]).abs().max().item() <= TOL
        if capacity == 6:
            assert gen.decode_stats["misses"] > 0  # the redo path ran
