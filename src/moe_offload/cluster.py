"""Slurm housekeeping the executor plugin leaves to us: cancel the jobs of a client that died, and say
in one line per failed job why it failed.

The plugin names every job it submits by its run id ("SLURM run ID: ..." in the client's log under
.snakemake/log/) and cancels them on Ctrl-C, but a client killed with kill -9 (or a lost login session)
leaves them running. A rerun would then submit the same jobs again, and two jobs would write one
output. `python -m moe_offload.cluster cancel-orphans` cancels them first:

    python -m moe_offload.cluster cancel-orphans   # in the workflow directory
    snakemake --unlock
    snakemake --workflow-profile profiles/slurm results/compare.json

When a run fails, the Snakefile's `onerror:` hook prints `failure_lines(log)`: each failed Slurm job's
end state from sacct (the plugin's squeue status command cannot give a reason), the rule that failed
inside it (a group job runs several), and that rule's own error line; and each job sbatch refused.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from moe_offload.errors import InputError

RUN_ID_LINE = re.compile(r"SLURM run ID: (\S+)")
# squeue states of a job that may still run and write
ACTIVE_STATES = "PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED,REQUEUED,RESIZING,STOPPED,SIGNALING"


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    run_id: str
    state: str
    workdir: str


def run_ids(workdir: Path) -> set[str]:
    """Run ids of every Slurm client Snakemake logged in this workflow directory."""
    ids = set()
    for log in (workdir / ".snakemake" / "log").glob("*.snakemake.log"):
        ids.update(RUN_ID_LINE.findall(log.read_text(errors="replace")))
    return ids


def _squeue(*args: str) -> str:
    try:
        proc = subprocess.run(["squeue", *args], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise InputError("squeue not found: run this on a machine that can reach the Slurm cluster") from None
    if proc.returncode != 0:
        raise InputError(f"squeue failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def active_jobs(workdir: Path) -> list[SlurmJob]:
    """This user's queued or running jobs that a Snakemake client of this directory submitted."""
    ids = run_ids(workdir)
    if not ids:
        return []
    out = _squeue("--me", "--noheader", f"--states={ACTIVE_STATES}", "--format=%i|%j|%T|%Z")
    jobs = []
    for line in out.splitlines():
        job_id, name, state, job_dir = line.split("|", 3)
        # the plugin passes `sbatch -D <workflow dir>`; the name alone could be another directory's run
        if name in ids and Path(job_dir).resolve() == workdir:
            jobs.append(SlurmJob(job_id, name, state, job_dir))
    return jobs


def live_clients(workdir: Path) -> list[int]:
    """PIDs of Snakemake clients running in this directory on this machine (not the jobs' own
    Snakemake processes, which run with --mode remote)."""
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        cmdline = proc.info["cmdline"] or []
        # `snakemake ...` (python /venv/bin/snakemake) or `python -m snakemake ...`; a job's script
        # (python .snakemake/scripts/tmp....py) is not a client
        if "snakemake" not in [Path(part).name for part in cmdline[:2]] and cmdline[1:3] != ["-m", "snakemake"]:
            continue
        if any(part.startswith("--mode") or part == "--unlock" for part in cmdline):
            continue
        if proc.info["cwd"] and Path(proc.info["cwd"]).resolve() == workdir:
            pids.append(proc.info["pid"])
    return pids


