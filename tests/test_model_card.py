"""Sharing a model the hub's way: a model card in every model folder, kept up to date by every scoring; an upload
that leaves out what a user does not need; a model loaded back by its hub id, from the hub's local cache."""

import json
import shlex
import shutil
import sys
from unittest import mock

import httpx2
import pytest
from huggingface_hub import HfApi, ModelCard, constants, hf_api
from huggingface_hub.cli import hf
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from huggingface_hub.utils import filter_repo_objects

import hub
import model_card
import run_inference
import run_training
from conftest import training_folders

REPOSITORY = "someone/tiny-sarrarp-model"


@pytest.fixture(scope="module")
def shared_model(demo_release, backbone, tmp_path_factory):
    """A frozen-backbone model trained 2 steps, its card written by training (after its loader workers, which hold
    the folder's lock file too)."""
    output = tmp_path_factory.mktemp("card") / "model"
    arguments = [*training_folders(demo_release, backbone, output), "--max-steps", "2", "--num-workers", "2"]
    arguments += ["--resolution", "quarter", "--backbone-training", "frozen"]
    assert run_training.main([str(a) for a in arguments]) == 0
    return output


def infer(model, release, *extra) -> int:
    arguments = ["--model-directory", model, "--data-directory", release, "--batch-size", "2", "--num-workers", "0"]
    return run_inference.main([str(a) for a in [*arguments, *extra]])


def results(card) -> dict:
    """(split, weights, metric type): value of the card's model-index."""
    return {(r.dataset_split, r.metric_config, r.metric_type): r.metric_value for r in card.data.eval_results}


def test_training_writes_a_card_the_hub_reads_with_the_best_validation_and_its_intended_use(shared_model):
    card = ModelCard.load(shared_model / "README.md")
    assert card.data.pipeline_tag == "image-segmentation"
    assert {"surgical", "sar-rarp50", "dinov3", "frozen"} <= set(card.data.tags)
    records = [json.loads(line) for line in (shared_model / "metrics.jsonl").read_text().splitlines()]
    best = max((r for r in records if "val" in r), key=lambda r: r["val"]["score"])
    assert results(card)[("val", "best", "official_score")] == round(best["val"]["score"], 4)
    assert "not a medical device" in card.text and "must not be used for clinical decisions" in card.text
    for section in ("## Results", "## Limitations", "## How to load it", "## Licence", "## Training settings"):
        assert section in card.text
    assert '| `backbone_training` | `"frozen"` |' in card.text  # the resolved settings, from config.json
    assert "data_directory" not in card.text  # the user's own paths stay out


def test_a_dinov3_backbone_gives_the_card_its_hub_id_and_meta_licence(shared_model):
    config = json.loads((shared_model / "config.json").read_text())
    config["backbone"] = "facebook/dinov3-vitl16-pretrain-lvd1689m"
    card = ModelCard(model_card.card_text(config, []))
    assert card.data.base_model == "facebook/dinov3-vitl16-pretrain-lvd1689m"
    assert (card.data.license, card.data.license_name) == ("other", "dinov3-license")


