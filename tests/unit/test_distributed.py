"""DistributedDataParallel on gloo CPU ranks (tests/unit/ddp_run.py): after every update every rank holds the
same mask, the one a single process decides on the concatenated global batch (the update step's dY and X
are gathered from every rank: ``policies.base.rows_of_every_rank``). Density-changing policies are refused
under several ranks with an error naming the supported ones."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

RUN = Path(__file__).with_name("ddp_run.py")


def _run(spec: str, policy: str, world: int, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUN), spec, policy, str(world), str(out)], capture_output=True, text=True, timeout=600
    )


def _masks(spec: str, policy: str, world: int, tmp_path: Path) -> tuple[list, list[list]]:
    one, many = tmp_path / "one", tmp_path / "many"
    for w, out in ((1, one), (world, many)):
        done = _run(spec, policy, w, out)
        assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(one), [torch.load(f"{many}.{r}") for r in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec,policy,world",
    [
        ("90%", "rigl", 2),
        ("2:4", "rigl", 2),
        ("block(4x4, 90%)", "rigl", 2),
        ("fanin(90%)", "rigl", 2),
        ("90%", "set", 2),  # random growth: the updater's generator, seeded the same on every rank
        ("90%", "rigl", 3),
    ],
)
def test_every_rank_holds_the_mask_one_process_decides_on_the_global_batch(spec, policy, world, tmp_path):
    one, ranks = _masks(spec, policy, world, tmp_path)
    assert len(one) == 4 and all(len(r) == 4 for r in ranks)  # updates at steps 3, 6, 9, 12
    for update, single in enumerate(one):
        for rank, masks in enumerate(ranks):
            assert masks[update] == single, (update, rank)
    first, last = one[0], one[-1]
    assert any(set(first[n]) != set(last[n]) for n in first)  # the masks really moved between updates


@pytest.mark.slow
def test_a_density_changing_policy_under_ddp_is_refused_with_the_supported_ones(tmp_path):
    done = _run("90%", "snfs", 2, tmp_path / "many")
    assert done.returncode != 0
    assert "not supported yet" in done.stderr and "rigl, set" in done.stderr


@pytest.mark.slow
def test_the_ddp_example_runs_under_torchrun_with_identical_masks():
    torchrun = Path(sys.executable).with_name("torchrun")
    example = Path(__file__).parents[2] / "examples" / "ddp.py"
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", str(example), "--steps", "30"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "masks identical on every rank: True" in done.stdout
