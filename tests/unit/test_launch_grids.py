"""Every launch fits CUDA's grid limits (issue 10): axis x up to 2^31 - 1, axes y and z up to 65,535.

The strategies' grids are computed for layers up to 2^31 weights and a million outputs (no kernel runs:
layouts are shapes, the plan a stand-in) and passed through the launcher's ``launch_grid``, which every
launch goes through; tests/interpret/test_kernels.py runs the swapped kernel variant.
"""

import pytest
import torch

from sparsec.formats import make_layout
from sparsec.runtime.launch import MAX_GRID_X, MAX_GRID_Y, launch_grid
from sparsec.spec import parse_spec

# (spec, out, in): a 128k-vocabulary head with thin blocks, a million outputs, 2^31 weights
SHAPES = [
    ("block(1x32, 90%)", 131072, 4096),
    ("90%", 1 << 20, 2048),
    ("fanin(k=16)", 1 << 20, 2048),
    ("2:4", 1 << 20, 2048),
    ("1:3", 1 << 20, 2049),
    ("block(16x16, 90%)", 1 << 16, 1 << 15),
]
PROGRAMS = ("forward", "grad_input", "grad_values", "grow_scores")


@pytest.mark.parametrize("spec,out,inn", SHAPES)
@pytest.mark.parametrize("batch", [1, 8192, 1 << 16])  # up to 64k rows: a [B, out] output of 2^36 elements
def test_every_launch_fits_the_cuda_grid(spec, out, inn, batch):
    layout = make_layout(parse_spec(spec), out, inn)
    strategy = layout.format.strategy(layout.spec)
    stand_in_plan = {"PTR": torch.tensor([0, 7], dtype=torch.int32)}  # what grow_scores' grid reads of a plan
    big_axis_y = False
    for program in PROGRAMS:
        for dtype in ("fp16", "fp32"):
            tile = strategy.tiles(program, dtype)
            call = strategy.call(program, layout, tile, stand_in_plan, batch)
            big_axis_y |= len(call.grid) == 2 and call.grid[1] > 65535
            grid, named = launch_grid(call.grid)
            assert 1 <= grid[0] <= MAX_GRID_X and all(1 <= n <= MAX_GRID_Y for n in grid[1:]), (program, call.grid)
            if len(call.grid) == 2:  # the same programs, axes swapped where the kernel is told so
                assert grid == (call.grid[::-1] if named["SWAP"] else call.grid)
    if spec in ("block(1x32, 90%)", "90%", "fanin(k=16)"):  # y = 131072 block rows, cdiv(2^20, 16) row tiles
        assert big_axis_y  # the case really passes axis y's limit before flattening


def test_a_launch_beyond_the_grid_is_a_clear_error():
    with pytest.raises(Exception, match="does not fit CUDA's grid"):
        launch_grid((1 << 17, 1 << 17))
