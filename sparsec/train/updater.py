"""``MaskUpdater``: runs every sparse layer's policy on its schedule inside a user's training loop.

Use ``loss.backward(); optimizer.step(); updater.step()``. Step ``t`` counts optimizer steps
from 1. One step ahead of an update the updater *arms* each layer through its policy
(``Policy.arm``: gradient-driven policies decide the drop there, from the weights the update step's
forward will use, and install a capture so that step's backward selects the regrowth chunk by
chunk). ``step()`` after the optimizer step hands the due layers to their policies
(``Policy.update``) and applies the changes they return (``policies.relayout.apply_change``).
The updater knows no policy by name: it schedules, applies, reports and checkpoints.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from sparsec.errors import SparsecError, SparsecWarning
from sparsec.nn import sharded
from sparsec.nn.compile import declare_dynamic_storage
from sparsec.nn.layers import SparseLayer
from sparsec.policies.base import Capture, Change, Context, check_ranks_agree, world_size
from sparsec.policies.relayout import apply_change, replace_parameter

STATE_VERSION = 1


class MaskUpdater:
    """Updates the masks of every sparse layer of ``model`` on its policy's schedule.

    ``optimizer`` must hold the layers' ``values`` (its per-weight state moves with them; None for a
    loop without one); ``total_steps`` is the number of optimizer steps in training (schedules end at
    ``t_end * total_steps``); ``seed`` seeds SET's random growth. After each optimizer step call
    ``step()``: it returns ``{layer name: positions grown}`` for the layers updated at that step;
    ``last_dropped`` and ``last_changes`` keep the counts, and a skipped layer warns with the reason.
    ``state_dict()``/``load_state_dict()`` checkpoint the step count and every policy's state.

    A policy that changes a layer's density (snfs, srigl's ablation, gmp, imp) gives it a new ``values``
    Parameter (the optimizer is pointed at it here) and sets ``storage_changed`` for that step: a
    DistributedDataParallel wrapper holds the old Parameters, so build it again then
    (``ddp = DistributedDataParallel(model, ...)``; every rank holds the same masks and values, so
    ``init_sync=False`` may skip its broadcast). Under several ranks the next ``step()`` checks that the
    ranks still agree on every layer's values and raises, naming the fix, where they do not.

    ``process_group``: every rank that sees another part of the batch and averages its gradient with the
    others (what ``DistributedDataParallel(process_group=...)`` is given; with tensor parallelism beside it the
    data-parallel dimension's group; under HSDP the whole mesh, not its replicate group). A grow step gathers
    its ``dY`` and ``X`` rows over it; None (default): the default process group, as DDP.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        total_steps: int,
        *,
        seed: int = 0,
        process_group: torch.distributed.ProcessGroup | None = None,
    ):
        if not isinstance(total_steps, int) or total_steps < 1:
            raise SparsecError(f"total_steps={total_steps!r} must be a positive integer (optimizer steps in training)")
        self.process_group = process_group
        self.layers: dict[str, SparseLayer] = {n: m for n, m in model.named_modules() if isinstance(m, SparseLayer)}
        if not self.layers:
            raise SparsecError("the model has no sparse layers; apply sparsec.sparsify(model, ...) or @sparse first")
        declare_dynamic_storage(self.layers)  # torch.compile: one graph for every density an update sets
        self.optimizer, self.total_steps = optimizer, total_steps
        self._check_optimizer_holds_values()
        _refuse_density_changes_on_sharded(
            [n for n, layer in self.layers.items() if sharded.is_sharded(layer.values) and layer.policy.changes_density]
        )
        self.t = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.last_changes: dict[str, int] = {}  # layer -> positions grown (pruned, for gmp) at the last update
        self.last_dropped: dict[str, int] = {}  # layer -> positions dropped at the last update
        self.storage_changed = False  # the last step gave a layer a new values Parameter (see the class)
        self._warned: set[str] = set()
        self._states = {}  # layer -> the state its policy keeps across steps (snfs: the momentum shadow)
        for name, layer in self.layers.items():
            state = layer.policy.layer_state(layer, optimizer)
            if state is not None:
                if isinstance(state, Capture):  # snfs's momentum shadow observes every step's backward
                    state.process_group = process_group
                self._states[name] = state
        self._arm(1)

    def _check_optimizer_holds_values(self) -> None:
        if self.optimizer is None:
            return
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [n for n, layer in self.layers.items() if id(layer.values) not in held]
        if missing:
            raise SparsecError(
                f"the optimizer does not hold the sparse values of {missing}; create the optimizer after "
                f"sparsify() and after fully_shard (FSDP2 replaces every Parameter), so it trains "
                f"model.parameters() of the sparse model"
            )

    def _context(self, t: int) -> Context:
        return Context(t, self.total_steps, self.optimizer, self.generator, last_layer=next(reversed(self.layers)))

    def step(self) -> dict[str, int]:
        """Advance one optimizer step; update the masks whose schedule says so. Returns the changes."""
        stale = [n for n, layer in self.layers.items() if layer.replaced_values is not None]
        if stale:
            raise SparsecError(
                f"layers {stale} took another density from a checkpoint after the optimizer was built: call "
                f"updater.load_state_dict(...) with the checkpoint's updater state (it points the optimizer at "
                f"the new parameters), or build the optimizer after loading the model"
            )
        if self.storage_changed and world_size(self.process_group) > 1:  # the wrapper rebuilt since? Ranks agree?
            check_ranks_agree(self.layers, self.t, self.process_group)
        self.t += 1
        self.last_changes, self.last_dropped, self.storage_changed = {}, {}, False
        due: dict[type, dict[str, SparseLayer]] = {}  # policy class -> its layers due now, in model order
        for name, layer in self.layers.items():
            if not layer.policy.is_update_step(self.t, self.total_steps):
                continue
            armed = self._armed.get(name)  # every update step was armed by the step before it (or __init__)
            if isinstance(armed, str):
                self._skip(name, armed)
            else:
                due.setdefault(type(layer.policy), {})[name] = layer
        if due or self.t == 1:  # a Parameter replaced under the optimizer (fully_shard after it) trains nothing
            self._check_optimizer_holds_values()
        ctx = self._context(self.t)
        for policy_class, layers in due.items():  # a class updates its layers together: snfs redistributes
            changes = policy_class.update(layers, {n: self._armed.get(n) for n in layers}, ctx)
            for name, layer in layers.items():  # the captures served: their activations and positions go now,
                self._armed.pop(name, None)  # before the layers move (the next step's are armed below)
                layer.grow_capture = None
            for name, change in changes.items():
                if isinstance(change, str):
                    self._skip(name, change)
                else:
                    self._apply(name, layers[name], change)
        self._arm(self.t + 1)
        return self.last_changes

    def _arm(self, t: int) -> None:
        """Let every layer's policy prepare step ``t``'s update now, from the weights step ``t`` will use."""
        self._armed: dict[str, Capture | str] = {}  # layer -> what its policy armed, or why it skips
        ctx = self._context(t)
        for name, layer in self.layers.items():
            armed = layer.policy.arm(layer, ctx, self._states.get(name))
            if isinstance(armed, Capture):
                armed.process_group = self.process_group
            if armed is not None:
                self._armed[name] = armed
            layer.grow_capture = armed if isinstance(armed, Capture) and armed.observes else None

    def _apply(self, name: str, layer: SparseLayer, change: Change) -> None:
        if change.spec is not None and change.flat is not None and sharded.is_sharded(layer.values):
            _refuse_density_changes_on_sharded([name])  # a policy that changes density without declaring it
        old = layer.values
        apply_change(layer, self.optimizer, change)
        if change.spec is not None:  # a new layout, perhaps of another format (srigl: fan-in to unstructured)
            declare_dynamic_storage({name: layer})
        if layer.values is not old:  # a new values Parameter: wrappers built over the old one must be rebuilt
            self.storage_changed = True
        if change.flat is not None:  # the mask moved (not only the recorded spec)
            self.last_changes[name] = change.changed
            self.last_dropped[name] = change.dropped

    def _skip(self, name: str, why: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(
                f"{name}: mask update at step {self.t} skipped: {why}; mask and values are unchanged",
                SparsecWarning,
                stacklevel=3,  # the caller of step()
            )

    # --- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "step": self.t,
            "total_steps": self.total_steps,
            "generator": self.generator.get_state(),
            "masks": {n: {k: v.clone() for k, v in layer.index_buffers().items()} for n, layer in self.layers.items()},
            "momentum": {n: state.state_dict() for n, state in self._states.items()},  # policy states (snfs)
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise SparsecError(f"updater state version {state.get('version')!r}; this sparsec reads {STATE_VERSION}")
        if state["total_steps"] != self.total_steps:
            raise SparsecError(
                f"the checkpoint was made with total_steps={state['total_steps']}, this updater has "
                f"{self.total_steps}; construct MaskUpdater with the same total_steps"
            )
        if set(state["masks"]) != set(self.layers):
            raise SparsecError(
                f"checkpoint layers {sorted(state['masks'])} differ from the model's {sorted(self.layers)}"
            )
        for layer in self.layers.values():
            if layer.replaced_values is not None:
                replace_parameter(self.optimizer, layer.replaced_values, layer.values, None)
                layer.replaced_values = None
                self.storage_changed = True  # a DDP wrapper built before the load holds the old Parameter
        for name, buffers in state["masks"].items():
            layer = self.layers[name]
            flat = layer.layout.decode(buffers)
            layer.layout.check_positions(flat, what=f"{name} mask in the checkpoint")
            layer.write_positions(flat)
        for name, policy_state in state.get("momentum", {}).items():
            self._states[name].load_state_dict(policy_state)
        self.t = state["step"]
        self.generator.set_state(state["generator"])
        self._arm(self.t + 1)


def _refuse_density_changes_on_sharded(names: list[str]) -> None:
    if names:
        raise SparsecError(
            f"layers {names} are sharded by FSDP2 (fully_shard) and their policy changes their density, which "
            f"needs a new values Parameter inside the sharded module: not supported. Under FSDP2 train with a "
            f"policy that keeps each layer's density (rigl, set, static, srigl with gamma_sal=0), or use "
            f"DistributedDataParallel, where the wrapper is built again (see MaskUpdater)"
        )
