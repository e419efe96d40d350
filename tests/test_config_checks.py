"""Config checks that JSON Schema cannot make, as plain functions: integers that are integers, the cache
against the model's top-k, hub names that stay in their folder, a checkpoint path that is a file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moe_offload.checkpoint.hub import check_hub_names, hub_metadata_dir
from moe_offload.checkpoint.layouts import read_config, text_config_from_dict
from moe_offload.checkpoint.synthetic import text_config
from moe_offload.config import SCHEMA, check_config, check_integers, prompt_texts, prompts_folder
from moe_offload.errors import InputError

from conftest import small_spec

SCHEMA_DICT = yaml.safe_load(SCHEMA.read_text())


@pytest.mark.parametrize("config, key, value", [
    ({"generate": {"max_new_tokens": 32.0}}, "generate.max_new_tokens", "32.0"),
    ({"cache": {"capacity": 8.0}}, "cache.capacity", "8.0"),
    ({"generate": {"depths": [1, 8.0]}}, "generate.depths.1", "8.0"),
    ({"model": {"synthetic": {"num_layers": 2.5}}}, "model.synthetic.num_layers", "2.5"),
])
def test_a_float_where_an_integer_goes_is_refused(config, key, value):
    with pytest.raises(InputError) as err:
        check_integers(config, SCHEMA_DICT)
    assert str(err.value) == f"invalid config value at {key}: {value} is not an integer"


def test_integers_and_numbers_pass():
    check_integers({"generate": {"max_new_tokens": 32, "depths": [1, 8]}, "cache": {"capacity": None},
                    "resources": {"extract_mem_factor": 2.5}, "profile": {"hit_rate_target": 0.9}}, SCHEMA_DICT)
    check_integers(yaml.safe_load((SCHEMA.parents[2] / "config/config.yaml").read_text()), SCHEMA_DICT)


def _config(capacity, scope="per_layer", unified=False):
    return {"model": {"source": "local"}, "profile": {"capacities": None},
            "cache": {"capacity": capacity, "scope": scope, "unified_memory": unified}}


def test_capacity_below_top_k_is_refused_from_the_models_config():
    text = text_config_from_dict(text_config(small_spec(experts_per_token=4)))
    for scope in ("per_layer", "global"):
        with pytest.raises(InputError, match=r"^cache.capacity 3 is below the model's experts_per_token 4: "):
            check_config(_config(3, scope), text)
    check_config(_config(4), text)
    check_config(_config(None), text)
    check_config(_config(1, unified=True), text)  # unified memory holds every expert: capacity is moot


@pytest.mark.parametrize("repo_id, revision, key", [
    ("Qwen/X", "../../../tmp/x", "revision"), ("Qwen/X", "a/../../b", "revision"), ("Qwen/X", "/abs", "revision"),
    ("Qwen/X", ".git", "revision"), ("Qwen/X", "a\\b", "revision"), ("Qwen/X", "a b", "revision"),
    ("../x", "main", "repo_id"), ("a/..", "main", "repo_id"), ("a/b/c", "main", "repo_id"), ("a/b--c", "main", "repo_id"),
])
def test_hub_names_cannot_climb_out_of_their_folder(repo_id, revision, key):
    with pytest.raises(InputError, match=f"^model.{key} "):
        hub_metadata_dir({"repo_id": repo_id, "revision": revision})


@pytest.mark.parametrize("revision", ["main", "v1.0", "refs/pr/1", "0123456789abcdef0123456789abcdef01234567"])
def test_real_revisions_stay_under_the_metadata_root(revision):
    check_hub_names({"repo_id": "Qwen/Qwen3-Omni-30B-A3B-Instruct", "revision": revision})
    root = Path("results/model/hub").resolve()
    assert root in hub_metadata_dir({"repo_id": "Qwen/Qwen3-Omni-30B-A3B-Instruct", "revision": revision}).resolve().parents


def test_a_checkpoint_path_that_is_a_file_says_so(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(InputError, match=r"is a file, not a directory$"):
        read_config(tmp_path / "model.safetensors")
    with pytest.raises(InputError, match=r"does not exist$"):
        read_config(tmp_path / "absent")


def test_prompts_from_files_are_read_relative_to_the_config_folder(tmp_path):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts/long.txt").write_text("Ünïcode prompt\nover two lines\n", encoding="utf-8")
    texts = prompt_texts(["plain", {"file": "prompts/long.txt"}], tmp_path)
    assert texts == ["plain", "Ünïcode prompt\nover two lines"]  # one trailing newline dropped, the inner kept


@pytest.mark.parametrize("content, end", [
    (None, "does not exist"), (b"", "is empty"), (b"\n", "is empty"), (b"\xff\xfe bad", "is not UTF-8 text (byte 0)"),
    ("dir", "is a directory, not a file"),
])
def test_a_prompt_file_that_cannot_be_a_prompt_is_one_line_naming_it(tmp_path, content, end):
    path = tmp_path / "p.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as err:
        prompt_texts(["fine", {"file": "p.txt"}], tmp_path)
    assert str(err.value) == f"generate.prompts.1: prompt file {path} {end}"


def test_prompt_files_are_relative_to_the_config_file_that_sets_the_prompts(tmp_path):
    default, override, other = tmp_path / "config/config.yaml", tmp_path / "a/mine.yaml", tmp_path / "b/depths.yaml"
    for path, body in ((default, "generate: {prompts: [x]}"), (override, "generate: {prompts: [{file: p.txt}]}"),
                       (other, "generate: {depths: [1]}")):
        path.parent.mkdir(exist_ok=True)
        path.write_text(body)
    assert prompts_folder([default], []) == default.parent
    # --configfile a/mine.yaml b/depths.yaml: the later one sets no prompts, so a/'s are used
    assert prompts_folder([override, other, default], [override, other]) == override.parent
    assert prompts_folder([other, default], [other]) == default.parent


def test_media_prompts_are_resolved_and_checked_at_plan_time(tmp_path):
    """{text, audio, image}: paths relative to the config folder, one or a list; each file checked from its
    header, a bad one a line naming the prompt and the file; a text-only entry stays a string."""
    from moe_offload.config import media_files
    from moe_offload.sample_media import gradient, tone, write_image, write_wav

    (tmp_path / "m").mkdir()
    write_wav(tmp_path / "m/a.wav", tone(0.3))
    write_image(tmp_path / "m/b.png", gradient(8, 8))
    prompts = prompt_texts(["plain", {"text": "hear", "audio": "m/a.wav"},
                            {"text": "both", "audio": ["m/a.wav"], "image": ["m/b.png"]}, {"text": "just text"}],
                           tmp_path)
    assert prompts == ["plain", {"text": "hear", "audio": [str(tmp_path / "m/a.wav")], "image": []},
                       {"text": "both", "audio": [str(tmp_path / "m/a.wav")], "image": [str(tmp_path / "m/b.png")]},
                       "just text"]
    assert media_files(prompts) == [str(tmp_path / "m/a.wav"), str(tmp_path / "m/b.png")]
    write_wav(tmp_path / "m/fast.wav", tone(0.3, rate=44100), rate=44100)
    for entry, words in (({"text": "x", "audio": "m/fast.wav"}, "m/fast.wav: sample rate 44100 Hz"),
                         ({"text": "x", "image": "m/gone.png"}, "m/gone.png does not exist"),
                         ({"text": "x", "image": "m/a.wav"}, "m/a.wav: not a .png or .jpeg")):
        with pytest.raises(InputError) as err:
            prompt_texts(["fine", entry], tmp_path)
        assert str(err.value).startswith("generate.prompts.1: ") and words in str(err.value)
        assert "\n" not in str(err.value)
