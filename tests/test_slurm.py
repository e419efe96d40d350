"""The workflow on a real single-node Slurm cluster, through profiles/slurm as the README says to use it.

.ci/slurm/setup.sh installs (apt-get) and starts munge, MariaDB + slurmdbd, slurmctld and slurmd with one
fake GPU; stop.sh stops them by PID. It needs root: elsewhere these tests fail, they do not skip.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from moe_offload import cluster, resources as res

from conftest import REPO, SMALL, copy_workflow, error_lines, set_config

NODE_CPUS = os.cpu_count()
# the plugin's first status check after 2 s instead of 40 (the cluster's MinJobAge keeps squeue usable)
CLIENT = [sys.executable, "-m", "snakemake", "--workflow-profile", "profiles/slurm",
          "--slurm-init-seconds-before-status-checks", "2"]


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    stop = ["bash", str(REPO / ".ci/slurm/stop.sh"), str(state)]
    start = subprocess.run(["bash", str(REPO / ".ci/slurm/setup.sh"), str(state)], capture_output=True, text=True,
                           timeout=900)
    if start.returncode != 0:
        subprocess.run(stop, capture_output=True, timeout=120)
        pytest.fail(f"the Slurm test cluster did not start: {start.stderr.strip()[-3000:]}")
    pids = [int(line.split()[1]) for line in (state / "pids").read_text().splitlines()]
    yield state
    subprocess.run(stop, check=True, timeout=120)
    running = [pid for pid in pids if _alive(pid)]
    assert not running, f"daemons still running after stop.sh: {running}"
    assert not Path("/etc/slurm/slurm.conf").is_symlink(), "stop.sh left its /etc/slurm/slurm.conf link"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # exited but not reaped: gone


# .ci/slurm/setup.sh gives its node 80% of this machine's memory (RealMemory)
NODE_MEM_MB = int(psutil.virtual_memory().total / 2**20 * 0.8)
HOST_MEM_MB = psutil.virtual_memory().total // 2**20


def slurm_workdir(path: Path, node_mem_mb: int = NODE_MEM_MB) -> Path:
    """A copy of the workflow on a 2-layer synthetic model, with the profile edited as the README says:
    account and partition set, cores = the node's CPUs, node_mem_mb = the node's memory."""
    copy_workflow(path)
    set_config(path, model={"source": "synthetic", "synthetic": {**SMALL, "num_layers": 2, "layout": "qwen3_omni_thinker"}},
               generate={"prompts": ["The capital of France is"], "max_new_tokens": 4, "depths": []})
    profile = path / "profiles/slurm/config.yaml"
    text = profile.read_text()
    for old, new in [("  # slurm_account: my_account", "  slurm_account: moe"),
                     ("  # slurm_partition: my_partition", "  slurm_partition: debug"),
                     ("cores: 32", f"cores: {NODE_CPUS}"), ("  node_mem_mb: 256000", f"  node_mem_mb: {node_mem_mb}")]:
        assert old in text, f"profiles/slurm/config.yaml no longer has {old!r}: update the README and this test"
        text = text.replace(old, new)
    profile.write_text(text)
    return path


@pytest.fixture(scope="module")
def workdir(slurm_cluster, tmp_path_factory) -> Path:
    return slurm_workdir(tmp_path_factory.mktemp("slurm-run") / "wf")


def start_client(workdir: Path, *args: str) -> subprocess.Popen:
    log_path = workdir / f"client-{time.monotonic_ns()}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*CLIENT, *args], cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc.log_path = log_path
    return proc


def client_output(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()


def wait_for_running_job(workdir: Path, proc: subprocess.Popen, timeout: float = 180) -> cluster.SlurmJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"client exited early:\n{client_output(proc)[-3000:]}"
        running = [job for job in cluster.active_jobs(workdir) if job.state == "RUNNING"]
        if running:
            return running[0]
        time.sleep(0.3)
    raise AssertionError(f"no job of this workflow ran within {timeout} s:\n{client_output(proc)[-3000:]}")


def sacct(*args: str) -> list[dict]:
    fields = ["JobID", "JobName", "Comment", "State", "Start", "End", "ReqMem", "AllocCPUS", "AllocTRES", "WorkDir"]
    out = subprocess.run(["sacct", "-X", "--parsable2", "--noheader", f"--format={','.join(fields)}", *args],
                         capture_output=True, text=True, check=True).stdout
    return [dict(zip(fields, row)) for row in csv.reader(out.splitlines(), delimiter="|")]


def jobs_of(workdir: Path) -> list[dict]:
    """Every Slurm job any client of this workflow directory submitted, from the accounting database."""
    rows = sacct("--starttime=now-1days", f"--name={','.join(cluster.run_ids(workdir))}")
    return [row for row in rows if Path(row["WorkDir"]).resolve() == workdir.resolve()]


def test_cancel_orphans_reads_run_ids_and_fails_in_one_line_without_squeue(tmp_path):
    log_dir = tmp_path / ".snakemake/log"
    log_dir.mkdir(parents=True)
    (log_dir / "2026-01-01T000000.snakemake.log").write_text("Building DAG\nSLURM run ID: 1f2e-3d\n")
    (log_dir / "2026-01-02T000000.snakemake.log").write_text("SLURM run ID: prefix_9a8b\nFinished\n")
    assert cluster.run_ids(tmp_path) == {"1f2e-3d", "prefix_9a8b"}
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # python, but no Slurm commands
    proc = subprocess.run([sys.executable, "-m", "moe_offload.cluster", "cancel-orphans", "-d", str(tmp_path)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["error: squeue not found: run this on a machine that can reach the Slurm cluster"]


def final_state(workdir: Path, job_id: str, timeout: float = 60) -> str:
    """The job's end state in the accounting database (slurmctld reports to slurmdbd with a short lag)."""
    deadline = time.monotonic() + timeout
    while True:
        states = [row["State"] for row in jobs_of(workdir) if row["JobID"] == job_id]
        if states and states[0] not in ("PENDING", "RUNNING", "COMPLETING"):
            return states[0]
        assert time.monotonic() < deadline, f"job {job_id} has no end state in sacct after {timeout} s: {states}"
        time.sleep(0.5)


