"""Is the difference real: paired bootstrap intervals and sign-flip p-values between runs scored on the same frames,
and scripts/compare_runs.py as a user runs it."""

import json

import numpy as np
import pytest
from scipy import stats

import compare_runs
import comparison
import report

CLASSES = len(comparison.CLASSES)


def scored(iou_per_video: list[list[float]], name="run", nsd_per_video=None) -> comparison.ScoredRun:
    """A run whose frame f of video v scores iou_per_video[v][f] on every class (NSD the same unless given)."""
    nsd_per_video = nsd_per_video or iou_per_video
    keys = [(f"video_{41 + v}", f"{60 * f:09d}") for v, frames in enumerate(iou_per_video) for f in range(len(frames))]
    iou = np.repeat([[x] for frames in iou_per_video for x in frames], CLASSES, axis=1)
    nsd = np.repeat([[x] for frames in nsd_per_video for x in frames], CLASSES, axis=1)
    return comparison.ScoredRun(name, None, keys, iou, nsd)


def write_scored_folder(folder, run: comparison.ScoredRun):
    """per_frame.csv as run_inference.py writes it."""
    frames = [
        {
            "video": video,
            "frame": frame,
            "IoU": i.tolist(),
            "NSD": n.tolist(),
            "false_positives": [0] * CLASSES,
            "missing": False,
        }
        for (video, frame), i, n in zip(run.keys, run.iou, run.nsd)
    ]
    folder.mkdir(parents=True)
    (folder / "per_frame.csv").write_bytes(report.per_frame_csv(frames))
    return folder


def test_a_run_compared_with_itself_differs_by_zero_with_an_interval_of_zero_and_p_one():
    rng = np.random.default_rng(1)
    run = scored(rng.random((5, 4)).tolist())
    for name, v in comparison.compare(run, run, resamples=500).items():
        assert v["difference"] == 0 and v["interval"] == [0, 0] and v["p"] == 1, name


def test_a_known_gain_on_one_video_gives_the_hand_computed_difference():
    reference = scored([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
    run = scored([[0.5, 0.5, 0.5], [0.8, 0.8, 0.8]])  # video_42's frames 0.3 better on every class
    result = comparison.compare(reference, run, resamples=500)
    for name in ("mIoU", "mNSD", "IoU thread", "score"):  # score: sqrt(0.65 x 0.65) - sqrt(0.5 x 0.5)
        assert result[name]["difference"] == pytest.approx(0.15)
    assert result["score"]["reference"] == pytest.approx(0.5) and result["score"]["run"] == pytest.approx(0.65)
    assert result["score"]["p"] == 1  # the gain of one video of two, its sign flipped, is as large: no evidence


def test_the_sign_flip_p_value_is_exact_on_four_videos():
    # per-video gains +0.1, +0.1, +0.1, -0.1: observed mean 0.05; of the 16 sign patterns, the 10 with three signs
    # alike give |mean| >= 0.05 (4 x 0.1: 2 patterns, 2 x 0.1: 8), the 6 balanced ones 0
    reference = scored([[0.5], [0.5], [0.5], [0.5]])
    run = scored([[0.6], [0.6], [0.6], [0.4]])
    assert comparison.sign_flip_p_values(reference, run)["mIoU"] == pytest.approx(10 / 16)


def test_the_bootstrap_interval_of_a_mean_agrees_with_scipy():
    rng = np.random.default_rng(2)
    gains = rng.normal(0.02, 0.05, 30)  # one frame a video: the second stage draws nothing new
    reference, run = scored([[0.5]] * 30), scored([[0.5 + g] for g in gains])
    ours = comparison.bootstrap_intervals(reference, run, resamples=20_000)["mIoU"]
    theirs = stats.bootstrap(
        (gains,), np.mean, method="percentile", n_resamples=20_000, random_state=0
    ).confidence_interval
    assert ours == pytest.approx((theirs.low, theirs.high), abs=0.002)  # Monte-Carlo error of 20,000 resamples


def test_frames_are_resampled_within_videos_so_frame_noise_widens_the_interval():
    steady = scored([[0.5] * 4, [0.6] * 4, [0.7] * 4])
    noisy = scored([[0.3, 0.7, 0.3, 0.7], [0.4, 0.8, 0.4, 0.8], [0.5, 0.9, 0.5, 0.9]])  # same video means
    zero = scored([[0.5] * 4] * 3)
    width = [np.diff(comparison.bootstrap_intervals(zero, run, resamples=4000)["mIoU"])[0] for run in (steady, noisy)]
    assert width[1] > width[0]


def test_compare_runs_writes_its_tables_figure_and_json_for_prediction_folders_and_model_directories(tmp_path, capsys):
    reference = write_scored_folder(tmp_path / "a" / "inference", scored([[0.5, 0.6], [0.4, 0.5], [0.7, 0.6]]))
    write_scored_folder(tmp_path / "b", scored([[0.6, 0.7], [0.5, 0.5], [0.8, 0.7]]))
    assert reference.parent.name == "a"  # a model directory: its inference/ is read
    code = compare_runs.main(
        [str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "out"), "--resamples", "500"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"{tmp_path / 'b'} - {tmp_path / 'a'}: score +0.0" in printed
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert result["videos"] == ["video_41", "video_42", "video_43"] and result["sign_patterns"] == "all 8"
    metrics = result["compared"][0]["metrics"]
    assert metrics["mIoU"]["difference"] == pytest.approx(0.25 / 3)  # video means 0.55, 0.45, 0.65 -> 0.65, 0.5, 0.75
    low, high = metrics["mIoU"]["interval"]
    assert low <= metrics["mIoU"]["difference"] <= high
    text = (tmp_path / "out" / "compare.md").read_text()
    assert "| mIoU |" in text and "With 3 videos no p-value can be below 0.25" in text
    assert (tmp_path / "out" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "second, message",
    [
        ([[0.5], [0.5]], "was scored on other videos than"),
        ([[0.5, 0.5], [0.5], [0.5]], "was scored on other frames than"),
    ],
)
def test_runs_scored_on_other_videos_or_frames_are_refused_in_one_line(tmp_path, capsys, second, message):
    write_scored_folder(tmp_path / "a", scored([[0.5], [0.5], [0.5]]))
    write_scored_folder(tmp_path / "b", scored(second))
    assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_folder_without_scores_is_refused_in_one_line(tmp_path, capsys):
    write_scored_folder(tmp_path / "a", scored([[0.5]]))
    (tmp_path / "unscored").mkdir()
    assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "unscored"), "--output", str(tmp_path / "out")]) == 1
    assert "holds no per_frame.csv" in capsys.readouterr().err


def test_a_per_frame_csv_that_does_not_average_to_its_metrics_json_is_refused(tmp_path, capsys):
    run = scored([[0.5, 0.6], [0.4, 0.5]])
    for name, score in (("a", 0.5), ("b", 0.9)):  # b's metrics.json says another score than its frames give
        folder = write_scored_folder(tmp_path / name, run)
        (folder / "metrics.json").write_text(json.dumps({"score": score}))
    assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert "averages to a score of 0.500000, but metrics.json beside it says 0.900000" in error
    assert error.count("\n") == 1 and not (tmp_path / "out").exists()
