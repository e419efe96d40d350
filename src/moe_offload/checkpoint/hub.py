"""The Hugging Face hub's side of a `hf` source that planning needs: config.json and the index, kept in a
folder that every plan reads (the rule hub_metadata fetches them)."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .shards import INDEX_NAME

HUB_METADATA = ("config.json", INDEX_NAME)


def hub_metadata_dir(model_cfg: dict, root: str | Path = "results/model/hub") -> Path:
    """Where a hub repo's config and index are kept, one folder per repo and revision."""
    return Path(root) / f"{model_cfg['repo_id'].replace('/', '--')}@{model_cfg.get('revision') or 'main'}"


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
