"""Classification: train with AdamW + cross entropy for the budget, judge on the test split.

Model contract: ``logits = model(x)`` where ``x`` is what the dataset's collate gives
(an image batch, a video batch, or NaViT's list of variable-size images).  Returns
accuracy (top-5 too when there are at least 10 classes), test loss, and writes a
confusion matrix artifact.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Task, TrialContext, check_finite, register_task


@dataclass
class ClassifyOptions:
    lr: float = 1e-3                 # AdamW peak learning rate
    weight_decay: float = 0.05       # AdamW decoupled weight decay
    batch_size: int = 64
    eval_batch_size: int = 256
    warmup_steps: int = 0            # linear warm-up, then cosine decay to 0 over the budget
    label_smoothing: float = 0.0
    grad_clip: float = 1.0           # max global grad norm (0: off)
    log_every: int = 10              # train_loss logged every N steps

    def validate(self) -> None:
        if not 0 < self.lr < 1:
            raise ConfigError(f"lr must be in (0, 1), got {self.lr}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("batch_size and eval_batch_size must be >= 1")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ConfigError("weight_decay, grad_clip and warmup_steps must be >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.log_every < 1:
            raise ConfigError("log_every must be >= 1")


def lr_at(step: int, opts: ClassifyOptions, total: int) -> float:
    """Linear warm-up then cosine decay (step is 0-based)."""
    if opts.warmup_steps and step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    span = max(1, total - opts.warmup_steps)
    return 0.5 * opts.lr * (1 + math.cos(math.pi * min(1.0, (step - opts.warmup_steps) / span)))


def to_device(x, device):
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x.to(device, non_blocking=True)


def infinite(loader):
    while True:
        yield from loader


@torch.no_grad()
def evaluate(model, loader, device, num_classes: int) -> dict:
    """Accuracy, top-5 (>= 10 classes), mean loss and the confusion matrix."""
    model.eval()
    n = correct = correct5 = 0
    loss_sum = 0.0
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for x, y in loader:
        x, y = to_device(x, device), y.to(device)
        logits = model(x).float()  # (N, classes)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        pred = logits.argmax(1)
        correct += int((pred == y).sum())
        if num_classes >= 10:
            top5 = logits.topk(5, dim=1).indices
            correct5 += int((top5 == y[:, None]).any(1).sum())
        np.add.at(confusion, (y.cpu().numpy(), pred.cpu().numpy()), 1)
        n += len(y)
    model.train()
    out = {"accuracy": correct / n, "test_loss": loss_sum / n, "confusion": confusion}
    if num_classes >= 10:
        out["top5_accuracy"] = correct5 / n
    return out


def save_confusion(confusion: np.ndarray, names: list[str] | None, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = confusion.shape[0]
    fig, ax = plt.subplots(figsize=(1.2 + 0.35 * k, 1.0 + 0.35 * k), dpi=100)
    ax.imshow(confusion, cmap="Blues")
    ticks = names or [str(i) for i in range(k)]
    ax.set_xticks(range(k), ticks, rotation=90, fontsize=7)
    ax.set_yticks(range(k), ticks, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


@register_task
class ClassifyTask(Task):
    name = "classify"
    Options = ClassifyOptions
    metrics = ("accuracy", "top5_accuracy", "test_loss", "train_loss", "train_time_s",
               "train_images_per_s")

    def check(self, options, model_cfg, data) -> None:
        nc = getattr(model_cfg, "num_classes", None)
        if nc is not None and nc != data.info.get("num_classes", nc):
            raise ConfigError(f"model num_classes={nc} but the data has "
                              f"{data.info['num_classes']} classes; leave num_classes unset")
        if nc is None:
            raise ConfigError("classify needs a model config with a num_classes field")

    def run(self, ctx: TrialContext) -> dict:
        opts: ClassifyOptions = ctx.options
        model, device, budget = ctx.model, ctx.device, ctx.budget
        num_classes = ctx.data.info["num_classes"]
        train = ctx.data.loader("train", opts.batch_size, shuffle=True, generator=ctx.generator,
                                drop_last=len(ctx.data.train) > opts.batch_size)
        test = ctx.data.loader("test", opts.eval_batch_size, shuffle=False)
        decay, no_decay = [], []
        for n_, p in model.named_parameters():
            (no_decay if p.ndim < 2 or "pos" in n_ or "token" in n_ else decay).append(p)
        optim = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr)
        model.train()
        t0 = time.perf_counter()
        window, seen, step = [], 0, 0
        batches = infinite(train)
        for step in range(1, budget.steps + 1):
            for g in optim.param_groups:
                g["lr"] = lr_at(step - 1, opts, budget.steps)
            x, y = next(batches)
            x, y = to_device(x, device), y.to(device)
            logits = model(x)  # (N, classes)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=opts.label_smoothing)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if opts.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
            optim.step()
            window.append(check_finite(loss, step))
            seen += len(y)
            if step % opts.log_every == 0 or step == budget.steps:
                ctx.log_metrics({"train_loss": float(np.mean(window[-opts.log_every:]))}, step)
            if step % budget.report_every == 0 and step < budget.steps:
                ev = evaluate(model, test, device, num_classes)
                ctx.log_metrics({"val_accuracy": ev["accuracy"], "val_loss": ev["test_loss"]}, step)
                ctx.report(ev["accuracy"], step)  # intermediate value: accuracy (pruning)
            if budget.max_time_s and time.perf_counter() - t0 > budget.max_time_s:
                break
        train_time = time.perf_counter() - t0
        extra = model.extra_metrics() if hasattr(model, "extra_metrics") else {}
        ev = evaluate(model, test, device, num_classes)
        path = ctx.workdir / "confusion_matrix.png"
        save_confusion(ev.pop("confusion"), ctx.data.class_names, path)
        ctx.log_artifact(path)
        out = {**ev, "train_loss": float(np.mean(window[-opts.log_every:])),
               "train_steps": step, "train_time_s": train_time,
               "train_images_per_s": seen / max(train_time, 1e-9)}
        out.update({k: float(v) for k, v in extra.items()})
        return out