def test_a_local_backbone_passes_on_the_licence_its_own_card_names(backbone, tmp_path):
    local = shutil.copytree(backbone, tmp_path / "backbone")
    assert model_card.backbone_license(str(local)) == {}  # unknown: the card says to check the weights' source
    (local / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# weights\n")
    assert model_card.backbone_license(str(local)) == {"license": "cc-by-nc-4.0"}


def test_each_scoring_adds_its_split_to_the_card_and_keeps_the_others(shared_model, demo_release, tmp_path, capsys):
    model = shutil.copytree(shared_model, tmp_path / "model")
    assert infer(model, demo_release) == 0
    assert f"model card: {model / 'README.md'}" in capsys.readouterr().out
    test_score = json.loads((model / "inference" / "metrics.json").read_text())["score"]
    assert results(ModelCard.load(model / "README.md"))[("test", "best", "official_score")] == round(test_score, 4)
    assert infer(model, demo_release, "--split", "val", "--checkpoint", "last", "--output", tmp_path / "val") == 0
    val_score = json.loads((tmp_path / "val" / "metrics.json").read_text())["score"]
    card = ModelCard.load(model / "README.md")
    assert results(card)[("val", "last", "official_score")] == round(val_score, 4)
    assert results(card)[("test", "best", "official_score")] == round(test_score, 4)  # kept
    assert ("val", "best", "official_score") in results(card)  # training's validation, kept too
    assert infer(model, demo_release) == 0  # the same scoring again replaces its own entry
    assert len(json.loads((model / "evaluations.json").read_text())["evaluations"]) == 3


def test_a_card_someone_edited_is_left_as_it_is(shared_model, demo_release, tmp_path, capsys):
    model = shutil.copytree(shared_model, tmp_path / "model")
    (model / "README.md").write_text("# my own words\n")
    assert infer(model, demo_release) == 0
    assert "its model card was left as it is" in capsys.readouterr().out
    assert (model / "README.md").read_text() == "# my own words\n"
    assert (model / "inference" / "metrics.json").is_file()  # the scores are written all the same


def uploaded(folder) -> set[str]:
    """What `hf upload REPO FOLDER --exclude ...`, as model_card.upload_command gives it, sends: the hf command line
    run (its network calls caught), and the paths filtered as upload_folder filters them."""
    calls = {}
    created = lambda self, repo_id, **kwargs: hf_api.RepoUrl(f"https://huggingface.co/{repo_id}")  # noqa: E731
    with (
        mock.patch.object(HfApi, "create_repo", created),
        mock.patch.object(HfApi, "upload_folder", lambda self, **kwargs: calls.update(kwargs) or "uploaded"),
        mock.patch.object(sys, "argv", shlex.split(model_card.upload_command(str(folder), REPOSITORY))),
        pytest.raises(SystemExit) as exit,
    ):
        hf.main()
    assert exit.value.code == 0 and calls["folder_path"] == str(folder) and calls["allow_patterns"] is None
    ignored = calls["ignore_patterns"] + hf_api.DEFAULT_IGNORE_PATTERNS
    paths = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return set(filter_repo_objects(paths, ignore_patterns=ignored))


def test_the_upload_leaves_out_checkpoints_locks_partial_files_and_predictions(shared_model, demo_release, tmp_path):
    model = shutil.copytree(shared_model, tmp_path / "model")
    assert infer(model, demo_release) == 0
    (model / ".config.json.123.partial").write_text("{")  # a killed write's
    sent = uploaded(model)
    assert (model / "checkpoint.pt").is_file() and (model / ".lock").is_file()
    assert not {"checkpoint.pt", ".lock", ".written.json", ".config.json.123.partial"} & sent
    assert not [path for path in sent if path.startswith("inference/")]
    assert {"README.md", "config.json", "evaluations.json", "best/weights.safetensors"} <= sent
    assert sent <= {
        *("README.md", "config.json", "evaluations.json", "split.json", "class_weights.json", "metrics.jsonl"),
        *("training_curves.png", "best/weights.safetensors", "last/weights.safetensors"),
    }  # no backbone: a frozen one is named in config.json, never copied


def filled_hub_cache(model, cache) -> None:
    """The hub's local cache as snapshot_download leaves it after downloading REPOSITORY's upload of model."""
    repository = cache / f"models--{REPOSITORY.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repository / "refs").mkdir(parents=True)
    (repository / "refs" / "main").write_text(commit)
    for path in uploaded(model):
        (repository / "snapshots" / commit / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(model / path, repository / "snapshots" / commit / path)


def test_a_model_is_loaded_by_its_hub_id_from_the_local_cache_and_scores_as_the_folder_does(
    shared_model, demo_release, tmp_path, monkeypatch
):
    model = shutil.copytree(shared_model, tmp_path / "model")
    assert infer(model, demo_release) == 0
    filled_hub_cache(model, tmp_path / "hub")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    assert infer(REPOSITORY, demo_release) == 0  # offline: the tests never reach the network
    by_id = json.loads((tmp_path / "someone--tiny-sarrarp-model" / "inference" / "metrics.json").read_text())
    assert by_id["score"] == json.loads((model / "inference" / "metrics.json").read_text())["score"]
    assert not list((tmp_path / "hub").rglob("inference"))  # nothing written into the cache


def hub_refusal(kind, status):
    request = httpx2.Request("HEAD", f"https://huggingface.co/{REPOSITORY}/resolve/main/config.json")
    return kind(str(status), response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    "refusal, expected",
    [
        (None, f"error: cannot reach the Hugging Face hub to download {REPOSITORY}: it is not a folder here either"),
        (
            hub_refusal(RepositoryNotFoundError, 404),
            f"error: {REPOSITORY} is not on the Hugging Face hub: it is not a folder here either; check the path",
        ),
        (hub_refusal(GatedRepoError, 403), f"error: {REPOSITORY} is gated and your token has not been granted access"),
    ],
)
def test_no_network_a_missing_and_a_gated_repository_are_one_line_each(
    demo_release, tmp_path, monkeypatch, capsys, refusal, expected
):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # empty
    monkeypatch.chdir(tmp_path)
    if refusal is not None:  # online, and the hub refuses
        monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 20)
        monkeypatch.setattr(hub, "offline", lambda: False)
        monkeypatch.setattr(hub, "get_hf_file_metadata", lambda url, **kwargs: (_ for _ in ()).throw(refusal))
    assert infer(REPOSITORY, demo_release) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(expected), error
    assert list(tmp_path.iterdir()) == [] or [p.name for p in tmp_path.iterdir()] == ["hub"]
