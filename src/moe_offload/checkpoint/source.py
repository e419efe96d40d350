"""Getting the checkpoint (embedded, synthetic, local or Hugging Face hub) and describing it in a manifest."""

from __future__ import annotations

import json
from pathlib import Path

from .shards import INDEX_NAME, Checkpoint, read_header
from ..errors import InputError
from .layouts import (Layout, TextConfig, detect, detect_checkpoint, layout_by_name, read_config,
                      text_config_from_dict)
from ..hashing import hash_file
from .hub import hub_file, hub_metadata_dir, missing_metadata

# Files besides weight shards that a text run needs from a hub repo.
HUB_SIDE_FILES = ["config.json", "generation_config.json", INDEX_NAME, "tokenizer*", "vocab.json", "merges.txt",
                  "special_tokens_map.json", "chat_template*"]
# The trained default shipped with the repository (training/train_default.py), used in place; relative
# to the project directory Snakemake runs in.
EMBEDDED_DIR = Path("models/default")


def embedded_dir() -> Path:
    if not (EMBEDDED_DIR / "config.json").is_file():
        raise InputError(f"model.source embedded: {EMBEDDED_DIR}/config.json not found (the trained default ships "
                         "with the repository; training/README.md says how to make it), or use source: synthetic")
    return EMBEDDED_DIR


def planned_text_config(model_cfg: dict) -> tuple[Layout, TextConfig]:
    """Layout and dimensions known before anything is built or fetched, so the DAG has every layer.
    For the hub: read from the metadata the rule hub_metadata keeps under results/model/hub, never
    fetched here (planning needs no network)."""
    source = model_cfg["source"]
    if source == "synthetic":
        from .synthetic import text_config

        spec = model_cfg["synthetic"]
        return layout_by_name(spec["layout"]), text_config_from_dict(text_config(spec))
    if source == "local":
        return detect_checkpoint(model_cfg["path"])
    if source == "embedded":
        return detect_checkpoint(embedded_dir())
    missing = missing_metadata(model_cfg)
    if missing:
        raise InputError(missing)
    return detect(json.loads((hub_metadata_dir(model_cfg) / "config.json").read_text()))


def planned_thinker(model_cfg: dict) -> dict | None:
    """config.json's thinker_config where it is known before anything is built or fetched (its towers'
    dims); None for a synthetic build (towers of a few hundred KB) or a text-only model."""
    source = model_cfg["source"]
    if source == "synthetic":
        return None
    if source == "hf":
        path = hub_metadata_dir(model_cfg) / "config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
    else:
        config = read_config(model_cfg["path"] if source == "local" else embedded_dir())
    return config.get("thinker_config")


def hub_patterns(config: dict, weight_map: dict[str, str]) -> list[str]:
    """The side files plus only the shards holding tensors that the native text model loads (for
    Qwen3-Omni: the thinker's, not the talker's or code2wav's)."""
    layout, _ = detect(config)
    return HUB_SIDE_FILES + sorted({shard for name, shard in weight_map.items() if name.startswith(layout.native)})


