"""Results a reader cannot misread (issue 27): each test is what a researcher reading the outputs meets."""

import pytest

import run_training
from test_reliability import one_line_error


@pytest.mark.parametrize(
    "line, said",
    [
        ("resolution: quater", "resolution: invalid choice: 'quater' (choose from 'full', 'half', 'quarter')"),
        ("image_mean: [0.5, 0.4]", "image_mean: expected 3 arguments"),
        ("lora_rank: eight", "lora_rank: invalid int value: 'eight'"),
        ("lora_rank: 0", "--lora-rank (from --config {recipe}) must be at least 1"),
        ("lora_dropout: 1.5", "--lora-dropout (from --config {recipe}) must be in [0, 1)"),
    ],
    ids=["choice", "count", "type", "range", "interval"],
)
def test_a_bad_value_in_a_recipe_names_the_file_and_the_key(tmp_path, capsys, line, said):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(line + "\n")
    with pytest.raises(SystemExit) as refused:
        run_training.parse_args(["--config", str(recipe)])
    assert refused.value.code == 2
    message = one_line_error(capsys.readouterr().err)
    assert said.format(recipe=recipe) in message and str(recipe) in message
