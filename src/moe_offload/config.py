"""The workflow's configuration beyond what its JSON schema can say: canonical params (so that key
order never reruns a job), checks that compare one value with another or with the checkpoint, and the
config reference (docs/config.md) written from the schema's descriptions.

`python -m moe_offload.config` prints the reference; `make docs` writes it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from .errors import InputError

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


def canonical(value):
    """The same value with every mapping's keys sorted: Snakemake compares params by their text, so two
    configs that differ only in key order must give the same params."""
    if isinstance(value, dict):
        return {key: canonical(value[key]) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [canonical(item) for item in value]
    return value


def check_integers(value, schema: dict, path: tuple = ()) -> None:
    """JSON Schema's `integer` accepts 32.0, and a float would then reach a job (a crash after hours of
    work) or a file name (depth_8.0.json): every value the schema types as an integer must be one."""
    kind = schema.get("type")
    kinds = set(kind) if isinstance(kind, list) else {kind}
    if "integer" in kinds and "number" not in kinds and isinstance(value, float):
        key = ".".join(map(str, path)) or "(top level)"
        raise InputError(f"invalid config value at {key}: {value!r} is not an integer")
    if isinstance(value, dict):
        for key, item in value.items():
            if key in schema.get("properties", {}):
                check_integers(item, schema["properties"][key], (*path, key))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            check_integers(item, schema["items"], (*path, index))


def check_config(config: dict, text) -> None:
    """Cross-field checks, at parse time, against the checkpoint's dimensions (`text`: a TextConfig)."""
    spec = config["model"].get("synthetic", {})
    if config["model"]["source"] == "synthetic":
        if spec["experts_per_token"] > spec["num_experts"]:
            raise InputError(f"model.synthetic.experts_per_token ({spec['experts_per_token']}) is more than "
                             f"num_experts ({spec['num_experts']})")
        if spec["num_heads"] % spec["num_kv_heads"]:
            raise InputError(f"model.synthetic.num_heads ({spec['num_heads']}) is not divisible by num_kv_heads "
                             f"({spec['num_kv_heads']})")
        outside = [layer for layer in spec["mlp_only_layers"] if layer >= spec["num_layers"]]
        if outside:
            raise InputError(f"model.synthetic.mlp_only_layers names layer {outside[0]}, the model has layers "
                             f"0..{spec['num_layers'] - 1}")
    if not text.expert_layers:
        raise InputError("the model has no layer with experts (mlp_only_layers covers every layer)")
    cache = config["cache"]
    pool = text.num_experts * (len(text.expert_layers) if cache["scope"] == "global" else 1)
    if cache["capacity"] is not None and cache["capacity"] > pool:
        raise InputError(f"cache.capacity ({cache['capacity']}) is more than the {pool} experts a {cache['scope']} "
                         "cache can hold")
    k = text.experts_per_token
    # unified memory holds every expert, whatever the capacity says
    if cache["capacity"] is not None and cache["capacity"] < k and not cache["unified_memory"]:
        raise InputError(f"cache.capacity {cache['capacity']} is below the model's experts_per_token {k}: one token "
                         f"needs {k} experts of a layer at once")
    quant = config.get("quantize", {"bits": 16})
    if quant["bits"] != 16:
        from .checkpoint.quantize import check_hot, check_scheme

        hot = quant.get("hot") or {}
        try:
            check_scheme(quant["bits"], quant["group_size"], {"hidden size": text.hidden_size,
                                                              "expert intermediate size": text.moe_intermediate_size})
            check_hot(quant["bits"], hot.get("bits", 8), hot.get("fraction", 0))
        except InputError as err:
            raise InputError(str(err).replace("quantize ", "quantize.", 1)) from None
    for capacity in config["profile"]["capacities"] or []:
        if capacity > text.num_experts:
            raise InputError(f"profile.capacities holds {capacity}, more than the model's {text.num_experts} experts "
                             "per layer")


def quant_scheme(quant: dict) -> str | None:
    """How config quantize names its experts in paths (results/experts_q{scheme}/): "8", "4", "4h8" (int4,
    the hot experts int8: precision by popularity), or None for 16-bit (nothing quantized)."""
    if quant.get("bits", 16) == 16:
        return None
    hot = quant.get("hot") or {}
    return f"{quant['bits']}h{hot.get('bits', 8)}" if hot.get("fraction") else f"{quant['bits']}"


def parse_scheme(scheme: str) -> tuple[int, int | None]:
    """quant_scheme's name -> (bits, hot bits or None)."""
    bits, _, hot = str(scheme).partition("h")
    return int(bits), int(hot) if hot else None


def widest_bits(scheme: str | None) -> int:
    """The most bits any expert of a scheme takes, which is what a cache slot holds (precision by
    popularity: the hot bits); 16 without quantization."""
    if scheme is None:
        return 16
    bits, hot = parse_scheme(scheme)
    return max(bits, hot or 0)


def prompts_folder(config_files: list, cli_files: list, section: str = "generate", key: str = "prompts") -> Path:
    """The folder a `{file: ...}` prompt (or another file setting: section.key) is relative to: that of the
    config file whose setting is used, i.e. the last --configfile given that sets it (later ones override
    earlier ones and the Snakefile's), else the Snakefile's config file; the working directory where none
    sets it."""
    cli = [Path(f) for f in cli_files]
    rest = [Path(f) for f in config_files if Path(f) not in cli]
    for path in [*reversed(cli), *rest]:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue  # Snakemake has read it already; one it could not read sets nothing here
        if isinstance(loaded, dict) and key in (loaded.get(section) or {}):
            return path.parent
    return Path(".")


