"""``MaskUpdater``: runs every sparse layer's policy on its schedule inside a user's training loop.

Use ``loss.backward(); optimizer.step(); updater.step()``. Step ``t`` counts optimizer steps
from 1. One step ahead of an update the updater *arms* the layer: it decides the drop from the
weights the update step's forward will use (RigL's Algorithm 1), and for gradient-driven policies
installs a capture so that step's backward selects the regrowth chunk by chunk
(``policies.candidates``). ``step()`` after the optimizer step then applies drop and growth.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from sparsec.errors import SparsecError, SparsecWarning
from sparsec.formats import make_layout
from sparsec.nn.layers import SparseLayer
from sparsec.policies.base import GMP, SNFS, SRigL
from sparsec.policies.candidates import GrowCapture, random_selection
from sparsec.policies.decision import apply_growth, choose_drops, drop_scores, n_drop_for, prune_to
from sparsec.policies.optim_state import remap_optimizer_state, replace_parameter
from sparsec.policies.snfs import MomentumShadow, snfs_update
from sparsec.policies.srigl import ActivationCapture, srigl_update
from sparsec.runtime.ops import layer_config

STATE_VERSION = 1


class MaskUpdater:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, total_steps: int, *, seed: int = 0):
        if not isinstance(total_steps, int) or total_steps < 1:
            raise SparsecError(f"total_steps={total_steps!r} must be a positive integer (optimizer steps in training)")
        self.layers: dict[str, SparseLayer] = {n: m for n, m in model.named_modules() if isinstance(m, SparseLayer)}
        if not self.layers:
            raise SparsecError("the model has no sparse layers; apply sparsec.sparsify(model, ...) or @sparse first")
        if optimizer is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [n for n, layer in self.layers.items() if id(layer.values) not in held]
            if missing:
                raise SparsecError(
                    f"the optimizer does not hold the sparse values of {missing}; create the optimizer after "
                    f"sparsify() so it trains model.parameters() of the sparse model"
                )
        self.optimizer, self.total_steps = optimizer, total_steps
        self.t = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.last_changes: dict[str, int] = {}  # layer -> positions grown (pruned, for gmp) at the last update
        self.last_dropped: dict[str, int] = {}  # layer -> positions dropped at the last update
        self._warned: set[str] = set()
        self._shadows = {
            n: MomentumShadow(layer, optimizer) for n, layer in self.layers.items() if isinstance(layer.policy, SNFS)
        }
        self._arm(1)

    def step(self) -> dict[str, int]:
        """Advance one optimizer step; update the masks whose schedule says so. Returns the changes."""
        stale = [n for n, layer in self.layers.items() if layer._stale_values is not None]
        if stale:
            raise SparsecError(
                f"layers {stale} took another density from a checkpoint after the optimizer was built: call "
                f"updater.load_state_dict(...) with the checkpoint's updater state (it points the optimizer at "
                f"the new parameters), or build the optimizer after loading the model"
            )
        self.t += 1
        self.last_changes, self.last_dropped = {}, {}
        momentum_due = {}
        for name, layer in self.layers.items():
            if not layer.policy.is_update_step(self.t, self.total_steps):
                continue
            if isinstance(layer.policy, GMP):
                self._prune(name, layer)
            elif isinstance(layer.policy, SNFS):
                momentum_due[name] = layer
            elif isinstance(layer.policy, SRigL):
                capture, layer.grow_capture = layer.grow_capture, None
                srigl_update(self, name, layer, capture, last=name == next(reversed(self.layers)))
            else:
                self._update(name, layer)
        if momentum_due:  # snfs redistributes across all its layers at once
            snfs_update(self, momentum_due, self._shadows)
        self._arm(self.t + 1)
        return self.last_changes

    def _arm(self, t: int) -> None:
        """Decide the drops of step ``t``'s updates now, from the weights step ``t`` will use."""
        self._armed: dict[str, torch.Tensor | str] = {}  # layer -> dropped slots, or why it is skipped
        for name, layer in self.layers.items():
            policy = layer.policy
            layer.grow_capture = self._shadows.get(name)  # snfs: its momentum shadow sees every backward
            if policy.grow in (None, "momentum") or not policy.is_update_step(t, self.total_steps):
                continue
            scores = drop_scores(layer.layout, layer.values)
            if not bool(torch.isfinite(scores).all()):
                self._armed[name] = "a NaN or Inf weight"
                continue
            kept = layer.positions()
            dropped = choose_drops(scores, n_drop_for(layer.layout, policy.drop_fraction(t, self.total_steps)))
            self._armed[name] = dropped
            if policy.grow == "gradient":
                layer.grow_capture = GrowCapture(layer.layout, kept, dropped, policy.regrow_dropped)
            elif policy.grow == "srigl":
                layer.grow_capture = ActivationCapture(dropped)

    def _skip(self, name: str, why: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(
                f"{name}: mask update at step {self.t} skipped: {why}; mask and values are unchanged",
                SparsecWarning,
                stacklevel=3,
            )

    @torch.no_grad()
    def _update(self, name: str, layer: SparseLayer) -> None:
        armed = self._armed[name]  # every update step was armed by the step before it (or __init__)
        capture, layer.grow_capture = layer.grow_capture, None
        if isinstance(armed, str):
            return self._skip(name, armed)
        layout, kept = layer.layout, layer.positions()
        if layer.policy.grow == "gradient":
            selector = capture.selector if capture is not None else None
            if selector is None or not selector.complete:
                return self._skip(name, "no backward ran through the layer since the updater armed it")
        else:
            selector = random_selection(layout, kept, armed, self.generator, layer.policy.regrow_dropped)
        if not selector.finite:
            return self._skip(name, "a NaN or Inf gradient score")
        new_flat, src = apply_growth(layout, kept, armed, selector.grown())
        remap_optimizer_state(self.optimizer, layer.values, src)
        layer.set_positions(new_flat, src)
        self.last_changes[name] = int((src < 0).sum())
        self.last_dropped[name] = int(armed.numel())

    @torch.no_grad()
    def _prune(self, name: str, layer: SparseLayer) -> None:
        """gmp: prune by magnitude to the schedule's sparsity; storage and optimizer state shrink."""
        target = layer.target_spec
        sparsity = layer.policy.sparsity_at(self.t, self.total_steps, target.sparsity)
        spec = dataclasses.replace(target, sparsity=sparsity)
        layout = layer.layout
        new_layout = make_layout(spec, layout.out_features, layout.in_features, name)
        if new_layout.n_items >= layout.n_items:  # same counts: only the recorded sparsity moves on
            layer.spec, layer.layout = spec, new_layout
            layer._op_config = layer_config(spec, layout.out_features, layout.in_features)
            return
        scores = drop_scores(layout, layer.values)
        if not bool(torch.isfinite(scores).all()):
            return self._skip(name, "a NaN or Inf weight")
        flat, src = prune_to(layout, new_layout, layer.positions(), scores)
        old = layer.set_layout(spec, flat, src)
        replace_parameter(self.optimizer, old, layer.values, src)
        self.last_changes[name] = self.last_dropped[name] = layout.n_items - new_layout.n_items

    # --- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "step": self.t,
            "total_steps": self.total_steps,
            "generator": self.generator.get_state(),
            "masks": {n: {k: v.clone() for k, v in layer.index_buffers().items()} for n, layer in self.layers.items()},
            "momentum": {n: shadow.state_dict() for n, shadow in self._shadows.items()},
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
            if layer._stale_values is not None:
                replace_parameter(self.optimizer, layer._stale_values, layer.values, None)
                layer._stale_values = None
        for name, buffers in state["masks"].items():
            layer = self.layers[name]
            flat = layer.layout.decode(buffers)
            layer.layout.check_positions(flat, what=f"{name} mask in the checkpoint")
            layer.write_positions(flat)
        for name, shadow_state in state.get("momentum", {}).items():
            self._shadows[name].load_state_dict(shadow_state)
        self.t = state["step"]
        self.generator.set_state(state["generator"])
        self._arm(self.t + 1)
