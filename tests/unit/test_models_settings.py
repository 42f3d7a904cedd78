"""The model settings the models task reads."""

from llm_garage.settings import load_rig

MODEL = {"repo": "acme/M-GGUF", "revision": "main", "quant": "Q4_K_M"}


def test_models_retries_defaults_to_five_and_is_bounded():
    rig, errors = load_rig("rig1", {"models": {"m": MODEL}})
    assert not errors and rig.data.models_retries == 5
    rig, errors = load_rig("rig1", {"models_retries": 0})
    assert not errors and rig.data.models_retries == 0
    for bad in (-1, 101, "many"):
        _, errors = load_rig("rig1", {"models_retries": bad})
        assert [e.path for e in errors] == ["models_retries"], bad


def test_model_folder_defaults_under_models_dir():
    rig, errors = load_rig("rig1", {"models_dir": "/data/models", "models": {"m": MODEL}})
    assert not errors and rig.layout.model_dir("m") == "/data/models/m"
    rig, errors = load_rig("rig1", {"models": {"m": {**MODEL, "dir": "/fast/qwen"}}})
    assert not errors and rig.layout.model_dir("m") == "/fast/qwen"
