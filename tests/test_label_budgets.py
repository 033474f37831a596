"""Label budgets: run_training.py --train-videos N trains on N of the training operations, drawn by --seed and nested;
benchmarks/ablate.py runs seeds and budgets as grid axes and draws the label-efficiency curve."""

import csv
import json
import sys

import pytest

import dataset
import run_training
from conftest import ROOT, run_script, training_folders

sys.path.insert(0, str(ROOT / "benchmarks"))
import ablate  # noqa: E402

VIDEOS = [f"video_{i:02d}" for i in range(1, 11)] + ["video_11_1", "video_11_2", "video_12"]  # 12 operations


def operations(videos):
    return {dataset.operation_name(v) for v in videos}


def test_budgets_are_nested_deterministic_keep_parts_together_and_differ_between_seeds():
    for seed in (0, 1, 2):
        drawn = [set(dataset.label_budget(VIDEOS, n, seed)[0]) for n in range(1, 13)]
        assert [len(operations(videos)) for videos in drawn] == list(range(1, 13))
        assert all(smaller <= larger for smaller, larger in zip(drawn, drawn[1:]))  # nested
        assert all(("video_11_1" in videos) == ("video_11_2" in videos) for videos in drawn)  # parts together
        assert dataset.label_budget(VIDEOS, 4, seed) == dataset.label_budget(VIDEOS, 4, seed)
    assert len({tuple(dataset.label_budget(VIDEOS, 4, seed)[1]) for seed in range(5)}) > 1


def test_a_budget_draws_from_the_training_side_only_and_leaves_validation_as_it_was():
    frames = {video: 10 for video in VIDEOS}
    for extra in ([], ["--folds", "3", "--fold", "1"]):
        plain = run_training.choose_split(run_training.parse_args(extra), frames)
        budget = run_training.choose_split(run_training.parse_args([*extra, "--train-videos", "3"]), frames)
        assert budget["val"] == plain["val"] and set(budget["train"]) <= set(plain["train"])
        assert (
            operations(budget["train"]) == set(budget["label_budget"]["drawn"])
            and len(budget["label_budget"]["drawn"]) == 3
        )


def test_a_run_with_a_budget_records_its_draw_in_split_json(demo_release, backbone, tmp_path):
    output = tmp_path / "run"
    arguments = [
        *training_folders(demo_release, backbone, output),
        *"--max-steps 1 --batch-size 2 --num-workers 0".split(),
    ]
    assert run_training.main([str(a) for a in [*arguments, "--train-videos", "2", "--resolution", "quarter"]]) == 0
    split = json.loads((output / "split.json").read_text())
    assert split["label_budget"] == {"operations": 2, "drawn": split["label_budget"]["drawn"], "seed": 0}
    assert operations(split["train"]) == set(split["label_budget"]["drawn"])
    assert json.loads((output / "config.json").read_text())["arguments"]["train_videos"] == 2


@pytest.mark.parametrize(
    "budget, message", [("99", "the training split has 4 operations"), ("0", "--train-videos must be at least 1")]
)
def test_a_budget_above_the_operations_or_below_1_is_one_line(
    demo_release, backbone, tmp_path, capsys, budget, message
):
    arguments = [*training_folders(demo_release, backbone, tmp_path / "run"), "--train-videos", budget]
    try:
        code = run_training.main([str(a) for a in arguments])
    except SystemExit as exit:  # the parser's refusal
        code = exit.code
    error = capsys.readouterr().err
    assert code in (1, 2) and message in error and error.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_ablate_runs_seeds_and_budgets_and_gives_mean_and_std_and_the_curve(tmp_path):
    output = tmp_path / "ablation"
    run_script(
        ROOT / "benchmarks" / "ablate.py",
        "--demo",
        "--output-directory",
        output,
        *"--backbone-trainings frozen --heads patch-mlp --losses ce --resolutions quarter".split(),
        *"--seeds 0,1 --train-video-counts 1,all --max-steps 2 --num-workers 0".split(),
    )
    with open(output / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    names = [row["configuration"] for row in rows]
    base = "tiny-dinov3_frozen_patch-mlp_ce_quarter"
    assert names == [f"{base}_n1_seed0", f"{base}_n1_seed1", f"{base}_seed0", f"{base}_seed1"]
    assert [int(row["training_operations"]) for row in rows] == [1, 1, 4, 4]
    for first, second in (rows[:2], rows[2:]):
        scores = [float(first["score"]), float(second["score"])]
        assert float(first["score_mean_over_seeds"]) == pytest.approx(sum(scores) / 2)
        assert float(first["score_std_over_seeds"]) == pytest.approx(abs(scores[0] - scores[1]) / 2**0.5)
    markdown = (output / "ablation.md").read_text()
    assert "| configuration | seeds | training operations | score | mIoU | mNSD |" in markdown
    assert f"| {base}_n1 | 2 | 1 | " in markdown and f"| {base} | 2 | 4 | " in markdown
    assert (output / "label_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    splits = [json.loads((output / name / "split.json").read_text()) for name in names]
    assert all(split["val"] == splits[0]["val"] for split in splits)  # seeds and budgets: one validation set
    assert splits[0]["train"] != splits[1]["train"]  # the seeds draw other operations


def test_seed_and_budget_reach_every_run_command(tmp_path):
    args = ablate.parse_args(["--seeds", "3,4", "--train-video-counts", "2,all"])
    grid = ablate.repeated(
        ablate.expand_grid(["vitb16"], ["lora"], ["16"], ["mlp"], ["ce"], ["half"]), args.seeds, args.train_video_counts
    )
    parsed = [run_training.parse_args([str(a) for a in ablate.training_command(args, c, tmp_path)[1:]]) for c in grid]
    assert [(a.seed, a.train_videos) for a in parsed] == [(3, 2), (4, 2), (3, None), (4, None)]
    assert {a.split_seed for a in parsed} == {0}  # --seed's default: the validation split of every run
    with pytest.raises(SystemExit):
        ablate.parse_args(["--train-video-counts", "0,all"])