def hub_download_bytes(model_cfg: dict, patterns: list[str]) -> int | None:
    """Bytes the weight shards matching `patterns` still to download take (the hub's file listing, less
    what the local cache holds), or None where the hub cannot say (offline: then only a complete local
    cache can serve the download anyway)."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    repo, revision, cache_dir = model_cfg["repo_id"], model_cfg.get("revision"), model_cfg.get("cache_dir")
    shards = [p for p in patterns if p.endswith(".safetensors")]
    missing = [s for s in shards if not isinstance(try_to_load_from_cache(repo, s, cache_dir, revision), str)]
    if not missing:
        return 0
    try:
        infos = HfApi().get_paths_info(repo, missing, revision=revision)
    except Exception:  # offline or unreachable: the hub client raises many types
        return None
    return sum(getattr(info, "size", 0) or 0 for info in infos)


def fetch_hub(model_cfg: dict, metadata_dir: str | Path | None = None) -> Path:
    """Download (resumably) only the shards holding tensors the text model or native baseline needs,
    after checking the disk can take them."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    from ..disk import check_disk

    if metadata_dir is not None and (Path(metadata_dir) / INDEX_NAME).is_file():
        config = json.loads((Path(metadata_dir) / "config.json").read_text())
        weight_map = json.loads((Path(metadata_dir) / INDEX_NAME).read_text())["weight_map"]
    else:
        config = json.loads(Path(hub_file(model_cfg, "config.json")).read_text())
        weight_map = json.loads(Path(hub_file(model_cfg, INDEX_NAME)).read_text())["weight_map"]
    patterns = hub_patterns(config, weight_map)
    need = hub_download_bytes(model_cfg, patterns)
    if need:
        check_disk(model_cfg.get("cache_dir") or HF_HUB_CACHE, need, f"the download of {model_cfg['repo_id']}")
    try:
        path = snapshot_download(model_cfg["repo_id"], revision=model_cfg.get("revision"),
                                 cache_dir=model_cfg.get("cache_dir"), allow_patterns=patterns)
    except Exception as err:
        raise InputError(f"could not download {model_cfg['repo_id']}: {type(err).__name__}: {err}") from None
    return Path(path)


def obtain(model_cfg: dict, synthetic_dir: str | Path, metadata_dir: str | Path | None = None) -> Path:
    source = model_cfg["source"]
    if source == "synthetic":
        from .synthetic import build_synthetic

        return build_synthetic(synthetic_dir, model_cfg["synthetic"])
    if source == "local":
        return Path(model_cfg["path"])
    if source == "embedded":
        return embedded_dir()
    if source == "hf":
        return fetch_hub(model_cfg, metadata_dir)
    raise InputError(f"model.source {source!r} is not one of embedded, synthetic, local, hf")


def manifest_files(checkpoint_dir: str | Path, ckpt: Checkpoint | None = None) -> list[str]:
    """The files a manifest records, by their names in the checkpoint: every top-level file (config,
    tokenizer, index) and every shard the index names that is present, in subfolders too. A hub download
    fetches only the text model's shards, so absent ones are not an error here; one that is read later
    and absent says so then."""
    checkpoint_dir = Path(checkpoint_dir)
    ckpt = ckpt or Checkpoint(checkpoint_dir)
    top = {p.name for p in checkpoint_dir.iterdir() if p.is_file() and not p.name.startswith(".")}
    shards = {name for name in ckpt.shard_names if ckpt.shard_path(name).is_file()}
    return sorted(top | shards)


def build_manifest(checkpoint_dir: str | Path, source: dict, progress=None) -> dict:
    """Check the checkpoint is whole (every shard's header fits its file, no shard links out of it) and
    record the hash of every file manifest_files names."""
    checkpoint_dir = Path(checkpoint_dir)
    layout, cfg = detect_checkpoint(checkpoint_dir)
    ckpt = Checkpoint(checkpoint_dir)
    if not cfg.expert_layers or not any(".mlp.experts." in n for n in ckpt.weight_map if layout.in_component(n)):
        raise InputError(f"{checkpoint_dir}: the checkpoint has no experts (layout {layout.name})")
    for shard in ckpt.shard_names:
        path = ckpt.shard_path(shard)  # raises on a symlink out of the checkpoint
        if path.exists():
            read_header(path)  # raises on a truncated shard, a corrupt header, or not a safetensors file
    files, names = [], manifest_files(checkpoint_dir, ckpt)
    if progress is not None:
        progress.reset(total=len(names))
    for name in names:
        path = checkpoint_dir / name
        stat = path.stat()
        files.append({"name": name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "xxh3_128": hash_file(path)})
        if progress is not None:
            progress.update(1)
    return {
        "path": project_path(checkpoint_dir),
        "source": source,
        "layout": layout.name,
        "num_layers": cfg.num_layers,
        "num_experts": cfg.num_experts,
        "experts_per_token": cfg.experts_per_token,
        "expert_layers": cfg.expert_layers,
        "text_config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()},
        "files": files,
    }


def project_path(path: str | Path) -> str:
    """Relative to the project (the working directory) where it is inside it, so moving the project folder
    keeps the manifest true; absolute otherwise."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
