"""Helper process for test_checkpoint: train straight, or save at a step, or resume and finish.

python checkpoint_run.py straight OUT          # steps 1..TOTAL, writes OUT
python checkpoint_run.py first CKPT            # steps 1..SAVE_AT, writes a checkpoint
python checkpoint_run.py resume CKPT OUT       # loads CKPT in a new process, steps SAVE_AT+1..TOTAL
"""

import sys

import torch
from torch import nn

import sparsec

TOTAL, SAVE_AT = 40, 14  # updates every 3 steps until t < 30: the save falls just before one


def build():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 25, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    # rigl on fan-in, SET on blocks, snfs moving weights between two layers, gmp shrinking the conv
    # (regrow_dropped=False: the rule v0.1.0 ran by default, so the runs it recorded replay exactly):
    # the checkpoint's shapes differ from a fresh model's, and the updater carries RNG and momentum
    sparsec.sparsify(model, spec="80%", policy=sparsec.snfs(delta_t=3, regrow_dropped=False), dense=["0", "5", "7"])
    model[5] = sparsec.SparseLinear.from_dense(
        nn.Linear(32, 32), "fanin(k=12)", sparsec.rigl(delta_t=3, regrow_dropped=False), name="5"
    )
    model[7] = sparsec.SparseLinear.from_dense(
        nn.Linear(32, 10), "block(2x4, 50%)", sparsec.set_(delta_t=3, regrow_dropped=False), name="7"
    )
    model[0] = sparsec.SparseConv2d.from_dense(
        nn.Conv2d(2, 8, 3, padding=1), "80%", sparsec.gmp(delta_t=4, s_0=0.2), "0"
    )
    model.append(nn.Identity())  # a second snfs layer: the output head below
    model[8] = sparsec.SparseLinear.from_dense(
        nn.Linear(10, 10), "50%", sparsec.snfs(delta_t=3, regrow_dropped=False), name="8"
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt, sparsec.MaskUpdater(model, opt, total_steps=TOTAL, seed=7)


def train(model, opt, updater, steps):
    for t in steps:
        g = torch.Generator().manual_seed(1000 + t)
        x, y = torch.randn(16, 2, 5, 5, generator=g), torch.randint(0, 10, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        updater.step()
        opt.zero_grad()


def main():
    torch.set_num_threads(1)
    mode = sys.argv[1]
    model, opt, updater = build()
    if mode == "straight":
        train(model, opt, updater, range(1, TOTAL + 1))
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, sys.argv[2])
    elif mode == "first":
        train(model, opt, updater, range(1, SAVE_AT + 1))
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "masks": updater.state_dict()}, sys.argv[2])
    else:
        ckpt = torch.load(sys.argv[2])
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        updater.load_state_dict(ckpt["masks"])
        assert updater.t == SAVE_AT
        train(model, opt, updater, range(SAVE_AT + 1, TOTAL + 1))
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, sys.argv[3])


if __name__ == "__main__":
    main()
