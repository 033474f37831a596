"""benchmarks/ablate.py: the grid it expands and the commands it runs (no training), and a tiny demo ablation."""

import csv
import json
import re
import sys

import pytest

import run_training
from conftest import ROOT, run_script
from dataset import CLASS_NAMES, THIN_CLASSES
from hub import DEFAULT_BACKBONE

sys.path.insert(0, str(ROOT / "benchmarks"))
import ablate  # noqa: E402

SEED_RECIPE = str(ROOT / "recipes" / "seed.yaml")


def names(grid):
    return [ablate.configuration_name(config) for config in grid]


def test_the_seeds_grid_runs_frozen_and_full_once_and_lora_once_per_rank():
    grid = ablate.expand_grid(["vitl16"], ["frozen", "lora", "full"], ["8", "16"], ["mlp"], ["ce"], ["half", "quarter"])
    assert names(grid) == [
        "vitl16_frozen_mlp_ce_half",
        "vitl16_frozen_mlp_ce_quarter",
        "vitl16_lora-r8_mlp_ce_half",
        "vitl16_lora-r8_mlp_ce_quarter",
        "vitl16_lora-r16_mlp_ce_half",
        "vitl16_lora-r16_mlp_ce_quarter",
        "vitl16_full_mlp_ce_half",
        "vitl16_full_mlp_ce_quarter",
    ]
    assert [config["lora_rank"] for config in grid if config["backbone_training"] != "lora"] == [None] * 4


def test_configuration_names_are_unique_readable_folder_names_over_every_axis():
    backbones = ["vitl16", "facebook/dinov3-vitb16-pretrain-lvd1689m", "/models/my dino/"]
    grid = ablate.expand_grid(
        backbones,
        ["lora", "frozen", "full", "lora"],
        ["8", "16", "8"],
        ["mlp", "multilayer"],
        ["ce", "ce+dice"],
        ["half", "quarter", "full"],
    )
    assert len(set(names(grid))) == len(grid) == 3 * (2 + 1 + 1) * 2 * 2 * 3  # repeated values count once
    assert {config["backbone_label"] for config in grid} == {"vitl16", "vitb16", "my-dino"}  # hub id -> short name
    assert all(re.fullmatch(r"[A-Za-z0-9.-]+(_[A-Za-z0-9.-]+){4}", name) for name in names(grid))
    assert "vitb16_lora-r16_multilayer_ce-dice_full" in names(grid)


def test_backbones_that_would_share_a_folder_name_are_refused():
    with pytest.raises(ValueError, match="distinct folder labels"):
        ablate.expand_grid(["/a/dino", "/b/dino"], ["lora"], ["16"], ["mlp"], ["ce"], ["half"])


def test_backbone_is_the_single_value_form_of_backbones():
    assert ablate.parse_args(["--backbone", "vitb16"]).backbones == ["vitb16"]
    assert ablate.parse_args(["--backbones", "vitl16,vitb16"]).backbones == ["vitl16", "vitb16"]
    assert ablate.parse_args([]).backbones == [DEFAULT_BACKBONE]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backbone-trainings", "lora,partial"], "unknown backbone trainings ['partial']"),
        (["--backbone", "vitl16", "--backbones", "vitb16"], "not both"),
        (["--demo", "--backbones", "vitl16"], "--demo makes and uses its own tiny backbone"),
    ],
)
def test_bad_grid_arguments_stop_with_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit):
        ablate.parse_args(argv)
    assert message in capsys.readouterr().err


def test_each_run_gets_its_mode_a_rank_only_for_lora_and_the_recipe_under_the_grid(tmp_path):
    args = ablate.parse_args(["--recipe", SEED_RECIPE, "--max-steps", "5", "--", "--batch-size", "2"])
    grid = ablate.expand_grid(["vitb16"], ["frozen", "lora", "full"], ["16"], ["mlp"], ["ce"], ["quarter"])
    commands = [
        [str(a) for a in ablate.training_command(args, config, tmp_path / name)[1:]]
        for config, name in zip(grid, names(grid))
    ]
    assert ["--lora-rank" in command for command in commands] == [False, True, False]
    parsed = [run_training.parse_args(command) for command in commands]  # as run_training.py reads them
    assert [a.backbone_training for a in parsed] == ["frozen", "lora", "full"]
    assert {(a.backbone, a.resolution, a.max_steps, a.batch_size) for a in parsed} == {("vitb16", "quarter", 5, 2)}
    # the grid's rank over the recipe's for lora; frozen has no adapters, so the recipe's 8 is not recorded for it
    assert parsed[1].lora_rank == 16 and parsed[0].lora_rank == 16
    assert {(a.optimizer, a.lr, a.weight_decay, a.schedule) for a in parsed} == {("adam", 1e-4, 0, "constant")}


def test_ablate_demo_writes_its_tables(tmp_path):
    # Slow (~1 minute on 2 busy cores): demo data, a tiny backbone, then 2 x (training + inference) subprocesses.
    output = tmp_path / "ablation"
    result = run_script(
        ROOT / "benchmarks" / "ablate.py",
        "--demo",
        "--output-directory",
        output,
        *"--backbone-trainings frozen,lora --lora-ranks 8 --heads mlp --losses ce".split(),
        *"--resolutions quarter --max-steps 2 --num-workers 0".split(),
    )
    expected = ["tiny-dinov3_frozen_mlp_ce_quarter", "tiny-dinov3_lora-r8_mlp_ce_quarter"]
    markdown = (output / "ablation.md").read_text()
    assert "demo data + tiny random backbone: these numbers show plumbing, not truth" in markdown
    assert "| configuration | backbone | mode | score |" in markdown
    assert f"| {expected[0]} | tiny-dinov3 | frozen | 0." in markdown
    assert f"| {expected[1]} | tiny-dinov3 | lora-r8 | 0." in markdown
    with open(output / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["configuration"] for row in rows] == expected
    for row in rows:
        assert row["status"] == "ok" and float(row["peak_memory_mb"]) > 0 and float(row["seconds_per_step"]) > 0
        assert 0 <= float(row["score"]) <= 1 and "thread IoU" in row and "suturing needle NSD" in row
    configs = [json.loads((output / name / "config.json").read_text()) for name in expected]
    assert [config["backbone_training"] for config in configs] == ["frozen", "lora"]
    assert configs[1]["lora"]["rank"] == 8
    assert int(rows[0]["trainable_parameters"]) < int(rows[1]["trainable_parameters"])  # the head alone < head + LoRA
    assert "tables:" in result.stdout

    floor = float(rows[0]["background_only_score"])  # the baseline row, and every row below it says so
    assert f"| background everywhere (predicting nothing) | | | {floor:.4f} |" in markdown
    for row in rows:
        assert (f"{float(row['score']):.4f} (below background)" in markdown) == (float(row["score"]) < floor)
    absent = [name for name in CLASS_NAMES[1:] if all(row[f"{name} ground_truth_frames"] == "0" for row in rows)]
    for name in absent:  # a class in no validation frame is marked in the per-class table
        assert f"{name}{'*' if name in THIN_CLASSES else ''} †" in markdown
