"""Every broken part of a checkpoint, as a table: broken input -> the CheckpointError's message, naming the file.

Each row copies a good checkpoint (the reference fixture's, or its safetensors conversion), breaks one file and
loads it through `ArtQuantScorer.from_pretrained`; `artquant convert`/`score` are checked to exit 2 with the same
message. The planted-pickle test checks that nothing the loaders read is unpickled beyond
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from artquant import ArtQuantScorer, CheckpointError
from artquant.cli import main
from artquant.scorer.checkpoint import DTYPES, parse_dtype, resolve_device_and_dtype

DELETE = object()  # a JSON key to remove


def _writable_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, copy_function=shutil.copyfile)  # the fixture is read-only; its copy is not
    return target


def _edit_json(path: Path, **changes) -> None:
    values = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DELETE:
            del values[key]
        else:
            values[key] = value
    path.write_text(json.dumps(values))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _edit_state(path: Path, edit) -> None:
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


@pytest.fixture(scope="module")
def good(reference_dir, tmp_path_factory):
    """Good checkpoints in every layout the loader knows, built once: .bin (the fixture), safetensors, sharded
    safetensors, sharded .bin."""
    root = tmp_path_factory.mktemp("good")
    base = reference_dir / "mplug_owl2_base"
    scorer = ArtQuantScorer.from_pretrained(base, device="cpu", dtype="fp32")
    layouts = {"bin": base, "safetensors": root / "safetensors", "sharded_safetensors": root / "sharded_safetensors"}
    scorer.save_pretrained(layouts["safetensors"])
    scorer.model.save_pretrained(layouts["sharded_safetensors"], max_shard_size="1MB")
    for name in ("tokenizer.model", "preprocessor_config.json"):
        shutil.copy(base / name, layouts["sharded_safetensors"] / name)
    sharded_bin = layouts["sharded_bin"] = _writable_copy(base, root / "sharded_bin")
    state = torch.load(sharded_bin / "pytorch_model.bin", weights_only=True)
    (sharded_bin / "pytorch_model.bin").unlink()
    keys = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2], "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    for name, names in shards.items():
        torch.save({k: state[k] for k in names}, sharded_bin / name)
    weight_map = {k: name for name, names in shards.items() for k in names}
    (sharded_bin / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    reference_score = scorer.score([reference_dir / "images" / "camera.png"])[0].score
    return layouts, reference_score


def test_every_good_layout_loads_and_scores_alike(good, reference_dir):
    """The control for the table below: unbroken, each layout loads (so each row fails for its broken file)."""
    layouts, reference_score = good
    assert len(list(layouts["sharded_safetensors"].glob("model-*.safetensors"))) == 3
    for folder in layouts.values():
        result = ArtQuantScorer.from_pretrained(folder, device="cpu", dtype="fp32").score([reference_dir / "images" / "camera.png"])[0]
        assert result.score == pytest.approx(reference_score, abs=1e-5), folder


# (id, layout, broken file, how it is broken, fragments of the message). Every message also names the file.
FULL_CHECKPOINT_CASES = [
    ("bin truncated", "bin", "pytorch_model.bin", _truncate, ["Could not read", "delete it and download it again"]),
    ("bin garbage", "bin", "pytorch_model.bin", lambda p: p.write_bytes(b"\x80\x02garbage" * 50), ["Could not read", "download it again"]),
    ("bin empty", "bin", "pytorch_model.bin", lambda p: p.write_bytes(b""), ["Could not read", "download it again"]),
    ("bin not a state dict", "bin", "pytorch_model.bin", lambda p: torch.save([torch.zeros(2)], p), ["is not a state dict", "download it again"]),
    ("bin wider than config", "bin", "config.json", lambda p: _edit_json(p, hidden_size=48),
     ["pytorch_model.bin do not match", "there but", "by the config", "download the checkpoint's config.json again"]),
    ("bin deeper than config", "bin", "config.json", lambda p: _edit_json(p, num_hidden_layers=1),
     ["weights that", "does not describe", "model.layers.1.", "download the checkpoint's config.json again"]),
    ("bin lacks a weight", "bin", "pytorch_model.bin", lambda p: _edit_state(p, lambda s: s.pop("lm_head.weight")),
     ["lacks 1 weights of mPLUG-Owl2", "lm_head.weight"]),
    ("no weights at all", "bin", "pytorch_model.bin", lambda p: p.unlink(), ["has no weights", "Download the whole checkpoint"]),
    ("safetensors truncated", "safetensors", "model.safetensors", _truncate, ["Could not read", "delete it and download it again"]),
    ("safetensors garbage", "safetensors", "model.safetensors", lambda p: p.write_bytes(b"garbage" * 99), ["Could not read", "download it again"]),
    ("safetensors wider than config", "safetensors", "config.json", lambda p: _edit_json(p, intermediate_size=96),
     ["model.safetensors do not match", "there but", "by the config (6 weights differ)"]),
    ("shard missing", "sharded_safetensors", "model-00002-of-00003.safetensors", lambda p: p.unlink(),
     ["is missing", "Put the checkpoint's model-00002-of-00003.safetensors into"]),
    ("shard truncated", "sharded_safetensors", "model-00002-of-00003.safetensors", _truncate, ["Could not read", "download it again"]),
    ("shard index garbage", "sharded_safetensors", "model.safetensors.index.json", lambda p: p.write_text("{oops"),
     ["is not valid JSON", "download it again"]),
    ("shard index without weight_map", "sharded_safetensors", "model.safetensors.index.json", lambda p: p.write_text("{}"),
     ["has no weight_map", "download it again"]),
    ("bin shard corrupt", "sharded_bin", "pytorch_model-00002-of-00002.bin", _truncate, ["Could not read", "download it again"]),
    ("bin shard missing", "sharded_bin", "pytorch_model-00001-of-00002.bin", lambda p: p.unlink(), ["is missing"]),
    ("config missing", "bin", "config.json", lambda p: p.unlink(), ["is missing", "Put the checkpoint's config.json into"]),
    ("config garbage", "bin", "config.json", lambda p: p.write_text("{not json"), ["is not valid JSON", "download the checkpoint's config.json again"]),
    ("config a list", "bin", "config.json", lambda p: p.write_text("[1, 2]"), ["holds a JSON list, not an object"]),
    ("config not UTF-8", "bin", "config.json", lambda p: p.write_bytes(b'{"model_type": "\xff"}'), ["is not valid JSON"]),
    ("config a folder", "bin", "config.json", lambda p: p.unlink() or p.mkdir(), ["is missing", "Put the checkpoint's config.json into"]),
    ("config of another model", "bin", "config.json", lambda p: _edit_json(p, model_type="llama"),
     ["describes a model of type 'llama', not mplug_owl2", "pass an mPLUG-Owl2 checkpoint"]),
    ("config without model_type", "bin", "config.json", lambda p: _edit_json(p, model_type=DELETE), ["of type None, not mplug_owl2"]),
    ("config field of the wrong type", "bin", "config.json", lambda p: _edit_json(p, hidden_size="wide"),
     ["is not a valid mPLUG-Owl2 config", "hidden_size", "download the checkpoint's config.json again"]),
    ("tokenizer missing", "bin", "tokenizer.model", lambda p: p.unlink(), ["No tokenizer.model in", "copy LLaMA-2's tokenizer.model there"]),
    ("tokenizer garbage", "bin", "tokenizer.model", lambda p: p.write_bytes(b"not a sentencepiece model"),
     ["is not a SentencePiece tokenizer model", "replace it with LLaMA-2's tokenizer.model"]),
    ("tokenizer empty", "safetensors", "tokenizer.model", lambda p: p.write_bytes(b""), ["is not a SentencePiece tokenizer model"]),
    ("tokenizer of a larger vocabulary", "bin", "tokenizer.model", lambda p: _edit_json(p.parent / "config.json", vocab_size=100),
     ["tokenizer.model has 32000 tokens but the model only 100", "Replace it with LLaMA-2's tokenizer.model"]),
]


def _preprocessor_case(name, changes, fragments):
    def edit(path):
        if isinstance(changes, str):
            path.write_text(changes)
        else:
            _edit_json(path, **changes)

    return (name, "bin", "preprocessor_config.json", edit, [*fragments, "delete it to use this model's defaults (56 px"])


PREPROCESSOR_CASES = [
    _preprocessor_case("size 0", {"size": {"shortest_edge": 0}}, ["size must be a positive whole number of pixels, not 0"]),
    _preprocessor_case("size negative", {"size": {"shortest_edge": -56}}, ["size must be a positive whole number of pixels, not -56"]),
    _preprocessor_case("size fractional", {"size": 56.5}, ["size must be a positive whole number of pixels, not 56.5"]),
    _preprocessor_case("size text", {"size": "big"}, ["size must be a positive whole number of pixels, not 'big'"]),
    _preprocessor_case("size not square", {"size": {"height": 56, "width": 80}}, ["is not square"]),
    _preprocessor_case("crop 0", {"crop_size": {"height": 0, "width": 0}}, ["crop_size must be a positive whole number of pixels, not 0"]),
    _preprocessor_case("crop larger than the resized image", {"crop_size": 64},
                       ["crop_size (64 px) is larger than the resized image (size: 56 px)"]),
    _preprocessor_case("crop unlike the vision model", {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}},
                       ["crops images to 64 px, but the vision model takes 56 px"]),
    _preprocessor_case("resample unknown", {"resample": 7}, ["resample 7 is not supported: only 3 (bicubic)"]),
    _preprocessor_case("resample bilinear", {"resample": 2}, ["resample 2 is not supported"]),
    _preprocessor_case("resample by name", {"resample": "lanczos"}, ["resample 'lanczos' is not supported"]),
    _preprocessor_case("normalisation off", {"do_normalize": False}, ["do_normalize is False, but mPLUG-Owl2's preprocessing always does"]),
    _preprocessor_case("std zero", {"image_std": [0.2, 0, 0.2]}, ["must be positive"]),
    _preprocessor_case("rescale negative", {"rescale_factor": -1}, ["rescale_factor -1 must be positive"]),
    _preprocessor_case("mean of two channels", {"image_mean": [0.5, 0.5]}, ["image_mean must be three numbers (red, green, blue)"]),
    _preprocessor_case("not JSON", "{size: 56", ["is not valid JSON"]),
    _preprocessor_case("a JSON list", "[]", ["holds a JSON list, not an object"]),
]


@pytest.mark.parametrize(
    "layout, culprit, breaks, fragments",
    [pytest.param(*row[1:], id=row[0]) for row in FULL_CHECKPOINT_CASES + PREPROCESSOR_CASES],
)
def test_broken_full_checkpoint(good, tmp_path, layout, culprit, breaks, fragments):
    folder = _writable_copy(good[0][layout], tmp_path / "checkpoint")
    breaks(folder / culprit)
    with pytest.raises(CheckpointError) as caught:
        ArtQuantScorer.from_pretrained(folder, device="cpu", dtype="fp32")
    message = str(caught.value)
    assert str(folder / culprit if (folder / culprit).exists() else folder) in message
    for fragment in fragments:
        assert fragment in message


@pytest.fixture
def release(reference_dir, tmp_path):
    """A writable copy of the ArtQuant release beside its recorded base (../mplug_owl2_base), as it was trained."""
    os.symlink(reference_dir / "mplug_owl2_base", tmp_path / "mplug_owl2_base")
    return _writable_copy(reference_dir / "artquant_lora", tmp_path / "artquant_lora")


def _first_key(state):
    return next(iter(state))


LORA_CASES = [
    ("adapter config garbage", "adapter_config.json", lambda p: p.write_text("{r: 4"),
     ["is not valid JSON", "download the release's adapter_config.json again"]),
    ("adapter config a list", "adapter_config.json", lambda p: p.write_text("[]"), ["holds a JSON list, not an object"]),
    ("adapter config without targets", "adapter_config.json", lambda p: _edit_json(p, target_modules=DELETE),
     ["lacks target_modules, so it is not a LoRA adapter config"]),
    ("adapter config without r and peft_type", "adapter_config.json", lambda p: _edit_json(p, r=DELETE, peft_type=DELETE),
     ["lacks peft_type, r"]),
    ("adapter config of another method", "adapter_config.json", lambda p: _edit_json(p, peft_type="IA3"),
     ["describes a 'IA3' adapter; ArtQuant releases are LoRA adapters"]),
    ("adapter config rank text", "adapter_config.json", lambda p: _edit_json(p, r="four"),
     ["is not a valid LoRA config (r 'four' is not a positive whole number)", "download the release's adapter_config.json again"]),
    ("adapter config rank 0", "adapter_config.json", lambda p: _edit_json(p, r=0), ["(r 0 is not a positive whole number)"]),
    ("adapter config targets empty", "adapter_config.json", lambda p: _edit_json(p, target_modules=[]),
     ["(target_modules [] names no modules)"]),
    ("adapter targets absent from the base", "adapter_config.json",
     lambda p: _edit_json(p, target_modules=["model.layers.0.self_attn.nothing_here"]),
     ["Could not apply the LoRA adapter", "not found in the base model", "target_modules and r fit the base"]),
    ("adapter weights truncated", "adapter_model.bin", _truncate, ["Could not read", "download it again"]),
    ("adapter weights garbage", "adapter_model.bin", lambda p: p.write_bytes(b"junk"), ["Could not read", "download it again"]),
    ("adapter weights missing", "adapter_model.bin", lambda p: p.unlink(),
     ["has adapter_config.json but no adapter_model.safetensors or adapter_model.bin", "download the whole release"]),
    ("adapter weights of another rank", "adapter_model.bin",
     lambda p: _edit_state(p, lambda s: s.update({_first_key(s): torch.zeros(3, 32)})),
     ["Could not apply the LoRA adapter", "size mismatch", "pass the base the release was trained on"]),
    ("non-LoRA weights corrupt", "non_lora_trainables.bin", _truncate, ["Could not read", "download it again"]),
    ("non-LoRA weights garbage", "non_lora_trainables.bin", lambda p: p.write_bytes(b"\x00" * 64), ["Could not read"]),
    ("non-LoRA weights of another shape", "non_lora_trainables.bin",
     lambda p: _edit_state(p, lambda s: s.update({_first_key(s): torch.zeros(3, 3)})),
     ["does not fit the base model", "is [3, 3] there but", "The release and the base do not match"]),
    ("non-LoRA weights the model lacks", "non_lora_trainables.bin",
     lambda p: _edit_state(p, lambda s: s.update({"base_model.model.model.vision_model.extra": torch.zeros(1)})),
     ["does not fit the base model", "it has weights the model lacks", "model.vision_model.extra"]),
    ("release config garbage", "config.json", lambda p: p.write_text("{"), ["is not valid JSON", "config.json again"]),
    ("release config of another model", "config.json", lambda p: _edit_json(p, model_type="llava"), ["of type 'llava', not mplug_owl2"]),
]


@pytest.mark.parametrize("with_base", [True, False], ids=["--base given", "recorded base"])
@pytest.mark.parametrize("culprit, breaks, fragments", [pytest.param(*row[1:], id=row[0]) for row in LORA_CASES])
def test_broken_lora_release(release, reference_dir, culprit, breaks, fragments, with_base):
    breaks(release / culprit)
    base = reference_dir / "mplug_owl2_base" if with_base else None
    with pytest.raises(CheckpointError) as caught:
        ArtQuantScorer.from_pretrained(release, base=base, device="cpu", dtype="fp32")
    message = str(caught.value)
    assert str(release / culprit if (release / culprit).exists() else release) in message
    for fragment in fragments:
        assert fragment in message


# ---------------------------------------------------------------------------------------------------------------
# No file is unpickled beyond torch.load(weights_only=True)
# ---------------------------------------------------------------------------------------------------------------
class MarkerPayload:
    """Fully unpickled, this creates the file `marker`, as a planted file would run any code it holds."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path, form: str) -> None:
    state = {"model.embed_tokens.weight": MarkerPayload(marker)}
    if form == "torch zip":
        torch.save(state, path)
    else:  # a bare pickle, as older tools wrote
        path.write_bytes(pickle.dumps(state))