def cancel_orphans(workdir: str | Path = ".", timeout_s: float = 60) -> list[SlurmJob]:
    """Cancel the jobs left by dead clients of this workflow directory and wait until Slurm has ended
    them. Refuses while a client still runs here: its jobs are not orphans."""
    workdir = Path(workdir).resolve()
    clients = live_clients(workdir)
    if clients:
        raise InputError(
            f"a Snakemake client (pid {', '.join(map(str, clients))}) still runs in {workdir}: "
            "stop it with Ctrl-C, which cancels its own jobs"
        )
    orphans = active_jobs(workdir)
    if not orphans:
        return []
    proc = subprocess.run(["scancel", *(job.job_id for job in orphans)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise InputError(f"scancel failed: {proc.stderr.strip() or proc.returncode}")
    deadline = time.monotonic() + timeout_s
    while active_jobs(workdir):
        if time.monotonic() > deadline:
            raise InputError(f"jobs still active {timeout_s:.0f} s after scancel: "
                             + ", ".join(job.job_id for job in active_jobs(workdir)))
        time.sleep(0.5)
    return orphans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_offload.cluster", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cancel = commands.add_parser("cancel-orphans", help="cancel the Slurm jobs of dead clients of a workflow directory")
    cancel.add_argument("--directory", "-d", default=".", help="the workflow directory (default: here)")
    args = parser.parse_args(argv)
    try:
        cancelled = cancel_orphans(args.directory)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if cancelled:
        for job in cancelled:
            print(f"cancelled Slurm job {job.job_id} ({job.state}, run {job.run_id})")
    else:
        print("no orphaned Slurm jobs")
    return 0


# in a failed job's block of the client log: "    log: logs/x.log, /wd/.snakemake/slurm_logs/rule_x/12.log ..."
FAILED_JOB_LOG = re.compile(r"^\s+log: .*?(\S*\.snakemake/slurm_logs/\S*?(\d+)\.log)", re.M)
SBATCH_REFUSED = re.compile(r"^Error in rule (\S+):\n\s+message: SLURM sbatch failed\. The error message was '(.*?)'\.$",
                            re.M | re.S)
RULE_ERROR = re.compile(r"^Error in rule (\S+):\n(?:\s+\w+: .*\n)*?\s+log: (\S+)", re.M)
# our steps' one-line errors, or the last line of a Python traceback ("MemoryError: ...")
ERROR_LINE = re.compile(r"^(?:error: (.+)|([\w.]*(?:Error|Exception): .+))$", re.M)
END_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
              "BOOT_FAIL", "DEADLINE")


def _last_error(text: str) -> str | None:
    found = ERROR_LINE.findall(text)
    return (found[-1][0] or found[-1][1]) if found else None


def _sacct_row(job_id: str, timeout_s: float) -> dict[str, str]:
    """The job's accounting row, waiting for slurmdbd to record its end (it lags the controller)."""
    fields = ["State", "ExitCode", "ReqMem", "Timelimit"]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            proc = subprocess.run(["sacct", "-X", "--parsable2", "--noheader", "-j", job_id,
                                   f"--format={','.join(fields)}"], capture_output=True, text=True, timeout=30)
        except (FileNotFoundError, subprocess.TimeoutExpired) as err:
            return {"State": f"state unknown (sacct: {type(err).__name__})"}
        rows = proc.stdout.strip().splitlines()
        row = dict(zip(fields, rows[0].split("|"))) if proc.returncode == 0 and rows else {}
        if row.get("State", "").startswith(END_STATES) or time.monotonic() > deadline:
            return row or {"State": f"state unknown (sacct: {proc.stderr.strip() or 'no record'})"}
        time.sleep(0.5)


def _job_failure(job_id: str, slurm_log: Path, workdir: Path, timeout_s: float) -> str:
    row = _sacct_row(job_id, timeout_s)
    state = row["State"]
    line = f"error: Slurm job {job_id} {state}"
    if row.get("ExitCode", "0:0") != "0:0":
        line += f" (exit {row['ExitCode'].split(':')[0]})"
    if state.startswith("TIMEOUT"):
        line += f" at its time limit {row.get('Timelimit')} (raise runtime in the profile's set-resources)"
    elif state.startswith("OUT_OF_MEMORY"):
        line += f" at its memory limit {row.get('ReqMem')} (raise mem_mb in the profile's set-resources)"
    text = slurm_log.read_text(errors="replace") if slurm_log.is_file() else ""
    # the first rule that failed inside the job (a group job runs several; the rest never started or
    # are reported failed with it)
    rule = RULE_ERROR.search(text)
    if rule:
        line += f" in rule {rule.group(1)} (log {rule.group(2)})"
        rule_log = workdir / rule.group(2)
        cause = _last_error(rule_log.read_text(errors="replace")) if rule_log.is_file() else None
        cause = cause or _last_error(text[:rule.start()])
    else:
        cause = _last_error(text)
    if cause:
        line += f": {cause}"
    try:
        shown = slurm_log.relative_to(workdir)
    except ValueError:
        shown = slurm_log
    return f"{line}; Slurm log {shown}"


def failure_lines(client_logs: list[str] | str | None, workdir: str | Path = ".", timeout_s: float = 30) -> list[str]:
    """One line per job of a failed Slurm run, from the client's log (Snakemake's `onerror` gets its path):
    the jobs sbatch refused, then the jobs that failed on the cluster. Empty for a run without Slurm."""
    workdir = Path(workdir).resolve()
    paths = [client_logs] if isinstance(client_logs, str) else list(client_logs or [])
    text = "".join(Path(p).read_text(errors="replace") for p in paths if Path(p).is_file())
    if not RUN_ID_LINE.search(text):
        return []
    lines = []
    for rule, message in SBATCH_REFUSED.findall(text):
        reason = message.strip().splitlines()[0].removeprefix("sbatch: error: ")
        lines.append(f"error: sbatch refused rule {rule}'s job: {reason}")
    failed = dict((job_id, Path(path)) for path, job_id in FAILED_JOB_LOG.findall(text))
    for job_id, slurm_log in failed.items():
        lines.append(_job_failure(job_id, slurm_log if slurm_log.is_absolute() else workdir / slurm_log, workdir,
                                  timeout_s))
    return lines


if __name__ == "__main__":
    sys.exit(main())
