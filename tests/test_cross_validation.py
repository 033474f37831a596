"""Cross-validation by operation (folds, the fold runner, the out-of-fold score), ensembles of model directories and
multi-scale test-time augmentation."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cross_validate
import dataset
import discovery
import inference
import report
import run_inference
import run_training
from metrics import evaluate_directories, read_label_png
from trained_model import load_trained_model

FRAMES = {**{f"video_{i:02d}": 20 + (7 * i) % 13 for i in range(1, 21) if i != 11}, "video_11_1": 9, "video_11_2": 14}


def test_folds_hold_every_operation_once_keep_parts_together_balance_frames_and_follow_the_seed():
    largest_operation = max(FRAMES.values())
    for folds in (2, 3, 5):
        groups = dataset.fold_groups(FRAMES, folds, seed=0)
        assert len(groups) == folds and all(groups)
        assert sorted(video for group in groups for video in group) == sorted(FRAMES)  # disjoint, complete
        assert sum("video_11_1" in group and "video_11_2" in group for group in groups) == 1  # parts together
        totals = [sum(FRAMES[video] for video in group) for group in groups]
        assert max(totals) - min(totals) <= largest_operation
        assert dataset.fold_groups(FRAMES, folds, seed=0) == groups
    assert any(dataset.fold_groups(FRAMES, 3, seed=s) != dataset.fold_groups(FRAMES, 3, seed=0) for s in range(1, 5))


@pytest.mark.parametrize("folds, message", [(1, "--folds must be at least 2"), (25, "needs at least 25 operations")])
def test_impossible_fold_counts_are_one_line(folds, message):
    with pytest.raises(dataset.DataError, match=message):
        dataset.fold_groups(FRAMES, folds)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--folds", "1", "--fold", "0"], "--folds must be at least 2, got 1"),
        (["--folds", "3", "--fold", "3"], "--folds 3 needs --fold 0..2"),
        (["--folds", "3"], "--folds 3 needs --fold 0..2"),
        (["--fold", "0"], "--fold needs --folds K"),
        (["--folds", "2", "--fold", "0", "--val-videos", "video_01"], "--val-videos and --folds both choose"),
    ],
)
def test_bad_fold_arguments_stop_training_with_one_line(arguments, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_training.parse_args(arguments)
    error = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(error.splitlines()) == 1 and message in error


@pytest.fixture(scope="module")
def release(demo_release, tmp_path_factory):
    return shutil.copytree(demo_release, tmp_path_factory.mktemp("cv_release") / "sarrarp")


@pytest.fixture(scope="module")
def trained_folds(release, backbone, tmp_path_factory):
    """Two folds trained with the fold runner, fold 1 interrupted once (at its validation, after 2 checkpoints) and
    finished by running the same command again; returns (the runner's folder, its arguments, the second run's output)."""
    output = tmp_path_factory.mktemp("cv") / "cv"
    arguments = [
        *"train --folds 2 --output-directory".split(),
        str(output),
        "--",
        "--data-directory",
        str(release),
        "--backbone",
        str(backbone),
        *"--resolution quarter --batch-size 2 --num-workers 0 --max-steps 3 --warmup-steps 1".split(),
        *"--checkpoint-every 1 --head patch-mlp --head-lr 1e-2 --lr 1e-3".split(),
    ]
    validate, calls = run_training.validate, []

    def killed_at_the_second_validation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return validate(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:  # Ctrl-C: exit code 130, the fold resumable
        patch.setattr(run_training, "validate", killed_at_the_second_validation)
        assert cross_validate.main(arguments) == 130
    assert [cross_validate.fold_state(output / f"fold_{i}") for i in (0, 1)] == ["finished", "interrupted"]
    return output, arguments


def test_the_fold_runner_skips_a_finished_fold_resumes_an_interrupted_one_and_says_how_to_score(
    trained_folds, release, capsys
):
    output, arguments = trained_folds
    finished_checkpoint = (output / "fold_0" / "checkpoint.pt").stat().st_mtime_ns
    assert cross_validate.main(arguments) == 0
    printed = capsys.readouterr().out
    assert "fold 0 of 2: finished, skipped" in printed and "fold 1 of 2: resuming" in printed
    assert "resuming at step 2 of 3" in printed
    assert f"score them: python scripts/cross_validate.py score {output}/fold_* --data-directory {release}" in printed
    assert (output / "fold_0" / "checkpoint.pt").stat().st_mtime_ns == finished_checkpoint
    assert cross_validate.fold_state(output / "fold_1") == "finished"
    splits = [json.loads((output / f"fold_{i}" / "split.json").read_text()) for i in (0, 1)]
    assert [split["fold"] for split in splits] == [0, 1] and splits[0]["fold_groups"] == splits[1]["fold_groups"]
    assert [split["val"] for split in splits] == splits[0]["fold_groups"]
    assert sorted(splits[0]["train"]) == sorted(splits[1]["val"])


@pytest.fixture(scope="module")
def out_of_fold(trained_folds, release):
    output, _ = trained_folds
    assert cross_validate.main(trained_folds[1]) == 0  # fold 1 finished, whichever test ran first
    assert (
        cross_validate.main(
            [
                "score",
                str(output / "fold_0"),
                str(output / "fold_1"),
                "--data-directory",
                str(release),
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    return output / "out_of_fold"


def test_the_out_of_fold_score_is_the_metric_of_the_union_of_the_folds_predictions(out_of_fold, trained_folds, release):
    output, _ = trained_folds
    result = json.loads((out_of_fold / "cross_validation.json").read_text())
    metrics = json.loads((out_of_fold / "metrics.json").read_text())
    all_videos = sorted(discovery.find_video_dirs(release / "train"), key=lambda v: v.name)
    direct = evaluate_directories(release / "train", out_of_fold, videos=[v.name for v in all_videos], progress=False)
    assert metrics["score"] == direct["score"] == result["out_of_fold"]["score"]
    assert metrics["frames"] == direct["frames"] == sum(len(discovery.video_masks(v)) for v in all_videos)
    provenance = json.loads((out_of_fold / "predicted_with.json").read_text())["videos"]
    for fold in result["per_fold"]:  # each fold's videos predicted by its own model, scored as the metric scores them
        assert {provenance[video]["model_directory"] for video in fold["videos"]} == {
            str(output / f"fold_{fold['fold']}")
        }
        alone = evaluate_directories(release / "train", out_of_fold, videos=fold["videos"], progress=False)
        assert fold["score"] == pytest.approx(alone["score"], abs=1e-12)
    scores = [fold["score"] for fold in result["per_fold"]]
    assert result["mean"]["score"] == pytest.approx(np.mean(scores)) and result["std"]["score"] == pytest.approx(
        np.std(scores, ddof=1)
    )
    assert (out_of_fold / "folds.csv").read_text().count("\n") == 3 and (out_of_fold / "per_class.csv").is_file()


def test_every_fold_is_shown_beside_the_score_of_predicting_background_everywhere(out_of_fold, release, capsys):
    result = json.loads((out_of_fold / "cross_validation.json").read_text())
    floors = [report.background_only_score(release / "train", fold["videos"])["score"] for fold in result["per_fold"]]
    assert [fold["background_only_score"] for fold in result["per_fold"]] == floors
    assert result["mean"]["background_only_score"] == pytest.approx(np.mean(floors))
    assert "background_only_score" in (out_of_fold / "folds.csv").read_text().splitlines()[0]
    cross_validate.print_folds(result, out_of_fold)
    printed = capsys.readouterr().out
    assert "background everywhere" in printed and f"would score {np.mean(floors):.4f}" in printed


def test_scoring_needs_every_fold_of_one_division(trained_folds, release, capsys):
    output, _ = trained_folds
    assert cross_validate.main(["score", str(output / "fold_0"), "--data-directory", str(release)]) == 1
    assert capsys.readouterr().err.strip() == "error: need each of the 2 folds once: fold 1 missing"
    with pytest.raises(SystemExit):
        cross_validate.main(["score", str(output / "fold_0"), "--split", "test"])
    assert "--split: set by cross_validate.py score itself" in capsys.readouterr().err


# ----------------------------------------------------------------------------- ensembles and test-time augmentation


def infer(release, output, *models, extra=()):
    assert (
        run_inference.main(
            [
                "--data-directory",
                str(release),
                "--model-directory",
                *map(str, models),
                "--output",
                str(output),
                "--num-workers",
                "0",
                *extra,
            ]
        )
        == 0
    )
    return {
        path.relative_to(output): read_label_png(path) for path in sorted(output.glob("video_*/segmentation/*.png"))
    }


def probabilities_by_hand(model_directory, frame_path, scale=1.0, flip=False):
    """Softmax at the source size of one frame, computed here from the model and the frame file."""
    model, config = load_trained_model(model_directory)
    frame = dataset.read_image(frame_path)
    source_size = frame.shape[:2]
    content, padded = dataset.training_size(source_size, config["resolution"]["scale"] * scale)
    image = torch.from_numpy(dataset.scale_image(frame, content)).permute(2, 0, 1)[None]
    image = image.flip(3) if flip else image
    with torch.no_grad():
        logits = model(F.pad(image, (0, padded[1] - content[1], 0, padded[0] - content[0])), source_size, content)
    return (logits.flip(3) if flip else logits).softmax(1)[0]


@pytest.fixture(scope="module")
def single_predictions(out_of_fold, trained_folds, release, tmp_path_factory):
    output, root = trained_folds[0], tmp_path_factory.mktemp("single")
    return [infer(release, root / f"fold_{i}", output / f"fold_{i}") for i in (0, 1)]


def test_an_ensemble_of_one_model_twice_is_that_model(single_predictions, trained_folds, release, tmp_path):
    fold_0 = trained_folds[0] / "fold_0"
    twice = infer(release, tmp_path / "twice", fold_0, fold_0)
    assert twice.keys() == single_predictions[0].keys()
    for name, labels in twice.items():
        np.testing.assert_array_equal(labels, single_predictions[0][name])


def test_an_ensemble_averages_its_members_probabilities(single_predictions, trained_folds, release, tmp_path):
    folds = [trained_folds[0] / f"fold_{i}" for i in (0, 1)]
    ensemble = infer(release, tmp_path / "ensemble", *folds)
    assert any((ensemble[name] != single_predictions[0][name]).any() for name in ensemble)
    assert any((ensemble[name] != single_predictions[1][name]).any() for name in ensemble)
    name = sorted(ensemble)[0]
    frame = release / "test" / name.parts[0] / "frames" / name.name
    by_hand = (probabilities_by_hand(folds[0], frame) + probabilities_by_hand(folds[1], frame)) / 2
    np.testing.assert_array_equal(ensemble[name], by_hand.argmax(0).numpy())
    record = json.loads((tmp_path / "ensemble" / "predicted_with.json").read_text())["videos"][name.parts[0]]
    assert [member["model_directory"] for member in record["members"]] == [str(f) for f in folds]


def test_multi_scale_tta_averages_the_scaled_and_mirrored_passes_and_scale_1_alone_is_no_tta(
    single_predictions, trained_folds, release, tmp_path
):
    fold_0 = trained_folds[0] / "fold_0"
    scale_1 = infer(release, tmp_path / "scale_1", fold_0, extra=["--tta-scales", "1.0"])
    assert all((labels == single_predictions[0][name]).all() for name, labels in scale_1.items())
    tta = infer(release, tmp_path / "tta", fold_0, extra=["--tta", "flip", "--tta-scales", "0.5", "2"])
    name = sorted(tta)[-1]
    frame = release / "test" / name.parts[0] / "frames" / name.name
    by_hand = sum(probabilities_by_hand(fold_0, frame, scale, flip) for scale in (0.5, 2) for flip in (False, True))
    np.testing.assert_array_equal(tta[name], by_hand.argmax(0).numpy())


def test_scaled_passes_are_padded_to_multiples_of_16_and_scale_1_is_the_training_size():
    config = {"resolution": {"scale": 0.5}}
    sizes, passes = inference.inference_passes([(None, config)], (1080, 1920), "flip", [1.0, 0.75])
    assert sizes == [(540, 960), (405, 720)]
    assert [(p.size_index, p.padded_size, p.flip) for p in passes] == [
        (0, (544, 960), False),
        (0, (544, 960), True),
        (1, (416, 720), False),
        (1, (416, 720), True),
    ]


def test_bad_ensemble_input_is_one_line(trained_folds, release, tmp_path, capsys):
    other_classes = tmp_path / "other"
    shutil.copytree(trained_folds[0] / "fold_0", other_classes)
    config = json.loads((other_classes / "config.json").read_text())
    config["class_names"] = ["background", "tool"]
    (other_classes / "config.json").write_text(json.dumps(config))
    assert (
        run_inference.main(
            [
                "--data-directory",
                str(release),
                "--model-directory",
                str(trained_folds[0] / "fold_0"),
                str(other_classes),
                "--output",
                str(tmp_path / "out"),
                "--num-workers",
                "0",
            ]
        )
        == 1
    )
    error = capsys.readouterr().err.strip()
    assert (
        error == f"error: {other_classes} predicts other classes (background, tool) than the 10 of SAR-RARP50: it "
        "cannot be scored or ensembled here"
    )
    assert not (tmp_path / "out").exists()
    for arguments, message in (
        (["--tta-scales", "1", "0"], "--tta-scales must be positive numbers, got 1.0 0.0"),
        (["--model-directory", "a", "b"], "an ensemble's predictions belong to no one model"),
    ):
        with pytest.raises(SystemExit) as stopped:
            run_inference.parse_args(arguments)
        error = capsys.readouterr().err.strip()
        assert stopped.value.code == 2 and len(error.splitlines()) == 1 and message in error
