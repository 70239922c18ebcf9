"""The engine with your own parts: timm models, a TensorDataset, your optimizers, scheduler and loss.

    python examples/timm_tensordataset.py                       # ResNet-18 -> ResNet-10t on 4,000 digits, CPU
    python examples/timm_tensordataset.py --subset 512 --epochs 2 --out runs/timm --stop-after 20   # "Ctrl-C"
    python examples/timm_tensordataset.py --subset 512 --epochs 2 --out runs/timm --resume          # continue

Trainer runs everything the command line has (spaced schedule and exact replay, overlap on CUDA, DDP under
torchrun, checkpoints and exact resume, metrics.jsonl / CSV / curves.png, batches.jsonl with --trace) on parts
that are all yours here. Needs timm (pip install timm); nothing is downloaded.
"""

import argparse

import timm
import torch
from torch.utils.data import TensorDataset

import spacedkd_fast as skd
from spacedkd_fast.data import load_dataset
from spacedkd_fast.engine import Callback, Trainer, TrainingInterrupted
from spacedkd_fast.train import default_out


class StopAfter(Callback):
    """Ask the run to stop (as Ctrl-C does: last.pt is written first) once it has taken ``steps`` steps."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, trainer, step) -> None:
        if trainer.actions >= self.steps:
            trainer.request_stop(f"--stop-after {self.steps}")


def digits(subset: int | None):
    """Normalized (N, 1, 32, 32) float digits as TensorDatasets (train: a fixed shuffle's first N; test: 1,000)."""
    data = load_dataset("embedded")
    pick = torch.randperm(len(data.train_labels), generator=torch.Generator().manual_seed(0))[:subset]
    x = (data.train_images[pick].float() / 255 - data.mean[0]) / data.std[0]
    test_x = (data.test_images.float() / 255 - data.mean[0]) / data.std[0]
    return TensorDataset(x, data.train_labels[pick]), TensorDataset(test_x, data.test_labels)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--space", type=float, default=1.0)
    parser.add_argument("--subset", type=int, default=None, help="train on the first N digits")
    parser.add_argument("--out", default=None, help="run folder (default: runs/online-<date>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--stop-after", type=int, default=None, help="interrupt after N optimizer steps")
    parser.add_argument("--trace", action="store_true", help="write batches.jsonl (sha1 of every step's batch)")
    args = parser.parse_args(argv)
    if args.resume and not args.out:
        parser.error("--resume continues the run in --out DIR: give it")
    out = args.out or default_out("online")

    train, test = digits(args.subset)
    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
    student = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1)
    trainer = Trainer(
        teacher=teacher, student=student, train_data=train, eval_data=test,
        teacher_optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4),
        student_optimizer=lambda params: torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05),
        student_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs),
        loss=skd.KDLoss(temperature=4.0, alpha=0.9),
        student_features="fc", teacher_features="fc", beta=0.01,  # the feature term on the classifiers' inputs
        callbacks=[StopAfter(args.stop_after)] if args.stop_after else [],
        mode="online", space=args.space, epochs=args.epochs, batch_size=64, trace_batches=args.trace,
        log_every=10, out=out, resume=out if args.resume else None, progress=False,
    )
    try:
        summary = trainer.fit()
    except TrainingInterrupted as exc:
        print(f"interrupted: {exc}")
        return None
    print(summary.table())
    return summary


if __name__ == "__main__":
    main()