PLANTED = [  # (checkpoint: full base copy or the release, the file a payload replaces)
    ("base", "pytorch_model.bin"),
    ("sharded_bin", "pytorch_model-00002-of-00002.bin"),
    ("release", "adapter_model.bin"),
    ("release", "non_lora_trainables.bin"),
]


@pytest.mark.parametrize("form", ["torch zip", "bare pickle"])
def test_payload_is_live_when_fully_unpickled(tmp_path, form):
    """The control: the payload below really does run when a file is unpickled without weights_only."""
    marker = tmp_path / "marker"
    _plant(tmp_path / "planted.bin", marker, form)
    try:
        torch.load(tmp_path / "planted.bin", weights_only=False)
    except Exception:  # a bare pickle is not a torch file: torch complains after unpickling it
        pass
    assert marker.exists()


@pytest.mark.parametrize("form", ["torch zip", "bare pickle"])
@pytest.mark.parametrize("entry", ["from_pretrained", "convert"])
@pytest.mark.parametrize("where, filename", PLANTED, ids=[f for _, f in PLANTED])
def test_planted_pickle_never_runs(good, release, reference_dir, tmp_path, capsys, where, filename, form, entry):
    folder = {"base": lambda: _writable_copy(reference_dir / "mplug_owl2_base", tmp_path / "base"),
              "sharded_bin": lambda: _writable_copy(good[0]["sharded_bin"], tmp_path / "sharded"),
              "release": lambda: release}[where]()
    marker = tmp_path / "marker"
    _plant(folder / filename, marker, form)
    if entry == "from_pretrained":
        with pytest.raises(CheckpointError) as caught:
            ArtQuantScorer.from_pretrained(folder, device="cpu", dtype="fp32")
        message = str(caught.value)
    else:
        assert main(["convert", "--model", str(folder), "--device", "cpu", "--out", str(tmp_path / "out")]) == 2
        message = capsys.readouterr().err
    assert not marker.exists()
    assert str(folder / filename) in message
    assert "never unpickles" in message or "Could not read" in message
    assert "weights_only` set to `False`" not in message  # torch's advice to run the file is not passed on


