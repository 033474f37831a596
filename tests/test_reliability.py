"""No silent wrong result: every video is seen, a run is what its records say, damage is detected, every fault is
one line (exit code 1 or 2, no traceback) and no output is lost or overwritten."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import cv2
import httpx2
import numpy as np
import pytest
import torch
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
from safetensors import SafetensorError

import dataset
import discovery
import files
import hub
import metrics
import run_directory
import run_inference
import run_training
import trained_model
from conftest import ROOT, resumable_state, run_script
from make_tiny_backbone import save_tiny_backbone
from test_data import EXTRACT, UNPACK, sequential_frames, zip_folder
from test_training import SECRET, records, training_args

PROGRESS_BAR = r"[\w .-]+: +\d+%\|[^|]*\|[^\]\n]*\]"
sys.path.insert(0, str(ROOT / "benchmarks"))
import ablate  # noqa: E402


@pytest.fixture(scope="module")
def release(demo_release, tmp_path_factory):
    """Our own copy of the demo release (training caches mask statistics in it)."""
    return shutil.copytree(demo_release, tmp_path_factory.mktemp("reliability") / "sarrarp")


def train_in_process(release, backbone, output, *extra) -> int:
    return run_training.main([str(a) for a in training_args(release, backbone, output, *extra)[1:]])


@pytest.fixture(scope="module")
def short_run(release, backbone, tmp_path_factory):
    """A finished 3-step run with a checkpoint at every step. Copy it to change it."""
    output = tmp_path_factory.mktemp("short") / "run"
    assert train_in_process(release, backbone, output, "--max-steps", "3", "--checkpoint-every", "1") == 0
    return output


@pytest.fixture
def run_copy(short_run, tmp_path):
    return shutil.copytree(short_run, tmp_path / "run")


def resume(release, backbone, output, *extra, steps=3) -> int:
    return train_in_process(
        release, backbone, output, "--max-steps", steps, "--checkpoint-every", "1", "--resume", *extra
    )


def one_line_error(text: str) -> str:
    """The error line of a failed command, checking it is the only one and no traceback came with it (progress bars,
    which a terminal redraws in place, aside)."""
    lines = [line for line in re.sub(PROGRESS_BAR, "", text).splitlines() if line.strip()]
    assert "Traceback" not in text and len(lines) == 1, text
    return lines[0]


# ----------------------------------------------------------------------------- 1. every video is seen


def test_video_folders_that_are_symbolic_links_are_extracted_trained_on_and_scored(release, tmp_path):
    data = tmp_path / "sarrarp"
    shutil.copytree(release, data, ignore=shutil.ignore_patterns("frames"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for split, video in (("train", "video_02"), ("test", "video_42")):
        shutil.move(data / split / video, elsewhere / video)
        (data / split / video).symlink_to(elsewhere / video, target_is_directory=True)
    (data / "train" / "loop").symlink_to(data, target_is_directory=True)  # a link to an ancestor must not loop

    run_script(EXTRACT, data)
    assert (elsewhere / "video_02" / "frames" / "000000060.png").is_file()
    assert "video_02" in [v.name for v in discovery.find_video_dirs(data / "train")]
    assert [s.video for s in discovery.find_samples(discovery.find_video_dirs(data / "train"))].count("video_02") == 3
    _, test_videos = run_inference.split_video_dirs(data, [tmp_path], "test")
    assert [v.name for v in test_videos] == ["video_41", "video_42"]


def train_without_a_backbone(release) -> int:
    """run_training.py up to its data checks, which come before the backbone is loaded."""
    return run_training.main(["--data-directory", str(release), "--backbone", "no-such-backbone"])


def test_an_empty_segmentation_folder_names_the_video_in_training_and_scoring(release_copy, capsys):
    masks = release_copy / "train" / "video_03" / "segmentation"
    shutil.rmtree(masks)
    masks.mkdir()
    assert train_without_a_backbone(release_copy) == 1
    assert one_line_error(capsys.readouterr().err) == (
        f"error: {masks}: no masks (*.png) for video video_03: unpack "
        "the video's masks there, or move the folder out of the dataset"
    )
    with pytest.raises(ValueError, match="no ground-truth masks for video video_03"):
        metrics.evaluate_directories(release_copy / "train", release_copy / "train", progress=False)


def test_a_video_zip_with_an_extra_entry_beside_the_video_folder_is_refused_naming_the_video(demo_release, tmp_path):
    video = demo_release / "test" / "video_41"
    archive = tmp_path / "video_41.zip"
    zip_folder(video, archive, top="video_41/")
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr("readme.txt", "notes")
    result = run_script(UNPACK, archive, "--output", tmp_path / "out", check=False)
    assert result.returncode == 1
    assert one_line_error(result.stderr).startswith(
        "error: video_41.zip holds a video_41/ folder and also readme.txt beside it, which would unpack to "
        "video_41/video_41/: delete the extra entries from the zip"
    )
    assert not any((tmp_path / "out").rglob("*video_41*"))  # nothing half-unpacked

    clutter = tmp_path / "clutter" / "video_41.zip"  # what macOS adds is not an extra entry
    clutter.parent.mkdir()
    zip_folder(video, clutter, top="video_41/")
    with zipfile.ZipFile(clutter, "a") as z:
        z.writestr("__MACOSX/video_41/._video_left.avi", "resource fork")
    run_script(UNPACK, clutter, "--output", tmp_path / "out")
    assert (tmp_path / "out" / "test" / "video_41" / "video_left.avi").is_file()
    assert not (tmp_path / "out" / "test" / "video_41" / "__MACOSX").exists()


def test_a_mask_not_named_by_its_frame_index_is_the_same_line_in_extraction_and_training(release_copy, capsys):
    mask = release_copy / "train" / "video_01" / "segmentation" / "60.png"
    shutil.copy(mask.with_name("000000060.png"), mask)
    expected = (
        f"error: {mask}: a mask must be named by the index of its frame in video_left.avi, zero-padded to 9 "
        "digits (e.g. 000000060.png): rename or remove it"
    )
    extraction = run_script(EXTRACT, release_copy / "train" / "video_01", check=False)
    assert extraction.returncode == 1 and expected in extraction.stderr.splitlines()
    assert train_without_a_backbone(release_copy) == 1
    assert one_line_error(capsys.readouterr().err) == expected
    for name in ("x (copy).png", "0060.png", "000000060.PNG.png"):
        with pytest.raises(dataset.DataError, match="must be named by the index of its frame"):
            discovery.frame_index(mask.with_name(name))


# ----------------------------------------------------------------------------- 2. a run is what its records say


def test_resume_on_other_data_or_another_backbone_of_the_same_shape_is_refused(
    release, backbone, run_copy, tmp_path, capsys
):
    other_data = tmp_path / "other-data"
    shutil.copytree(release, other_data)
    shutil.rmtree(other_data / "train" / "video_05")  # a video less: the split and class weights would change
    assert resume(other_data, backbone, run_copy) == 1
    assert one_line_error(capsys.readouterr().err) == (
        "error: --resume refused: the training data (videos or masks) differ from those the run started with; "
        "resume with the original ones, or start a new run in another --output-directory"
    )
    split = (run_copy / "split.json").read_text()

    other_backbone = tmp_path / "other-backbone"
    save_tiny_backbone(other_backbone, seed=1)  # the same shape, other weights
    assert resume(release, other_backbone, run_copy) == 1
    assert "the backbone's weights differ" in one_line_error(capsys.readouterr().err)
    assert (run_copy / "split.json").read_text() == split  # nothing was rewritten


def test_low_res_on_resume_of_a_quarter_resolution_run_is_not_a_change(release, backbone, run_copy, capsys):
    assert resume(release, backbone, run_copy, "--low-res") == 0
    assert "holds a finished run" in capsys.readouterr().out


def test_a_second_run_into_a_running_runs_folder_is_refused_and_a_killed_runs_lock_does_not_block_resume(
    release, backbone, tmp_path, capsys
):
    output = tmp_path / "run"
    arguments = training_args(release, backbone, output, "--max-steps", "400", "--checkpoint-every", "1")
    first = subprocess.Popen(
        [sys.executable, *map(str, arguments)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while not (output / "checkpoint.pt").exists():
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.05)
        assert run_training.main([str(a) for a in arguments[1:]] + ["--resume"]) == 1
        assert one_line_error(capsys.readouterr().err) == (
            f"error: another training run (pid {first.pid}) is writing to {output}: wait for it to finish, or choose "
            "another --output-directory"
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    run_directory.lock_run_directory(output).close()  # the kernel dropped the killed run's lock: --resume can take it


def test_ablate_reuses_a_configuration_only_if_it_was_made_with_the_same_settings(tmp_path, capsys):
    output = tmp_path / "ablation"
    argv = [
        "--data-directory",
        str(tmp_path / "data"),
        "--output-directory",
        str(output),
        *"--heads mlp --losses ce --max-steps 5 -- --batch-size 2".split(),
    ]
    args = ablate.parse_args(argv)
    config = ablate.expand_grid(args.backbones, ["lora"], ["16"], ["mlp"], ["ce"], ["half"])[0]
    run = output / ablate.configuration_name(config)
    run.mkdir(parents=True)
    assert ablate.settings_change(run, ablate.run_settings(args, config, run)).startswith("settings unknown")
    files.write_json_atomically(run / ablate.SETTINGS_FILE, ablate.run_settings(args, config, run))
    assert ablate.settings_change(run, ablate.run_settings(args, config, run)) is None
    worker_count = ablate.parse_args(argv + ["--num-workers", "0"])
    assert ablate.settings_change(run, ablate.run_settings(worker_count, config, run)) is None  # same results

    changed_argv = [a if a != "5" else "6" for a in argv[:-3]] + ["--seed", "1", "--", "--batch-size", "4"]
    changed = ablate.parse_args(changed_argv)
    with pytest.raises(SystemExit) as stop:
        ablate.main(changed_argv)
    assert str(stop.value) == (
        f"error: {run} was made with other settings (--max-steps 5 -> 6; --batch-size 2 -> 4; --seed 0 -> 1; "
        "--val-every 5 -> 6): choose another --output-directory, or delete "
        "them to redo them"
    )
    assert ablate.settings_change(run, ablate.run_settings(changed, config, run)).startswith("--max-steps 5 -> 6")


# ----------------------------------------------------------------------------- 3. damage is detected, not trained on


@pytest.mark.parametrize("damage", ["flipped bytes mid-file", "truncated", "empty"])
def test_a_damaged_checkpoint_is_refused_in_one_line(release, backbone, run_copy, damage, capsys):
    checkpoint = run_copy / "checkpoint.pt"
    data = bytearray(checkpoint.read_bytes())
    if damage == "flipped bytes mid-file":
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
    checkpoint.write_bytes(
        bytes(data[: len(data) // 2] if damage == "truncated" else b"" if damage == "empty" else data)
    )
    assert resume(release, backbone, run_copy) == 1
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"error: {checkpoint} is damaged")
    assert "delete it to start again" in line


def test_a_checkpoint_is_replaced_only_by_a_verified_finite_one(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    path = tmp_path / "checkpoint.pt"
    run_directory.save_checkpoint(path, *resumable_state(model, optimizer, scheduler, scaler, {"step": 1}))
    good = path.read_bytes()

    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite at step 2; the last checkpoint .* was kept"):
        run_directory.save_checkpoint(path, *resumable_state(model, optimizer, scheduler, scaler, {"step": 2}))
    assert path.read_bytes() == good and run_directory.load_checkpoint(path)["step"] == 1
    assert "step 1" in run_directory.last_good_checkpoint(path)
    path.write_bytes(good[:100])
    assert run_directory.last_good_checkpoint(path).startswith("no good checkpoint is left")


def test_a_video_damaged_mid_file_is_reported_and_its_frames_rewritten_once_it_is_replaced(release_copy, tmp_path):
    video = release_copy / "train" / "video_01" / "video_left.avi"
    original = tmp_path / "original.avi"
    shutil.copy(video, original)
    data = bytearray(video.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4000] = bytes(4000)  # zeroed packets: the decoder drops frames
    video.write_bytes(bytes(data))

    result = run_script(EXTRACT, video.parent, check=False)
    assert result.returncode == 1
    assert f"error: {video}: decoded 176 frames but its container lists 180" in result.stderr
    assert not list((video.parent / "frames").glob("*.png"))  # frames after a gap would be misnumbered

    shutil.copy(original, video)
    assert "3 frames written" in run_script(EXTRACT, video.parent).stdout
    decoded = sequential_frames(original)
    for frame in sorted((video.parent / "frames").glob("*.png")):
        assert np.array_equal(cv2.imread(str(frame)), decoded[int(frame.stem)])
    assert "0 frames written" in run_script(EXTRACT, video.parent).stdout


def test_a_replaced_video_has_all_its_frames_rewritten(release_copy):
    frames = release_copy / "train" / "video_02" / "frames"
    stale = frames / "000000060.png"
    stale.write_bytes(cv2.imencode(".png", np.zeros((96, 128, 3), np.uint8))[1].tobytes())
    video = frames.parent / "video_left.avi"
    shutil.copy(release_copy / "train" / "video_03" / "video_left.avi", video)  # another video under the same name
    assert "3 frames written" in run_script(EXTRACT, frames.parent).stdout
    assert np.array_equal(cv2.imread(str(stale)), sequential_frames(video)[60])


def test_partial_files_left_by_killed_writes_are_removed_by_the_next_run(
    release, backbone, release_copy, run_copy, capsys
):
    dead = 2**22 + 12345  # no process has this id
    leftovers = [
        release_copy / "train" / "video_01" / "frames" / f".000000060.png.{dead}.partial",
        run_copy / f".checkpoint.pt.{dead}.partial",
        run_copy / "last" / f".weights.safetensors.{dead}.partial",
    ]
    for path in leftovers:
        path.write_bytes(b"half")
    (release_copy / "train" / "video_01" / "frames" / "000000060.png").unlink()
    run_script(EXTRACT, release_copy / "train" / "video_01")
    assert resume(release, backbone, run_copy) == 0
    assert not [path for path in leftovers if path.exists()]


# ----------------------------------------------------------------------------- 4. one line, never a traceback


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda text: text[: len(text) // 2], "cannot be read"),
        (
            lambda text: json.dumps({**json.loads(text), "arguments": "lost"}),
            "key 'arguments' is missing or not a dict",
        ),
    ],
)
def test_a_damaged_config_json_stops_resume_in_one_line(release, backbone, run_copy, edit, named, capsys):
    config = run_copy / "config.json"
    config.write_text(edit(config.read_text()))
    assert resume(release, backbone, run_copy) == 1
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"error: {config}") and named in line


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda c: "{ not json", "cannot be read"),
        (lambda c: json.dumps({k: v for k, v in json.loads(c).items() if k != "lora"}), "key 'lora.rank' is missing"),
        (
            lambda c: json.dumps({**json.loads(c), "normalization": {"mean": [0.5], "std": [1, 1, 1]}}),
            "key 'normalization.mean' is missing or not a list of 3 numbers",
        ),
        (
            lambda c: json.dumps({**json.loads(c), "resolution": {**json.loads(c)["resolution"], "scale": "half"}}),
            "key 'resolution.scale' is missing or not a number",
        ),
    ],
)
def test_a_damaged_config_json_stops_inference_in_one_line_and_deletes_nothing(release, run_copy, edit, named, capsys):
    earlier = run_copy / "inference" / "metrics.json"
    earlier.parent.mkdir()
    earlier.write_text('{"score": 0.5}')
    config = run_copy / "config.json"
    config.write_text(edit(config.read_text()))
    assert (
        run_inference.main(["--data-directory", str(release), "--model-directory", str(run_copy), "--num-workers", "0"])
        == 1
    )
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"error: {config}") and named in line
    assert earlier.read_text() == '{"score": 0.5}'


def test_a_full_disk_while_saving_is_one_line_and_the_run_resumes(release, backbone, tmp_path, monkeypatch, capsys):
    real_save, saves = torch.save, []

    def disk_full_on_the_third_save(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 3:  # what torch raises when the disk fills
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 320 vs 256")
        return real_save(obj, path, *args, **kwargs)

    output = tmp_path / "run"
    monkeypatch.setattr(run_training.torch, "save", disk_full_on_the_third_save)
    assert train_in_process(release, backbone, output, "--max-steps", "4", "--checkpoint-every", "1") == 1
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"error: could not write {output / 'checkpoint.pt'}") and "--resume" in line
    assert run_directory.load_checkpoint(output / "checkpoint.pt")["step"] == 2
    monkeypatch.undo()

    monkeypatch.setattr(
        trained_model,
        "save_file",
        lambda *a: (_ for _ in ()).throw(SafetensorError("I/O error: No space left on device (os error 28)")),
    )  # what safetensors raises then
    assert resume(release, backbone, output, steps=4) == 1
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"error: could not write {output / 'last' / 'weights.safetensors'} (I/O error: No space")
    monkeypatch.undo()
    assert resume(release, backbone, output, steps=4) == 0
    assert torch.load(output / "checkpoint.pt", weights_only=True)["finished"]


def test_a_killed_data_loader_worker_is_one_line_and_the_run_resumes(release, backbone, tmp_path):
    output, marker = tmp_path / "run", tmp_path / "worker-killed"
    arguments = [
        str(a)
        for a in training_args(
            release, backbone, output, "--max-steps", "6", "--checkpoint-every", "1", "--val-every", "6"
        )[1:]
    ]
    arguments[arguments.index("--num-workers") + 1] = "1"
    killer = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import torch.utils.data, dataset, run_training
real = dataset.SegmentationDataset.__getitem__
def dying(self, index):  # the 10th training sample a worker loads: the out-of-memory killer strikes
    if torch.utils.data.get_worker_info() is not None and self.spatial is not None:
        self.served = getattr(self, "served", 0) + 1
        if self.served == 10 and not os.path.exists({str(marker)!r}):
            open({str(marker)!r}, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
    return real(self, index)
dataset.SegmentationDataset.__getitem__ = dying
sys.exit(run_training.main(sys.argv[1:]))
"""
    result = run_script(sys.executable, "-c", killer, *arguments, check=False)
    assert result.returncode == 1 and marker.exists()
    assert one_line_error(result.stderr).startswith("error: a data loader worker died")
    assert "--resume" in result.stderr
    resumed = run_script(
        *training_args(
            release, backbone, output, "--max-steps", "6", "--checkpoint-every", "1", "--val-every", "6", "--resume"
        )
    )
    assert "resuming at step" in resumed.stdout and records(output)[-1]["step"] == 6


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--num-workers", "-1"),
        ("--seed", "-1"),
        ("--weight-decay", "-0.1"),
        ("--lr", "-0.0001"),
        ("--head-lr", "nan"),
        ("--val-every", "-5"),
        ("--dice-weight", "-1"),
        ("--lora-dropout", "1"),
        ("--lora-dropout", "-0.1"),
        ("--head-hidden", "0"),
        ("--lora-alpha", "0"),
        ("--head-width", "48"),
    ],
)
def test_bad_training_argument_values_are_refused_at_parse_time(flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        run_training.parse_args([flag, value])
    assert stop.value.code == 2
    line = one_line_error(capsys.readouterr().err)
    assert f": error: {flag} must" in line or f": error: argument {flag}: 'nan' is not a finite number" in line


def test_bad_inference_argument_values_are_refused_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        run_inference.parse_args(["--num-workers", "-2"])
    assert "--num-workers must be 0 or more" in capsys.readouterr().err


def test_a_token_pasted_as_the_token_file_is_never_shown(release, capsys):
    assert (
        run_training.main(["--data-directory", str(release), "--hf-token-file", SECRET, "--output-directory", "unused"])
        == 1
    )
    error = capsys.readouterr().err
    assert SECRET not in error
    assert one_line_error(error) == (
        "error: the --hf-token-file value does not exist: it looks like a token itself: "
        "put the token in a file and pass the file's path"
    )
    assert hub.redact_tokens(f"token file {SECRET} does not exist") == "token file hf_*** does not exist"


def test_a_token_file_that_is_not_utf8_is_one_line(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_bytes(b"\xff\xfeh\x00f\x00_\x00")  # UTF-16, as some editors save
    with pytest.raises(hub.BackboneError, match=f"token file {token_file} is not a UTF-8 text file"):
        hub.resolve_hf_token(str(token_file))


def hub_error(kind, status, message=""):
    request = httpx2.Request("HEAD", "https://huggingface.co/facebook/x/resolve/main/config.json")
    return kind(message or f"{status}", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    "error, token, expected",
    [
        (
            hub_error(HfHubHTTPError, 401, "Invalid credentials in Authorization header"),
            SECRET,
            "the Hugging Face hub refused your token (401: invalid credentials)",
        ),
        (
            hub_error(GatedRepoError, 403),
            SECRET,
            "facebook/dinov3-vitb16-pretrain-lvd1689m is gated and your token has not been granted access",
        ),
        (
            hub_error(RepositoryNotFoundError, 404),
            SECRET,
            "facebook/dinov3-vitb16-pretrain-lvd1689m is not on the Hugging Face hub: check the name",
        ),
        (
            hub_error(RepositoryNotFoundError, 401),
            None,
            "facebook/dinov3-vitb16-pretrain-lvd1689m needs a Hugging Face token",
        ),
        (
            hub_error(HfHubHTTPError, 403),
            SECRET,
            "your token may not read facebook/dinov3-vitb16-pretrain-lvd1689m (403)",
        ),
    ],
)
def test_a_refused_token_a_gated_repo_and_a_misspelt_id_are_told_apart(monkeypatch, error, token, expected):
    monkeypatch.setattr(hub, "get_hf_file_metadata", lambda url, **kwargs: (_ for _ in ()).throw(error))
    with pytest.raises(hub.BackboneError) as raised:
        hub.probe("facebook/dinov3-vitb16-pretrain-lvd1689m", token)
    assert str(raised.value).startswith(expected) and SECRET not in str(raised.value)


# ----------------------------------------------------------------------------- 2 and 5. scoring


@pytest.fixture(scope="module")
def model_with_predictions(short_run, release, tmp_path_factory):
    """A copy of the short run, its val videos predicted plainly, then its test videos with flip TTA."""
    model = tmp_path_factory.mktemp("predicted") / "run"
    shutil.copytree(short_run, model)
    base = [
        "--data-directory",
        str(release),
        "--model-directory",
        str(model),
        *"--num-workers 0 --checkpoint last".split(),
    ]
    assert run_inference.main([*base, "--split", "val"]) == 0
    assert run_inference.main([*base, "--split", "test", "--tta", "flip"]) == 0
    return model, base


def test_re_scoring_describes_each_videos_predictions_by_the_run_that_made_them(model_with_predictions, capsys):
    model, base = model_with_predictions
    capsys.readouterr()
    assert run_inference.main([*base, "--split", "val", "--eval-only"]) == 0
    assert "warning" not in capsys.readouterr().err
    metrics = json.loads((model / "inference" / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["checkpoint"] == "last"
    assert metrics["inference"]["split"] == "val" and metrics["inference"]["tta"] == "none"
    recorded = json.loads((model / "inference" / "predicted_with.json").read_text())["videos"]
    assert {video: record["tta"] for video, record in recorded.items()} == {
        **{video: "none" for video in json.loads((model / "split.json").read_text())["val"]},
        "video_41": "flip",
        "video_42": "flip",
    }


def test_a_folder_mixing_two_runs_says_so(model_with_predictions, tmp_path, capsys):
    model, base = model_with_predictions
    mixed = tmp_path / "model"
    shutil.copytree(model, mixed)
    provenance = mixed / "inference" / "predicted_with.json"
    record = json.loads(provenance.read_text())
    record["videos"]["video_41"]["checkpoint"] = "best"  # as if video_41 had been predicted by another run
    provenance.write_text(json.dumps(record))
    capsys.readouterr()
    assert run_inference.main([*base[:3], str(mixed), *base[4:], "--eval-only"]) == 0
    assert "come from 2 different runs" in capsys.readouterr().err
    metrics = json.loads((mixed / "inference" / "metrics.json").read_text())
    assert metrics["inference"]["mixed"] and metrics["checkpoint"] is None
    assert any("different runs" in warning for warning in metrics["warnings"])


def test_scoring_refuses_the_ground_truth_and_a_folder_without_predictions(release, tmp_path, capsys):
    before = sorted(release.rglob("*"))
    score = ["--data-directory", str(release), "--model-directory", str(tmp_path), "--predictions-directory"]
    assert run_inference.main([*score, str(release / "test")]) == 1
    assert "is the ground truth itself" in one_line_error(capsys.readouterr().err)
    assert sorted(release.rglob("*")) == before  # nothing written into the dataset
    (tmp_path / "empty" / "video_41" / "segmentation").mkdir(parents=True)
    assert run_inference.main([*score, str(tmp_path / "empty")]) == 1
    assert "holds no prediction for any of the 6 ground-truth masks" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "empty" / "metrics.json").exists()


def test_scoring_a_folder_never_overwrites_a_file_it_did_not_write(release, tmp_path, capsys):
    predictions = tmp_path / "theirs"
    shutil.copytree(release / "test", predictions, ignore=shutil.ignore_patterns("frames", "*.avi", "*.txt"))
    (predictions / "per_class.csv").write_text("their own table")
    score = ["--data-directory", str(release), "--predictions-directory", str(predictions)]
    assert run_inference.main(score) == 1
    assert one_line_error(capsys.readouterr().err) == (
        f"error: {predictions / 'per_class.csv'} exists and was not written by run_inference.py: move it away, or "
        "score a copy of the folder"
    )
    assert (predictions / "per_class.csv").read_text() == "their own table"
    (predictions / "per_class.csv").unlink()
    assert run_inference.main(score) == 0 and run_inference.main(score) == 0  # its own files it rewrites
    assert json.loads((predictions / "metrics.json").read_text())["score"] == 1.0


def test_colour_prediction_pngs_are_scored_as_the_official_toolkit_reads_them(release, tmp_path, capsys):
    predictions = tmp_path / "colour"
    for mask in (release / "test").glob("video_*/segmentation/*.png"):
        labels = dataset.read_mask(mask)
        noise = np.random.default_rng(0).integers(0, 255, (*labels.shape, 2), dtype=np.uint8)
        target = predictions / mask.relative_to(release / "test")
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), np.dstack([labels, noise]))  # BGR: the class ids in blue, noise in green and red
    assert run_inference.main(["--data-directory", str(release), "--predictions-directory", str(predictions)]) == 0
    assert "scored as the official toolkit reads them, as channel 0" in capsys.readouterr().err
    metrics = json.loads((predictions / "metrics.json").read_text())
    assert metrics["score"] == 1.0 and len(metrics["colour_predictions"]) == 6
