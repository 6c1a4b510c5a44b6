"""The `serve deploy` config and the application builder, without starting Ray; the layering of serve/ and client/."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_package import _imports  # one reader of a folder's imports for every layering test

pytest.importorskip("ray")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]


def test_serve_imports_the_core_and_none_of_its_siblings():
    imports = _imports("serve")
    siblings = ("artquant_nodes", "reward", "training", "client", "report", "cli", "diffusers", "comfy")
    assert not [n for n in imports if n.startswith("..") and n.lstrip(".").split(".")[0] in siblings]
    assert not [n for n in imports if n.split(".")[0] in siblings]
    assert {n for n in imports if n.startswith("..")} <= {"..scorer", "..scorer.images", "..scorer.preprocessing", ".."}


def test_client_imports_only_the_standard_library_numpy_and_pillow():
    import sys

    outside = {n.split(".")[0] for n in _imports("client") if not n.startswith(".")} - set(sys.stdlib_module_names)
    assert outside <= {"numpy", "PIL"}, outside
    assert not [n for n in _imports("client") if n.startswith("..")]


def test_the_deploy_config_is_valid_and_builds_the_application(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from artquant.serve.server import RewardServer, build_app

    config = yaml.safe_load((ROOT / "serve" / "artquant_serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    application = config["applications"][0]
    assert application["import_path"] == "artquant.serve.server:build_app"
    assert application["deployments"][0]["name"] == RewardServer.name
    monkeypatch.setenv("ARTQUANT_SERVE_TOKEN", "secret")
    assert build_app(application["args"]) is not None


BAD_ARGS = [
    ({}, "set a bearer token (ARTQUANT_SERVE_TOKEN or args.token)"),
    ({"token": "t", "max_batchsize": 4}, "unknown artquant serve argument(s): max_batchsize"),
]


@pytest.mark.parametrize("args, fragment", BAD_ARGS)
def test_build_app_refuses_bad_arguments(monkeypatch, args, fragment):
    from artquant.serve.server import build_app

    monkeypatch.delenv("ARTQUANT_SERVE_TOKEN", raising=False)
    with pytest.raises(ValueError) as error:
        build_app(args)
    assert fragment in str(error.value)
