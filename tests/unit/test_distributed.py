"""DistributedDataParallel on gloo CPU ranks (tests/unit/ddp_run.py): after every update every rank holds the
same mask, the one a single process decides on the concatenated global batch (the update step's dY and X
are gathered from every rank: ``policies.base.rows_of_every_rank``; snfs folds every backward's gathered
rows into its momentum). Density-changing policies (snfs, srigl's ablation) train on once the DDP wrapper is
built again over the new values Parameters; a stale wrapper is refused at the next step."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RUN = Path(__file__).with_name("ddp_run.py")


def _run(spec: str, policy: str, world: int, out: Path, acc: int = 1, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(RUN), spec, policy, str(world), str(out), str(acc)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **env})


def _masks(spec: str, policy: str, world: int, tmp_path: Path, acc: int = 1, **env: str) -> tuple[list, list[list]]:
    one, many = tmp_path / "one", tmp_path / "many"
    for w, out, a in ((1, one, 1), (world, many, acc)):
        done = _run(spec, policy, w, out, a, **env)
        assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(one), [torch.load(many if world == 1 else f"{many}.{r}") for r in range(world)]


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
        ("90%", "snfs", 3),  # densities move between layers: new values Parameters, the wrapper built again
    ],
)
def test_every_rank_holds_the_mask_one_process_decides_on_the_global_batch(spec, policy, world, tmp_path):
    one, ranks = _masks(spec, policy, world, tmp_path)
    assert len(one) == 4 and all(len(r) == 4 for r in ranks)  # updates at steps 3, 6, 9, 12
    for update, single in enumerate(one):
        for rank, masks in enumerate(ranks):
            assert masks[update] == single, (update, rank)
    first, last = one[0][1], one[-1][1]
    assert any(set(first[n]) != set(last[n]) for n in first)  # the masks really moved between updates


@pytest.mark.slow
@pytest.mark.parametrize("world,acc", [(1, 4), (2, 2)])
def test_micro_batches_of_16_decide_the_masks_of_one_batch_of_64(world, acc, tmp_path):
    """The schedule counts optimizer steps, and the grow step of an accumulated step scores the whole
    accumulated global batch: 4 micro-batches of 16 in one process, or 2 ranks x 2 of 16, decide what one
    batch of 64 does."""
    one, ranks = _masks("90%", "rigl", world, tmp_path, acc=acc, DDP_BATCH="64")
    assert [t for t, _ in one] == [3, 6, 9, 12]  # optimizer steps, not micro-batches
    for rank, masks in enumerate(ranks):
        assert masks == one, rank


@pytest.mark.slow
def test_checkpoints_move_between_two_ranks_and_one_process(tmp_path):
    """Saved on 2 ranks and trained on in 1 process, and saved in 1 process and trained on by 2 ranks: the
    updates after the checkpoint decide the masks of training straight through (steps 9 and 12)."""

    def masks(world: int, name: str, **env: str) -> list:
        done = _run("90%", "rigl", world, tmp_path / name, **env)
        assert done.returncode == 0, done.stderr[-2000:]
        return torch.load(tmp_path / (name if world == 1 else f"{name}.0"))

    straight = masks(1, "straight")
    on_two = str(tmp_path / "two.pt")
    masks(2, "save2", DDP_SAVE_AT="7", DDP_CKPT=on_two)
    on_one = str(tmp_path / "one.pt")
    masks(1, "save1", DDP_SAVE_AT="7", DDP_CKPT=on_one)
    after = [m for m in straight if m[0] > 7]
    assert [t for t, _ in after] == [9, 12]
    assert masks(1, "resume1", DDP_RESUME=on_two) == after  # two ranks' checkpoint, one process
    assert masks(2, "resume2", DDP_RESUME=on_one) == after  # one process's checkpoint, two ranks


@pytest.mark.slow
@pytest.mark.parametrize("spec,policy", [("90%", "snfs"), ("fanin(90%)", "srigl")])
def test_density_changes_move_every_rank_to_new_storage_as_one_process(spec, policy, tmp_path):
    one, ranks = _masks(spec, policy, 2, tmp_path)
    counts = [[len(m) for m in masks.values()] for _, masks in one]
    if policy == "snfs":  # kept counts moved between the two sparse layers
        assert len({tuple(c) for c in counts}) > 1
    else:  # ablation at the first update: the fan-in layer's kept count fell below 10% of 32 x 128
        assert counts[0][0] < 0.1 * 32 * 128
    for rank, masks in enumerate(ranks):
        assert masks == one, rank


@pytest.mark.slow
@pytest.mark.parametrize("adam", [False, True])
def test_snfs_momentum_shadows_are_the_global_batch_s_on_every_rank(adam, tmp_path):
    """Every rank folds the mean of the ranks' dY^T X (DDP's gradient), so each rank's dense momentum shadow
    is one process's on the whole batch, with SGD's momentum or Adam's moments, and so are the masks."""
    env = {"DDP_ADAM": "1"} if adam else {}
    for world, name in ((1, "one"), (2, "many")):
        done = _run("90%", "snfs", world, tmp_path / name, DDP_MOMENTUM=str(tmp_path / f"{name}_m"), **env)
        assert done.returncode == 0, done.stderr[-2000:]
    one = torch.load(tmp_path / "one")
    assert all(torch.load(tmp_path / f"many.{rank}") == one for rank in range(2))
    single = torch.load(tmp_path / "one_m.0")
    for rank in range(2):
        for name, state in torch.load(tmp_path / f"many_m.{rank}").items():
            for key in ("m", "v"):
                if state[key] is not None:
                    assert torch.allclose(state[key], single[name][key], rtol=1e-5, atol=1e-9), (rank, name, key)
    assert (single["0"]["v"] is not None) == adam