@pytest.mark.slow
def test_scancel_fails_the_job_and_the_client(workdir):
    client = start_client(workdir, "results/compare.json")
    job = wait_for_running_job(workdir, client)
    subprocess.run(["scancel", job.job_id], check=True)
    assert client.wait(timeout=180) != 0, "the client must fail the cancelled job, not wait for it"
    out = client_output(client)
    # the plugin's own line for a single job, or the job's log for a group job ("... CANCELLED AT ...")
    assert "CANCELLED" in out and job.job_id in out, out[-3000:]
    assert final_state(workdir, job.job_id).startswith("CANCELLED")
    # the onerror hook's line, with the state from sacct
    assert any(line.startswith(f"error: Slurm job {job.job_id} CANCELLED") for line in out.splitlines()), out[-3000:]


@pytest.mark.slow
def test_a_failed_run_says_why_in_one_line_per_job(slurm_cluster, tmp_path):
    """A group job whose second layer fails validation, a single job that dies with a traceback, and a
    job sbatch refuses: one line each, naming the rule that failed, its error and its logs."""
    wd = slurm_workdir(tmp_path / "wf")
    script = wd / "workflow/scripts/validate_layer.py"
    script.write_text("import sys\nif snakemake.wildcards.layer == '1':\n"
                      "    sys.exit('error: layer 1 checksum mismatch (injected)')\n" + script.read_text())
    script = wd / "workflow/scripts/generate_native_reference.py"
    script.write_text("raise MemoryError('injected')\n" + script.read_text())
    profile = wd / "profiles/slurm/config.yaml"
    profile.write_text(profile.read_text().replace(
        "set-resources:\n", "set-resources:\n  generate_native_timing:\n    slurm_partition: nope\n", 1))

    proc = subprocess.run([*CLIENT, "results/compare.json"], cwd=wd, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    lines = [line for line in error_lines(proc) if "Slurm job" in line or "sbatch refused" in line]
    out = proc.stdout + proc.stderr
    assert len(lines) == 3, out[-4000:]
    assert "error: sbatch refused rule generate_native_timing's job: invalid partition specified: nope" in lines
    group = next(line for line in lines if "group_layers" in line)
    assert re.fullmatch(r"error: Slurm job \d+ FAILED \(exit 1\) in rule validate_layer \(log logs/validate/layer_1.log\): "
                        r"layer 1 checksum mismatch \(injected\); Slurm log \.snakemake/slurm_logs/group_layers\S*/\d+\.log",
                        group), group
    native = next(line for line in lines if "generate_native_reference" in line)
    assert re.fullmatch(r"error: Slurm job \d+ FAILED \(exit 1\) in rule generate_native_reference "
                        r"\(log logs/generate/native_reference.log\): MemoryError: injected; "
                        r"Slurm log \.snakemake/slurm_logs/rule_generate_native_reference/\d+\.log", native), native
    # printed last, above Snakemake's closing lines
    tail = out.splitlines()[-8:]
    assert all(line in tail for line in lines), tail


@pytest.mark.slow
def test_orphans_of_a_killed_client_are_cancelled_before_the_rerun(workdir):
    assert subprocess.run([*CLIENT, "--unlock"], cwd=workdir, capture_output=True).returncode == 0
    client = start_client(workdir, "results/compare.json")
    job = wait_for_running_job(workdir, client)
    with pytest.raises(cluster.InputError, match=f"client \\(pid {client.pid}\\) still runs"):
        cluster.cancel_orphans(workdir)  # a live client's jobs are not orphans
    os.killpg(client.pid, signal.SIGKILL)
    client.wait()
    time.sleep(2)
    assert job.job_id in {j.job_id for j in cluster.active_jobs(workdir)}, "kill -9 of the client leaves its job running"

    proc = subprocess.run([sys.executable, "-m", "moe_offload.cluster", "cancel-orphans"], cwd=workdir,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"cancelled Slurm job {job.job_id}" in proc.stdout
    assert cluster.active_jobs(workdir) == []
    assert final_state(workdir, job.job_id).startswith("CANCELLED")
    again = subprocess.run([sys.executable, "-m", "moe_offload.cluster", "cancel-orphans"], cwd=workdir,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.strip() == "no orphaned Slurm jobs"


@pytest.mark.slow
def test_workflow_runs_to_compare_through_sbatch(workdir):
    assert subprocess.run([*CLIENT, "--unlock"], cwd=workdir, capture_output=True).returncode == 0
    # forced in the plan only, to read the mem_mb the rule declares (the runs above may have finished it)
    plan = subprocess.run([*CLIENT, "-n", "--forcerun", "generate_native_reference", "results/compare.json"],
                          cwd=workdir, capture_output=True, text=True)
    native_mem_mb = int(re.search(r"rule generate_native_reference:.*?mem_mb=(\d+)", plan.stdout, re.S).group(1))
    rule_jobs = int(re.search(r"^total\s+(\d+)$", plan.stdout, re.M).group(1))

    done = subprocess.run([*CLIENT, "results/compare.json"], cwd=workdir, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads((workdir / "results/compare.json").read_text())
    assert report["parity"]["tokens_identical"] and report["parity"]["max_abs_logit_diff"] <= 1e-4
    assert report["model"]["extraction_valid"]

    run_id = re.search(r"SLURM run ID: (\S+)", done.stdout + done.stderr).group(1)
    this_run = [row for row in jobs_of(workdir) if row["JobName"] == run_id]
    assert all(row["State"] == "COMPLETED" for row in this_run), this_run
    comments = sorted(row["Comment"] for row in this_run)
    # grouped: fewer sbatch jobs than rule jobs (download runs on the submit host, a local rule; extract +
    # validate of the layers and the dense file in one job, the summary steps in one); which rule jobs
    # are left for this run depends on what the cancelled runs above finished
    assert "rule_generate_depth_wildcards_2" in comments, comments
    assert all(c.startswith(("rule_generate_", "rule_layers_", "rule_summary_")) for c in comments), comments
    assert len(this_run) < rule_jobs, (comments, rule_jobs)
    layers = next((row for row in this_run if row["Comment"].startswith("rule_layers_")), None)
    if layers is not None:  # 3 extract+validate chains in parallel (2 layers, dense), capped at the node's cores
        assert int(layers["AllocCPUS"]) == min(3, NODE_CPUS)
    native = next(row for row in jobs_of(workdir)
                  if row["Comment"] == "rule_generate_native_reference" and row["State"] == "COMPLETED")
    assert native["ReqMem"] == f"{native_mem_mb}M", "the rule's own mem_mb must reach sbatch --mem"

    # two jobs never wrote one output: per rule and wildcards, no two jobs of any run overlapped in time
    by_comment: dict[str, list[tuple[str, str]]] = {}
    for row in jobs_of(workdir):
        if row["Start"] not in ("Unknown", "None"):
            by_comment.setdefault(row["Comment"], []).append((row["Start"], row["End"]))
    for comment, spans in by_comment.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end <= start, f"two {comment} jobs ran at once: {spans}"
    # the tests before this one: a cancelled job and an orphaned-then-cancelled one, besides this run's
    assert sum(len(spans) for spans in by_comment.values()) >= len(this_run) + 2


@pytest.mark.slow
def test_set_resources_beyond_the_client_machine_reach_sbatch_unchanged(workdir):
    """The client's machine caps nothing: a --mem larger than the host (and the node) reaches sbatch
    as given, and Slurm, which knows its nodes, is the one to refuse it."""
    assert subprocess.run([*CLIENT, "--unlock"], cwd=workdir, capture_output=True).returncode == 0
    mem_mb = 4 * HOST_MEM_MB
    # the target first: --forcerun and --set-resources take every argument up to the next option
    proc = subprocess.run([*CLIENT, "--verbose", "results/generate/native_reference.json", "--forcerun",
                           "generate_native_reference", "--set-resources",
                           f"generate_native_reference:mem_mb={mem_mb}"], cwd=workdir, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    call = re.search(r"sbatch call: .*--comment rule_generate_native_reference .*", out)
    assert call, out[-3000:]
    assert re.search(rf"--mem {mem_mb}\b", call.group(0)), call.group(0)
    assert proc.returncode != 0  # more than the node has: sbatch refuses it
    assert "error: sbatch refused rule generate_native_reference's job: Memory specification can not be satisfied" \
        in error_lines(proc), out[-3000:]


def real_size_plan(tmp_path: Path, node_mem_mb: int, *args: str, env: dict | None = None):
    """A dry run through profiles/slurm of the real Qwen3-Omni thinker (48 layers x 128 experts at real
    dims, a skeleton checkpoint: tensor headers, no data), native timing on, in float32 on the CPU."""
    from test_real_scale import build_skeleton

    skeleton = tmp_path / "Qwen3-Omni-30B-A3B-Instruct"
    if not skeleton.exists():
        build_skeleton(skeleton)
    wd = tmp_path / f"wf-{node_mem_mb}"
    if not wd.exists():
        slurm_workdir(wd, node_mem_mb)
    set_config(wd, model={"source": "local", "path": str(skeleton)},
               generate={"depths": [8, 48], "device": "cpu", "dtype": "float32", "max_new_tokens": 32},
               native={"timing": True})
    return subprocess.run([*CLIENT, "-n", *args, "results/compare.json"], cwd=wd, capture_output=True, text=True,
                          timeout=600, env=env)


def test_a_real_size_model_plans_through_the_profile_on_a_small_machine(tmp_path):
    """No cluster needed: a dry run. The jobs are sized by the nodes the profile states, never by this
    machine (whose memory is below the float32 model's 114 GiB here), and nvidia-smi is never asked."""
    from moe_offload.checkpoint.layouts import detect_checkpoint

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    asked = tmp_path / "nvidia-smi-was-asked"
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\ntouch {asked}\necho '0, 1024'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    # The plan also checks the disk for the 61 GB of extracted experts: as a cluster's shared filesystem
    # would, the fake gives it 1 TiB more than this machine has free (a CI machine may have less than 62 GB)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import shutil\n_usage = shutil.disk_usage\n"
        "def disk_usage(path):\n    u = _usage(path)\n    return type(u)(u.total + 2**40, u.used, u.free + 2**40)\n"
        "shutil.disk_usage = disk_usage\n")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}

    plan = real_size_plan(tmp_path, 256000, env=env)
    assert plan.returncode == 0, (plan.stdout + plan.stderr)[-3000:]
    _, cfg = detect_checkpoint(tmp_path / "Qwen3-Omni-30B-A3B-Instruct")
    seq = len(b"The capital of France is") + 32  # slurm_workdir's one prompt
    thinker = json.loads((tmp_path / "Qwen3-Omni-30B-A3B-Instruct/config.json").read_text())["thinker_config"]
    towers = res.tower_params(thinker) * 4  # the native thinker holds its towers too, in float32
    whole = res.to_mb(res.native_bytes(cfg, "float32", seq, towers_bytes=towers)["total_bytes"], 1024)
    timing = plan.stdout.split("rule generate_native_timing:", 1)[1].split("\n\n", 1)[0]
    assert f"mem_mb={whole}," in timing, timing  # the rule's figure, not capped at this machine
    reference = plan.stdout.split("rule generate_native_reference:", 1)[1].split("\n\n", 1)[0]
    budget = res.native_bytes(cfg, "float32", seq, int(0.9 * 256000) * 2**20, towers)["total_bytes"]
    assert f"mem_mb={res.to_mb(budget, 1024)}," in reference, reference  # 0.9 of a node, not of this machine
    stats = plan.stdout.split("Job stats:")[1]
    assert re.search(r"extract_layer\s+48\b", stats) and re.search(r"generate_native_timing\s+1\b", stats)
    assert "Provided resources" not in plan.stdout + plan.stderr
    assert not asked.exists()

    # a node too small for the whole model: one line, nothing after it
    small = real_size_plan(tmp_path, 64000, env=env)
    assert small.returncode != 0
    assert error_lines(small) == [res.fits_line("generate_native_timing", whole, 64000, "set native.timing: false "
                                                "(the reference run offloads and still completes)", "memory",
                                                "a node")]
    assert (small.stdout + small.stderr).rstrip().endswith(error_lines(small)[0])


@pytest.mark.slow
def test_gpu_job_asks_slurm_for_a_gpu(workdir):
    """Last: it reruns native on the workflow above with device cuda (or from scratch when run alone)."""
    set_config(workdir, generate={"device": "cuda"})
    assert subprocess.run([*CLIENT, "--unlock"], cwd=workdir, capture_output=True).returncode == 0
    proc = subprocess.run([*CLIENT, "--verbose", "results/generate/native_reference.json"], cwd=workdir, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    run_id = re.search(r"SLURM run ID: (\S+)", out).group(1)
    calls = {m.group(1): m.group(0) for m in re.finditer(r"sbatch call: .*?--comment rule_(\w+) .*", out)}
    assert "generate_native_reference" in calls, out[-3000:]
    assert " --gpus=1" in calls.pop("generate_native_reference")
    assert not any("--gpus" in call for call in calls.values())  # download, if it ran: no GPU
    native = next(row for row in jobs_of(workdir) if row["JobName"] == run_id and row["Comment"] == "rule_generate_native_reference")
    assert "gres/gpu=1" in native["AllocTRES"], native  # Slurm scheduled the (fake) GPU
