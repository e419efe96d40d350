"""The workflow's plan as a pure function of the config, the model's text config and an explicit machine
description: what memory each job declares, which bounds a local run registers, and the one line that
stops a plan whose jobs cannot fit.

The .smk files describe the machine in one block and ask this module everything else:
- a local run: `detect_machine` (psutil's memory, nvidia-smi's GPU memory), unless `--resources` gives them;
- a cluster run: the profile states its nodes' memory and GPU memory (config `node_mem_mb`,
  `node_gpu_mem_mb`, as it states `cores`), and nothing of the machine the client runs on is read.
Snakemake 9.27.1 cannot tell the Snakefile its executor while parsing it (`workflow.executor_plugin` is
set only when the workflow executes, and a dry run's is the `dryrun` plugin), so the stated node memory
is what marks a cluster run.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import resources as res
from .config import quant_scheme, widest_bits
from .disk import format_bytes

NATIVE_BUDGET_SHARE = 0.9  # the native reference's default budget on the CPU: of the machine's memory
HINTS = {
    "generate_native_reference": "lower native.max_memory_mb (the rest is offloaded to disk)",
    "generate_native_timing": "set native.timing: false (the reference run offloads and still completes)",
}


@dataclass(frozen=True)
class Machine:
    """Where the jobs run: the memory one job may use and one GPU's memory (MiB; None: not known, not
    checked). cluster: the figures are a node's, stated by the profile."""

    mem_mb: int | None
    gpu_mem_mb: int | None = None
    cluster: bool = False

    @property
    def holder(self) -> str:
        return "a node" if self.cluster else "the machine"


def detect_machine(device: str, given: dict | None = None, ask_gpu: bool = True) -> Machine:
    """This machine, for a local run: its memory and (device cuda) its GPU's, unless `given` (the
    bounds of --resources) says otherwise. Asks nvidia-smi, never torch: planning must not start CUDA;
    and only where ask_gpu (the main process: a job's own Snakemake process does not ask again)."""
    import psutil

    given = given or {}
    mem_mb = given.get("mem_mb") or psutil.virtual_memory().total // 2**20
    gpu_mb = given.get("gpu_mem_mb")
    if gpu_mb is None and ask_gpu and device.startswith("cuda"):
        gpu_mb = res.gpu_memory_mb(device)
    return Machine(mem_mb, gpu_mb)


def stated_machine(config: dict) -> Machine | None:
    """The nodes a cluster profile states (config node_mem_mb, node_gpu_mem_mb); None for a local run."""
    if config.get("node_mem_mb") is None:
        return None
    return Machine(config["node_mem_mb"], config.get("node_gpu_mem_mb"), cluster=True)


