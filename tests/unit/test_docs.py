"""The README's settings reference is the settings model, rendered."""

from pathlib import Path

from llm_garage.docs import BEGIN, END, settings_reference
from llm_garage.schema import fields_of
from llm_garage.settings import Engine, Model, Profile, RigData

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_settings_reference_matches_the_model():
    text = README.read_text()
    block = text[text.index(BEGIN) + len(BEGIN) + 1 : text.index(END)]
    assert block == settings_reference(), "run: python -m llm_garage.docs --write README.md"


def test_every_setting_has_a_meaning_and_a_type():
    for cls in (RigData, Engine, Model, Profile):
        for f in fields_of(cls):
            assert f.metadata["doc"].strip(), f"{cls.__name__}.{f.name} has no meaning"
            assert f.metadata["type"].strip(), f"{cls.__name__}.{f.name} has no type"
            assert f.name in settings_reference()