@pytest.mark.slow
def test_a_ddp_wrapper_over_the_replaced_values_is_refused_with_the_fix(tmp_path):
    done = _run("90%", "snfs", 2, tmp_path / "many", DDP_KEEP_WRAPPER="1")
    assert done.returncode != 0
    assert "ranks hold different values" in done.stderr and "storage_changed" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec,policy,world,env",
    [
        ("90%", "rigl", 2, {}),
        ("2:4", "rigl", 2, {}),
        ("block(4x4, 90%)", "rigl", 2, {}),
        ("fanin(90%)", "rigl", 2, {}),
        ("90%", "set", 2, {}),
        ("90%", "rigl", 3, {}),  # uneven shards: 3 does not divide the layers' kept counts
        ("90%", "rigl", 2, {"DDP_ADAM": "1"}),  # Adam's two per-weight moments are DTensors too
    ],
)
def test_fsdp2_ranks_hold_the_mask_one_process_decides_on_the_global_batch(spec, policy, world, env, tmp_path):
    """fully_shard on every sparse layer and the root: values sharded on dim 0, index buffers whole on every
    rank; the update reads the whole values and writes each rank's shard (nn.sharded)."""
    one, ranks = _masks(spec, policy, world, tmp_path, DDP_WRAP="fsdp", **env)
    assert len(one) == 4
    for rank, masks in enumerate(ranks):
        assert masks == one, rank
    assert any(set(one[0][1][n]) != set(one[-1][1][n]) for n in one[0][1])


@pytest.mark.slow
def test_fsdp2_checkpoints_through_torch_distributed_checkpoint_resume_on_two_ranks_and_one_process(tmp_path):
    def masks(world: int, name: str, **env: str) -> list:
        done = _run("90%", "rigl", world, tmp_path / name, DDP_WRAP="fsdp", **env)
        assert done.returncode == 0, done.stderr[-2000:]
        return torch.load(tmp_path / (name if world == 1 else f"{name}.0"))

    after = [m for m in masks(1, "straight") if m[0] > 7]
    ckpt = str(tmp_path / "dcp")  # a directory: every rank's shards
    masks(2, "save", DDP_SAVE_AT="7", DDP_CKPT=ckpt)
    assert masks(2, "resume2", DDP_RESUME=ckpt) == after
    assert masks(1, "resume1", DDP_RESUME=ckpt) == after  # one process reads the two ranks' shards


@pytest.mark.slow
@pytest.mark.parametrize(
    "policy,env,message",
    [
        ("snfs", {}, "sharded by FSDP2 (fully_shard) and their policy changes"),  # a density change: a new Parameter
        ("rigl", {"DDP_OPT_FIRST": "1"}, "after fully_shard"),  # the optimizer holds the replaced Parameters
    ],
)
def test_fsdp2_refuses_what_would_train_stale_parameters(policy, env, message, tmp_path):
    done = _run("90%", policy, 2, tmp_path / "many", DDP_WRAP="fsdp", **env)
    assert done.returncode != 0
    assert message in done.stderr


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


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["rigl", "snfs"])
def test_each_data_parallel_group_decides_its_masks_on_its_own_batch(policy, tmp_path):
    """4 ranks in 2 data-parallel groups of 2 (DDP and MaskUpdater given ``process_group``), each replica on
    its own data: every rank holds the mask one process decides on its group's global batch, not on the
    rows of all 4 ranks (rigl gathers the update step's rows over the group; snfs folds every backward's)."""
    one, many = tmp_path / "one", tmp_path / "many"
    momentum = {"DDP_MOMENTUM": str(tmp_path / "m")} if policy == "snfs" else {}
    assert _run("90%", policy, 1, one, **{k: f"{v}_one" for k, v in momentum.items()}).returncode == 0
    done = _run("90%", policy, 4, many, DDP_GROUPS="2", **momentum)
    assert done.returncode == 0, done.stderr[-2000:]
    single, ranks = torch.load(one), [torch.load(f"{many}.{r}") for r in range(4)]
    assert len(single) == 4
    assert ranks[0] == single and ranks[1] == single  # group 0 trains on the single process's data
    assert ranks[2] == ranks[3] and ranks[2] != single  # group 1: its own data, its own masks
    if momentum:  # snfs's shadows: the mean over the group's 2 ranks of dY^T X, one process's on its batch
        want = torch.load(tmp_path / "m_one.0")
        for rank in (0, 1):
            for name, state in torch.load(tmp_path / f"m.{rank}").items():
                assert torch.allclose(state["m"], want[name]["m"], rtol=1e-5, atol=1e-9), (rank, name)
