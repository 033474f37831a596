"""Several nodes: the SLURM script launches torchrun as documented, and a rank that does not see the data, the
backbone or the run's folder as rank 0 does stops the run in one line naming it."""

import json
import socket
import sys

import pytest

from conftest import ROOT, run_script
from test_training import TORCHRUN, records, training_args

TRAIN_FLAGS = "--resolution quarter --batch-size 2 --num-workers 0 --warmup-steps 1 --max-steps 2".split()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_sbatch_script_runs_one_torchrun_per_node_meeting_at_the_first_node(demo_release, backbone, tmp_path):
    fake = tmp_path / "bin"  # SLURM's commands as one node sees them
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/sh\necho "srun $*" >> "$SRUN_LOG"\nexec "$@"\n')
    (fake / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    for command in fake.iterdir():
        command.chmod(0o755)
    port = free_port()
    slurm = {
        "SLURM_JOB_NODELIST": "node[1-1]",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_ID": "7",
        "SLURM_SUBMIT_DIR": ROOT,
    }
    output = tmp_path / "run"
    run_script(
        "bash",
        ROOT / "scripts" / "train_multinode.sbatch",
        *training_args(demo_release, backbone, output, *TRAIN_FLAGS)[1:],
        env={
            **{name: str(value) for name, value in slurm.items()},
            "PATH": f"{fake}:/usr/bin:/bin",
            **{"SRUN_LOG": str(tmp_path / "srun.log"), "GPUS_PER_NODE": "2", "RDZV_PORT": str(port)},
            **{"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
        },
    )
    launched = (tmp_path / "srun.log").read_text()
    assert "--nnodes 1 --nproc-per-node 2 --rdzv-id 7 --rdzv-backend c10d" in launched
    assert f"--rdzv-endpoint 127.0.0.1:{port} run_training.py" in launched
    assert json.loads((output / "config.json").read_text())["world_size"] == 2
    assert [r["step"] for r in records(output) if "loss" in r] == [1, 2]


@pytest.mark.parametrize(
    "unshared, message",
    [
        ("data", "error: rank 1 (on {host}) does not see the training data sarrarp/train as rank 0 (on {host}) does"),
        ("output", "error: rank 1 (on {host}) does not see the split.json that rank 0 wrote in run as rank 0"),
    ],
)
def test_a_rank_that_does_not_see_what_rank_0_sees_stops_the_run_in_one_line(
    demo_release, backbone, tmp_path, unshared, message
):
    nodes = [tmp_path / "node0", tmp_path / "node1"]  # each rank's working directory: a node of its own
    for node in nodes[: 1 if unshared == "data" else 2]:
        node.mkdir()
        (node / "sarrarp").symlink_to(demo_release)
    nodes[1].mkdir(exist_ok=True)
    output = "run" if unshared == "output" else tmp_path / "run"  # relative: on each node's own disk
    in_own_folder = ["--no-python", "sh", "-c", f'cd "{tmp_path}/node$RANK" && exec "$@"', "sh", sys.executable]
    result = run_script(
        *TORCHRUN,
        *in_own_folder,
        *training_args("sarrarp", backbone, output, *TRAIN_FLAGS),
        check=False,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0
    expected = message.format(host=socket.gethostname())
    assert expected in result.stderr, result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith(expected))
    assert line.endswith("see docs/training.md, several nodes)")
    assert not (tmp_path / "run").exists() and not (nodes[0] / "run" / "checkpoint.pt").exists()