class Plan:
    """The jobs' needs and the checks against the machine, from (config, text config, machine)."""

    def __init__(self, config: dict, text, machine: Machine, tower_params: int = 0):
        """tower_params: the thinker's audio and vision towers' parameters (resources.tower_params): the
        native thinker always holds them, a depth run when a prompt has audio or images."""
        from .config import media_files
        from .media_files import prompt_token_bound

        self.config, self.text, self.machine = config, text, machine
        self.device = config["generate"]["device"]
        self.on_gpu = self.device.startswith("cuda")
        self.dtype = config["generate"]["dtype"]
        self.base_mb = config["resources"]["base_mem_mb"]
        # a byte-level tokenizer makes at most one token per byte: a bound on prompt plus new tokens
        self.seq_len = (max(prompt_token_bound(p) for p in config["generate"]["prompts"])
                        + config["generate"]["max_new_tokens"])
        self.towers_bytes = tower_params * res.DTYPE_BYTES[self.dtype]
        self.depth_towers_bytes = self.towers_bytes if media_files(config["generate"]["prompts"]) else 0
        self.layer_bytes = text.num_experts * text.expert_bytes
        self.dense_bytes = res.extract_bytes(text)["dense_bytes"]

    # -- what a local run registers with Snakemake ------------------------------------------------------

    def global_resources(self) -> dict[str, int]:
        """Bounds of a local run: the machine's memory, the GPU's, one GPU job at a time. None for a
        cluster: there each job gets a node of its own, and a global bound would cap every job's --mem."""
        if self.machine.cluster:
            return {}
        bounds = {"mem_mb": self.machine.mem_mb}
        if self.on_gpu:
            bounds["gpu"] = 1
            if self.machine.gpu_mem_mb is not None:
                bounds["gpu_mem_mb"] = self.machine.gpu_mem_mb
        return bounds

    def warnings(self) -> list[str]:
        if self.on_gpu and self.machine.gpu_mem_mb is None:
            where = ("the profile states no node_gpu_mem_mb" if self.machine.cluster
                     else "nvidia-smi reports no such GPU here (or not its memory)")
            return [f"warning: generate.device is {self.device}, but {where}: the GPU jobs' memory is not checked"]
        return []

    # -- each job's needs -------------------------------------------------------------------------------

    def extract_mem_mb(self, rule: str) -> int:
        if rule == "extract_layer":
            return res.to_mb(int(self.config["resources"]["extract_mem_factor"] * self.layer_bytes), self.base_mb)
        if rule == "quantize_layer":
            # its output held until written (at most half the 16-bit layer), and one expert's candidate
            # roundings in float32 (its weights, q and error for a clip ratio, the best so far: ~ 8 copies)
            return res.to_mb(self.layer_bytes // 2 + 8 * 2 * self.text.expert_bytes, self.base_mb)
        return self.base_mb

    def _needs(self, host_bytes: int, device_bytes: int) -> dict[str, int]:
        """mem_mb for the host (plus a process's base), and on a GPU gpu_mem_mb for what lives there."""
        needs = {"mem_mb": res.to_mb(host_bytes, self.base_mb)}
        if self.on_gpu:
            needs["gpu_mem_mb"] = res.to_mb(device_bytes)
        return needs

    def native_reference(self) -> dict[str, int]:
        """The bytes it holds at its dtype within its budget; the rest is on disk."""
        native = self.config["native"]
        budget_mb = native["max_memory_mb"]
        if budget_mb is None and not self.on_gpu and self.machine.mem_mb:
            budget_mb = int(NATIVE_BUDGET_SHARE * self.machine.mem_mb)
        held = res.native_bytes(self.text, self.dtype, self.seq_len,
                                None if budget_mb is None else budget_mb * 2**20, self.towers_bytes)
        host = held["total_bytes"]
        if self.on_gpu:  # the host tier after the GPU's budget
            host = min(held["weights_bytes"], (native["cpu_memory_mb"] or 0) * 2**20)
        return self._needs(host, held["total_bytes"])

    def native_timing(self) -> dict[str, int]:
        """The whole model; loaded on the host first, also when it then moves to a GPU."""
        whole = res.native_bytes(self.text, self.dtype, self.seq_len, towers_bytes=self.towers_bytes)["total_bytes"]
        return self._needs(whole, whole)

    def depth(self, depth: int, bits: int = 16) -> dict[str, int]:
        """dense + capacity x expert + KV (+ pinned host staging on a GPU); unified memory: every expert,
        in host RAM. bits 8 or 4: the experts as the quantized files hold them."""
        cache = self.config["cache"]
        unified = cache["unified_memory"]
        expert = None
        if bits != 16:
            expert = res.quantized_expert_bytes(self.text, bits, self.config["quantize"]["group_size"])
        need = res.depth_bytes(self.text, depth, cache["capacity"], cache["scope"], self.dtype, self.seq_len,
                               pinned_staging=self.on_gpu and cache["pin_memory"] and not unified,
                               unified=unified, expert_bytes=expert)
        host = device = need["total_bytes"] + self.depth_towers_bytes  # the towers run where the model runs
        if self.on_gpu:  # the dense file (and towers file) pass through the host; the staging buffers stay there
            host = need["dense_bytes"] + need["host_staging_bytes"] + self.depth_towers_bytes
            if unified:  # the GPU reads the experts in host RAM
                host += need["expert_cache_bytes"]
                device -= need["expert_cache_bytes"]
        return self._needs(host, device)

    def needs(self, rule: str, wildcards: dict) -> dict[str, int]:
        """The memory a job of `rule` declares; {} for a rule that declares none of its own."""
        if rule in ("extract_layer", "extract_dense", "quantize_layer"):
            return {"mem_mb": self.extract_mem_mb(rule)}
        if rule == "generate_native_reference":
            return self.native_reference()
        if rule == "generate_native_timing":
            return self.native_timing()
        if rule == "generate_depth":
            return self.depth(int(wildcards["depth"]))
        if rule == "generate_depth_quantized":
            return self.depth(int(wildcards["depth"]), widest_bits(wildcards["scheme"]))
        return {}

    # -- the checks that stop a plan --------------------------------------------------------------------

    def unfit(self, rule: str, wildcards: dict) -> str | None:
        """The one line saying a job needs more memory (or GPU memory) than the machine or a node has."""
        if rule not in HINTS and rule not in ("generate_depth", "generate_depth_quantized"):
            return None
        label, hint = rule, HINTS.get(rule)
        if rule in ("generate_depth", "generate_depth_quantized"):
            label = f"{rule} (depth {wildcards['depth']})"
            hint = "set cache.unified_memory: false" if self.config["cache"]["unified_memory"] else "lower cache.capacity"
        for name, need_mb in self.needs(rule, wildcards).items():
            have_mb = self.machine.mem_mb if name == "mem_mb" else self.machine.gpu_mem_mb
            what, holder = (("memory", self.machine.holder) if name == "mem_mb"
                            else ("GPU memory", f"the GPU ({self.device})" if not self.machine.cluster
                                  else "a node's GPU"))
            line = res.fits_line(label, need_mb, have_mb, hint, what, holder) if have_mb else None
            if line:
                return line
        return None

    def disk_line(self, rules: list[str], free_bytes: int, where: str) -> str | None:
        """The extractions the plan runs, plus resources.disk_headroom_mb, against the free disk."""
        sizes = {"extract_layer": self.layer_bytes, "extract_dense": self.dense_bytes,
                 # at most: every expert at the widest bits of the scheme (the hot ones')
                 "quantize_layer": self.layer_bytes * widest_bits(quant_scheme(self.config.get("quantize", {}))) // 16}
        writes = sum(sizes.get(rule, 0) for rule in rules)
        if not writes:
            return None
        need = writes + self.config["resources"]["disk_headroom_mb"] * 2**20
        if free_bytes >= need:
            return None
        return (f"error: not enough disk for the extracted experts ({format_bytes(writes)}) plus "
                f"resources.disk_headroom_mb under {where}: needs {format_bytes(need)}, "
                f"{format_bytes(free_bytes)} free")

    def refusal(self, jobs: list[tuple[str, dict]], free_bytes: int, where: str = ".") -> str | None:
        """The first line that stops the plan of `jobs` (rule, wildcards: those that will run), or None."""
        for rule, wildcards in jobs:
            line = self.unfit(rule, wildcards)
            if line:
                return line
        return self.disk_line([rule for rule, _ in jobs], free_bytes, where)