def prompt_texts(prompts: list, folder: Path) -> list:
    """generate.prompts as each job generates from them: a string as given, `{file: path}` the UTF-8
    text of that file (path relative to `folder`), less one trailing newline (editors add it; it would be
    a token of the prompt); `{text, audio, image}` with media as {text, audio: [paths], image: [paths]},
    paths relative to `folder`, each file checked from its header (media_files). A file that is missing,
    unreadable, not UTF-8 or empty, or audio at another rate than the model's, stops the plan with one
    line naming it."""
    from .media_files import check_audio, check_image

    texts = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            texts.append(prompt)
            continue
        if "text" in prompt:
            media = {kind: [str(Path(folder) / p) for p in ([prompt[kind]] if isinstance(prompt[kind], str)
                                                            else prompt[kind])]
                     for kind in ("audio", "image") if kind in prompt}
            for kind, check in (("audio", check_audio), ("image", check_image)):
                for path in media.get(kind, []):
                    try:
                        check(path)
                    except InputError as err:
                        raise InputError(f"generate.prompts.{index}: {err}") from None
            texts.append({"text": prompt["text"], "audio": media.get("audio", []), "image": media.get("image", [])}
                         if media else prompt["text"])
            continue
        path = Path(folder) / prompt["file"]
        text = read_text(path, f"generate.prompts.{index}: prompt file {path}")
        texts.append(text.removesuffix("\n").removesuffix("\r"))
    return texts


def read_text(path: Path, where: str) -> str:
    """A config-named file's UTF-8 text; one line naming it (`where`) if it is missing, unreadable, not
    UTF-8 or blank."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"{where} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{where} is a directory, not a file") from None
    except OSError as err:
        raise InputError(f"{where} cannot be read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{where} is not UTF-8 text (byte {err.start})") from None
    if not text.strip():
        raise InputError(f"{where} is empty")
    return text


def heldout_path(heldout: dict | None, folder: Path) -> Path | None:
    """fidelity.heldout's text file (relative to `folder`), checked readable and non-empty; None if unset."""
    if heldout is None:
        return None
    path = Path(folder) / heldout["file"]
    read_text(path, f"fidelity.heldout.file {path}")
    return path


def reference(schema: dict) -> str:
    """Markdown: one table per section, a row per key with its type, default, bounds and description."""
    lines = ["# Configuration reference", "",
             "Generated from `workflow/schemas/config.schema.yaml` by `python -m moe_offload.config`",
             "(`make docs`); do not edit by hand. Values go in `config/config.yaml`.", ""]
    header = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    top = {}
    for section, sub in schema["properties"].items():
        if sub.get("type") != "object":  # a key of its own, not a section: listed after the sections
            top[section] = sub
            continue
        lines += [f"## `{section}`", "", sub.get("description", ""), ""] + header
        lines += _rows(section, sub)
        lines.append("")
    if top:
        lines += ["## Top-level keys", "", "Set by a cluster profile (profiles/slurm), not in config/config.yaml.", ""]
        lines += header + _rows("", {"properties": top}) + [""]
    return "\n".join(lines)


def _rows(prefix: str, node: dict) -> list[str]:
    rows = []
    for key, sub in node.get("properties", {}).items():
        name = f"{prefix}.{key}" if prefix else key
        if sub.get("type") == "object" and "properties" in sub:
            rows.append(f"| `{name}` | object | | | {sub.get('description', '')} |")
            rows += _rows(name, sub)
            continue
        kind = sub.get("type", "")
        kind = " or ".join(kind) if isinstance(kind, list) else kind
        default = f"`{json.dumps(sub['default'])}`" if "default" in sub else ""
        text = sub.get("description", "").replace("|", "\\|")
        rows.append(f"| `{name}` | {kind} | {default} | {_allowed(sub)} | {text} |")
    return rows


def _allowed(sub: dict) -> str:
    parts = []
    if "enum" in sub:
        parts.append(", ".join(f"`{v}`" for v in sub["enum"]))
    items = sub.get("items", {})
    for src, lo, hi in ((sub, "minimum", "maximum"), (items, "minimum", "maximum")):
        if lo in src or hi in src:
            parts.append(f"{src.get(lo, '')}..{src.get(hi, '')}" + (" each" if src is items else ""))
    if "exclusiveMinimum" in sub:
        parts.append(f"> {sub['exclusiveMinimum']}")
    if "pattern" in sub:
        parts.append(f"pattern `{sub['pattern']}`")
    if "maxItems" in sub:
        parts.append(f"at most {sub['maxItems']} items")
    return "; ".join(parts).replace("|", "\\|")


def media_files(prompts: list) -> list[str]:
    """Every audio and image file the (resolved) prompts name, once, in order."""
    files = [p for prompt in prompts if isinstance(prompt, dict) for kind in ("audio", "image") for p in prompt[kind]]
    return list(dict.fromkeys(files))


if __name__ == "__main__":
    sys.stdout.write(reference(yaml.safe_load(SCHEMA.read_text())))

