"""docs/training.md lists every option with its default: the table there is the one the code generates."""

from pathlib import Path

from contract.options import TrainingConfig, options_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "training.md"


def test_training_doc_has_the_generated_options_table():
    text = DOC.read_text()
    assert options_markdown() in text, "regenerate the table with `python -m contract.options`"


def test_every_option_is_documented_with_a_meaning():
    table = options_markdown()
    for name, field in TrainingConfig.model_fields.items():
        assert field.description, f"option {name} has no description"
        assert f"| `{name}` |" in table
