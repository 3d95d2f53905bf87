"""common.bundle.options: unknown names and bad values are found before any work, with the fix in the message."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from common.bundle.options import (
    STANDARD_OPTIONS,
    BundleOptionError,
    BundleOptions,
    check_overrides,
    describe_schema,
    parse_command_line,
    running_monai_cli,
    undeclared_knobs,
)
from tests.helpers import REPO_ROOT

BUNDLES = REPO_ROOT / "bundles"


@pytest.fixture
def configs(tmp_path) -> Path:
    """A bundle's configs/: an inference config, a training config and the declarations."""
    d = tmp_path / "configs"
    d.mkdir()
    (d / "inference.json").write_text(
        json.dumps({"prompt": "a", "seed": 0, "guidance_scale": 3.0, "amp": False, "device": "$torch.device('cpu')"})
    )
    (d / "train.json").write_text(json.dumps({"seed": 0, "ae_max_epochs": 2, "train": {"max_epochs": 1}}))
    (d / "options.json").write_text(
        json.dumps(
            {
                "_comment_": "declarations",
                "prompt": "standard",
                "seed": "standard",
                "guidance_scale": "standard",
                "amp": "standard",
                "device": "standard",
                "ae_max_epochs": "standard",
                "hint": "internal",
            }
        )
    )
    return d


def _problems(configs: Path, config: str, **overrides) -> list[str]:
    return BundleOptions.from_configs_dir(configs).problems([configs / config], overrides)


def test_known_options_with_good_values_pass(configs):
    assert _problems(configs, "inference.json", prompt="x", seed=3, guidance_scale=7, amp=True, device="cpu") == []
    # names MONAI's run takes itself, and nested ids of defined keys, are not options
    assert _problems(configs, "train.json", meta_file="m.json", logging_file=False, **{"train#max_epochs": 3}) == []


def test_mistyped_name_gets_did_you_mean(configs):
    (message,) = _problems(configs, "inference.json", promt="x")
    assert (
        message.startswith("--promt: no such option in configs/inference.json") and "Did you mean --prompt?" in message
    )


def test_option_of_another_config_names_that_config(configs):
    (message,) = _problems(configs, "inference.json", ae_max_epochs=3)
    assert "It belongs to configs/train.json: add that file to --config_file." in message


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("guidance_scale", "nan", "read it as the text 'nan'. Give a finite number >= 0"),
        ("guidance_scale", math.nan, "nan is not a finite number"),
        ("guidance_scale", math.inf, "inf is not a finite number"),
        ("guidance_scale", -1.0, "not allowed. Give a finite number >= 0 and <= 100 (default 3.0)"),
        ("seed", "abc", "read it as the text 'abc'. Give an integer >= 0"),
        ("seed", 1.5, "not allowed. Give an integer"),
        ("seed", True, "not allowed. Give an integer"),
        ("amp", "true", "Give True or False, capitalised"),
        ("prompt", "x" * 1001, "of at most 1000 characters"),
        ("device", "gpu", "Give a device this machine has"),
        ("device", "cuda:7", "use --device cpu"),
    ],
)
def test_bad_values_name_the_option_the_value_and_what_is_allowed(configs, option, value, expected):
    (message,) = _problems(configs, "inference.json", **{option: value})
    assert message.startswith(f"--{option} ") and expected in message, message


def test_every_problem_is_reported_at_once(configs):
    with pytest.raises(BundleOptionError, match=r"^3 problems with the options given; nothing was run") as info:
        check_overrides([str(configs / "inference.json")], {"promt": "x", "seed": -1, "guidance_scale": "nan"})
    assert len(str(info.value).splitlines()) == 4


def test_declarations_must_be_standard_or_a_schema(configs):
    (configs / "options.json").write_text(json.dumps({"seed": "standrad"}))
    with pytest.raises(ValueError, match='must be "standard"'):
        BundleOptions.from_configs_dir(configs)
    (configs / "options.json").write_text(json.dumps({"not_a_standard_one": "standard"}))
    with pytest.raises(ValueError, match="not a standard option"):
        BundleOptions.from_configs_dir(configs)
    (configs / "options.json").unlink()
    with pytest.raises(FileNotFoundError, match="declares its run options"):
        BundleOptions.from_configs_dir(configs)


def test_command_line_is_parsed_as_monai_fire_does(tmp_path):
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"seed": 1, "prompt": "from file"}))
    argv = ["run", "--config_file", "['c/a.json','c/b.json']", "--seed=3", "--guidance_scale", "nan", "--amp"]
    argv += ["--args_file", str(args_file), "--meta_file", "m.json", "--num_samples", "-2"]
    files, overrides = parse_command_line(argv)
    assert files == ["c/a.json", "c/b.json"]
    assert overrides == {"seed": 3, "guidance_scale": "nan", "amp": True, "prompt": "from file", "num_samples": -2}


def test_running_monai_cli_is_told_by_the_program_path():
    assert running_monai_cli(["/x/site-packages/monai/bundle/__main__.py", "run"])
    assert not running_monai_cli(["/x/bin/pytest", "-q"])


def test_describe_schema_in_words():
    assert describe_schema({"type": "integer", "minimum": 1}) == "an integer >= 1"
    assert describe_schema({"enum": ["ddim", "ddpm"]}) == "one of 'ddim', 'ddpm'"
    assert describe_schema(STANDARD_OPTIONS["train_limit"]["schema"]) == "None or an integer >= 1"
    assert describe_schema(STANDARD_OPTIONS["image_size"]["schema"]).startswith(
        "a list of 2 to 3 values, each an integer"
    )


@pytest.mark.parametrize("bundle", ["brain_t1_ldm", "flair_to_t1_controlnet", "cxr_ldm", "brain_unclip"])
def test_every_knob_of_every_shipped_config_is_declared_and_its_default_valid(bundle):
    configs = BUNDLES / bundle / "configs"
    options = BundleOptions.from_configs_dir(configs)
    raw = json.loads((configs / "options.json").read_text())
    run_configs = [p for p in configs.glob("*.json") if p.name not in ("options.json", "metadata.json", "verify.json")]
    assert undeclared_knobs(run_configs, raw) == []
    defined = {k: v for p in run_configs for k, v in options.defined_keys([p]).items()}
    assert [name for name in options.options if name not in defined] == [], "declared options no config defines"
    for config in run_configs:
        for name, value in options.defined_keys([config]).items():
            if name in options.options and not (isinstance(value, str) and value[:1] in "$@%"):
                fmt = options.options[name].schema.get("format")
                if fmt is None:
                    assert options.options[name].problem(value) is None, (config.name, name, value)
