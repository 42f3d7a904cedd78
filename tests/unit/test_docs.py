"""The README's settings reference is the settings model, rendered."""

import re
from pathlib import Path

from llm_garage.docs import BEGIN, END, names_flag, settings_reference
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


def table_rows(markdown: str) -> list[tuple[int, list[str]]]:
    """Every row of every pipe table, as (header cell count, the row's cells). Cells split on
    unescaped `|`, as GitHub's Markdown does, backticks or not."""
    rows, header = [], None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if header is None:
            header = len(cells)
        rows.append((header, cells))
    return rows


def test_table_rows_splits_on_bare_pipes_only():
    assert table_rows("| a | b |\n|---|---|\n| x \\| y | z |") == [
        (2, ["a", "b"]), (2, ["---", "---"]), (2, ["x \\| y", "z"])]
    assert table_rows("| a | b |\n| int | 'auto' | z |") == [(2, ["a", "b"]),
                                                          (2, ["int", "'auto'", "z"])]


def test_every_table_row_has_as_many_cells_as_its_header():
    for text in (settings_reference(), README.read_text()):
        rows = table_rows(text)
        assert len(rows) > len(fields_of(Profile))
        bad = ["| ".join(cells) for header, cells in rows if len(cells) != header]
        assert not bad, bad


def test_union_types_render_whole_in_the_type_column():
    types = {cells[0]: cells[1] for _, cells in table_rows(settings_reference())}
    assert types["`n_gpu_layers`"] == "int \\| 'auto' \\| 'all'"
    for cls in (RigData, Engine, Model, Profile):
        for f in fields_of(cls):
            assert types[f"`{f.name}`"] == f.metadata["type"].replace("|", "\\|")


def test_every_flag_is_named_once_in_its_row():
    rows = {cells[0]: cells[3] for _, cells in table_rows(settings_reference())}
    flagged = [f for f in fields_of(Profile) if f.metadata.get("flag")]
    assert len(flagged) > 10
    for f in flagged:
        flag = f.metadata["flag"]
        times = len(re.findall(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])", rows[f"`{f.name}`"]))
        assert times == 1, f"{f.name}: {flag} named {times} times"


def test_names_flag_needs_the_whole_flag():
    assert names_flag("logical batch (-b)", "-b")
    assert not names_flag("chat templates (--no-jinja)", "--jinja")
    assert not names_flag("batch (--batch-size)", "-b")
