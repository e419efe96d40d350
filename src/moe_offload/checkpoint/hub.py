"""The Hugging Face hub's side of a `hf` source that planning needs: config.json and the index, fetched
once by the local rule hub_metadata into a folder that every plan reads. No plan reaches the hub, so
planning works on a machine without internet (a cluster's compute node) once they are stored."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import InputError
from .shards import INDEX_NAME

HUB_METADATA = ("config.json", INDEX_NAME)


# The hub's own rule for a repo id's two parts (huggingface_hub's validate_repo_id): so none is "." or
# "..", and the folder names built from them stay inside their parent.
REPO_PART = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
# Characters git never allows in a branch or tag name (git check-ref-format), "\" included.
REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")


def check_hub_names(model_cfg: dict) -> None:
    """repo_id and revision name folders (here and in the hub cache): refuse any that could climb out of
    them, such as a revision of ../../../tmp/x, in one line naming the key."""
    repo = model_cfg["repo_id"]
    parts = repo.split("/")
    if len(parts) != 2 or not all(REPO_PART.fullmatch(part) for part in parts):
        raise InputError(f"model.repo_id {repo!r} is not a hub repository id (owner/name: letters, digits, '_', "
                         "'-', '.'; no '--' or '..'; neither part starts or ends with '-' or '.')")
    revision = model_cfg.get("revision") or "main"
    parts = revision.split("/")
    if (REF_FORBIDDEN.search(revision) or revision.startswith("/") or revision.endswith(("/", "."))
            or any(not part or part.startswith(".") or part.endswith(".lock") for part in parts)):
        raise InputError(f"model.revision {revision!r} is not a branch, tag or commit name (no '..', no part "
                         "that starts with '.', no spaces or ~^:?*[\\)")


def hub_metadata_dir(model_cfg: dict, root: str | Path = "results/model/hub") -> Path:
    """Where a hub repo's config and index are kept, one folder per repo and revision (a revision with a
    '/', such as refs/pr/1, in subfolders of it)."""
    check_hub_names(model_cfg)
    return Path(root) / f"{model_cfg['repo_id'].replace('/', '--')}@{model_cfg.get('revision') or 'main'}"


def missing_metadata(model_cfg: dict) -> str | None:
    """For a hub source whose config and index are not stored yet, the one line saying how to get them;
    None otherwise."""
    if model_cfg["source"] != "hf":
        return None
    folder = hub_metadata_dir(model_cfg)
    if all((folder / name).is_file() for name in HUB_METADATA):
        return None
    return (f"model.source hf: the config and index of {model_cfg['repo_id']}@{model_cfg.get('revision') or 'main'} "
            f"are not in {folder} yet; fetch them once where the hub is reachable: snakemake hub_metadata "
            "(then plan again)")


def fetch_hub_metadata(model_cfg: dict, out_dir: str | Path) -> Path:
    """config.json and the index of a hub repo, copied into out_dir (each file written whole)."""
    from ..atomic import atomic_path

    out_dir = Path(out_dir)
    for name in HUB_METADATA:
        data = Path(hub_file(model_cfg, name)).read_bytes()
        with atomic_path(out_dir / name) as tmp:
            tmp.write_bytes(data)
    return out_dir


def hub_file(model_cfg: dict, filename: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(model_cfg["repo_id"], filename, revision=model_cfg.get("revision"),
                               cache_dir=model_cfg.get("cache_dir"))
    except Exception as err:  # the hub client raises many types; all mean "could not get it"
        raise InputError(f"could not get {filename} of {model_cfg['repo_id']}@{model_cfg.get('revision')}: "
                         f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