# ---------------------------------------------------------------------------------------------------------------
# dtype names
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("given, expected", [
    ("fp32", torch.float32), ("float32", torch.float32), ("fp16", torch.float16), ("float16", torch.float16),
    ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("torch.float16", torch.float16), ("BFloat16", torch.bfloat16),
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
    ("auto", None), (None, None),
])
def test_dtype_names(given, expected):
    assert parse_dtype(given) is expected


@pytest.mark.parametrize("given", ["float64", "int8", "half16", "", "fp8", torch.float64, torch.int8, 16])
def test_unknown_dtype_lists_the_accepted_names(given):
    with pytest.raises(ValueError) as caught:
        parse_dtype(given)
    assert f"Unknown dtype {given!r}: use auto, " + ", ".join(DTYPES) in str(caught.value)
    with pytest.raises(ValueError, match="Unknown dtype"):
        ArtQuantScorer.from_pretrained("/nonexistent", dtype=given)  # refused before anything is read


def test_auto_dtype_on_the_cpu_is_float32():
    assert resolve_device_and_dtype("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device_and_dtype("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("dtype", ["float16", torch.bfloat16])
def test_from_pretrained_takes_torch_names_and_objects(reference_dir, dtype):
    scorer = ArtQuantScorer.from_pretrained(reference_dir / "mplug_owl2_base", device="cpu", dtype=dtype)
    assert scorer.dtype == parse_dtype(dtype)
    assert next(scorer.model.parameters()).dtype == parse_dtype(dtype)


# ---------------------------------------------------------------------------------------------------------------
# The CLI: exit code 2 and the message; convert's --out checked before loading
# ---------------------------------------------------------------------------------------------------------------
def _broken_config(reference_dir, tmp_path) -> Path:
    folder = _writable_copy(reference_dir / "mplug_owl2_base", tmp_path / "broken")
    (folder / "config.json").write_text("{")
    return folder


def test_cli_loading_errors_exit_2_with_the_message(reference_dir, tmp_path, capsys):
    folder = _broken_config(reference_dir, tmp_path)
    image = str(reference_dir / "images" / "camera.png")
    data = tmp_path / "data.csv"
    data.write_text("image,score\n" + f"{image},5.0\n" * 3)
    runs = {
        "convert": ["convert", "--model", str(folder), "--device", "cpu", "--out", str(tmp_path / "out")],
        "score": ["score", image, "--model", str(folder), "--device", "cpu", "--quiet"],
        "eval": ["eval", "--model", str(folder), "--data", str(data), "--device", "cpu", "--out", str(tmp_path / "eval"), "--no-plots"],
    }
    for command, argv in runs.items():
        assert main(argv) == 2, command
        err = capsys.readouterr().err
        assert f"{folder / 'config.json'} is not valid JSON" in err, command
        assert "download the checkpoint's config.json again" in err, command
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out_kind, fragment", [
    ("file", "is a file; name a new folder"),
    ("non-empty folder", "is a folder that is not empty; name a new or empty folder"),
])
def test_convert_refuses_an_occupied_out_before_loading(tmp_path, capsys, out_kind, fragment):
    out = tmp_path / "out"
    if out_kind == "file":
        out.write_text("keep me")
    else:
        out.mkdir()
        (out / "model.safetensors").write_text("keep me")
    # The model does not exist: the refusal must come first, before any loading is tried.
    assert main(["convert", "--model", str(tmp_path / "no-model"), "--device", "cpu", "--out", str(out)]) == 2
    assert fragment in capsys.readouterr().err
    assert "keep me" == (out.read_text() if out_kind == "file" else (out / "model.safetensors").read_text())


def test_convert_into_an_empty_folder_with_a_torch_dtype_name(reference_dir, tmp_path):
    (tmp_path / "out").mkdir()
    assert main(["convert", "--model", str(reference_dir / "mplug_owl2_base"), "--device", "cpu", "--dtype", "float32",
                 "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("value", ["float64", "fp64", "int8"])
def test_cli_unknown_dtype_is_a_usage_error(capsys, value):
    with pytest.raises(SystemExit) as exited:
        main(["score", "x.png", "--dtype", value])
    assert exited.value.code == 2
    assert f"argument --dtype: Unknown dtype '{value}': use auto, fp32, float32, fp16, float16, bf16, bfloat16" in capsys.readouterr().err
