"""``Trainer`` callback for a model patched by
:func:`trainops.integrations.transformers.apply_global_load_balancing`.

``Trainer`` owns the optimizer, so nothing else marks the end of a global batch: the
callback resets the load-balancing counts at the start and at the end of every optimizer
step (the global scope then covers exactly that step's micro-batches on all ranks, and
evaluation forwards never leak into it), and logs, with Trainer's own logs:

* ``aux_loss``: mean of the patched model's ``aux_loss`` over the training forwards since
  the last log, over all ranks (before ``router_aux_loss_coef``, on the patch's convention);
* ``expert_load_max_over_mean``: per layer, the largest expert count of an optimizer step
  (all ranks, all micro-batches) over the mean count (1.0 is perfect balance, N_E/K the
  worst), averaged over layers and over the steps since the last log;
* ``expert_load_cv``: the same counts' coefficient of variation (std/mean; 0 is balance).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from trainops.integrations.transformers import patched_models

__all__ = ["GlobalLoadBalancingCallback", "add_global_load_balancing_callback"]

LOG_KEYS = ("aux_loss", "expert_load_max_over_mean", "expert_load_cv")


class GlobalLoadBalancingCallback(TrainerCallback):
    """Per optimizer step: reset the global-scope counts; log the aux loss and the expert
    load balance (see the module docstring). Needs every rank to run the training loop in
    step (one small all-reduce per optimizer step, over the patch's ``group``).

    ``Trainer(callbacks=[GlobalLoadBalancingCallback()])`` puts the values in
    ``trainer.state.log_history`` and the console log; the ``report_to`` integrations
    (TensorBoard, W&B, ...) run before user callbacks, so to reach them too install it with
    :func:`add_global_load_balancing_callback`, which puts it first.
    """

    def __init__(self):
        self._steps = []  # per optimizer step since the last log: (aux sum, forwards, max/mean, cv)

    @staticmethod
    def _patched(model) -> list:
        found = [] if model is None else patched_models(model)
        if not found:
            raise ValueError("GlobalLoadBalancingCallback: the Trainer's model is not patched; call "
                             "trainops.integrations.transformers.apply_global_load_balancing(model) first")
        return found

    @staticmethod
    def _reset(lms) -> None:
        for lm in lms:
            for router in lm._trainops_lbl_patch["routers"]:
                for lbl in router._trainops_lbl_losses:
                    lbl.reset()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        lms = self._patched(model)
        self._steps = []
        for lm in lms:
            lm._trainops_lbl_patch["state"].take_metrics()
            lm._trainops_lbl_patch["state"].recording = True
        self._reset(lms)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        for lm in self._patched(model):
            lm._trainops_lbl_patch["state"].recording = False

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        # Forwards between steps (evaluation, a user's own) are not this step's.
        lms = self._patched(model)
        self._reset(lms)
        for lm in lms:
            lm._trainops_lbl_patch["state"].take_metrics()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        lms = self._patched(model)
        for lm in lms:
            self._steps.append(_step_metrics(lm))
        self._reset(lms)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._steps or logs is None:
            return
        aux = sum(s[0] for s in self._steps)
        forwards = sum(s[1] for s in self._steps)
        values = {"aux_loss": aux / forwards if forwards else float("nan"),
                  "expert_load_max_over_mean": sum(s[2] for s in self._steps) / len(self._steps),
                  "expert_load_cv": sum(s[3] for s in self._steps) / len(self._steps)}
        self._steps = []
        logs.update(values)
        # Trainer.log files a copy of logs in log_history before the callbacks run.
        if state.log_history and all(k in state.log_history[-1] for k in logs if k not in values):
            state.log_history[-1].update(values)


def _step_metrics(lm) -> tuple:
    """(aux sum, forwards, mean over layers of max/mean load, of load CV) of one optimizer
    step, summed over the ranks of the patch's group."""
    patch = lm._trainops_lbl_patch
    aux_sum, forwards, loads = patch["state"].take_metrics()
    routers = patch["routers"]
    shape = (len(routers), routers[0].num_experts)
    device = routers[0]._trainops_lbl_losses[0].acc_counts.device
    # float64: integer counts stay exact up to 2**53
    packed = torch.zeros(2 + shape[0] * shape[1], dtype=torch.float64, device=device)
    if loads is not None:
        packed[0] = aux_sum.to(device, torch.float64)
        packed[1] = forwards
        packed[2:] = loads.to(device, torch.float64).reshape(-1)
    group = patch["group"]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(packed, group=group)
    loads = packed[2:].reshape(shape)
    mean = loads.mean(dim=1)
    ok = mean > 0
    if not bool(ok.any()):
        return float(packed[0]), int(packed[1]), float("nan"), float("nan")
    ratio = (loads.max(dim=1).values[ok] / mean[ok]).mean()
    cv = (loads.std(dim=1, unbiased=False)[ok] / mean[ok]).mean()
    return float(packed[0]), int(packed[1]), float(ratio), float(cv)


def add_global_load_balancing_callback(trainer) -> GlobalLoadBalancingCallback:
    """Install a :class:`GlobalLoadBalancingCallback` in ``trainer`` ahead of its other
    callbacks, so that the ``report_to`` integrations log its values too; returns it."""
    callback = GlobalLoadBalancingCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
