"""Hessian trace (flatness) of a network's training loss by Hutchinson's estimator; ``python -m spacedkd_fast.hessian``.

The Spaced-KD paper explains its gains by flatter minima: a smaller trace of the Hessian of the student's training
loss. ``tr(H)`` of a network with millions of parameters cannot be formed, but it has an unbiased estimator that only
needs Hessian-vector products (Hutchinson)::

    tr(H) = E_v[vᵀ H v]    for v with i.i.d. Rademacher (±1) entries, since E[v vᵀ] = I

so ``tr(H) ≈ mean over P probes of vᵀHv``, with standard error ``std(vᵀHv) / √P``. ``Hv`` comes from double
backward: ``H v = ∇_θ (∇_θ L · v)``. The loss ``L`` is the cross-entropy of the network's logits, averaged over a
fixed subset of training images, with the network in eval mode (BatchNorm on its running statistics, so ``L`` is
a fixed function of the weights rather than of the batch composition).

Python API::

    hessian_trace(model, batches, probes=100) -> TraceEstimate(trace, stderr, probes, samples, values)

Command line (the student or teacher of a saved run, on the first N images of a fixed shuffle of its training set)::

    python -m spacedkd_fast.hessian --checkpoint runs/spaced/last.pt --model student --samples 1000 --probes 200
    python -m spacedkd_fast.hessian --checkpoint runs/online/last.pt --model student --samples 1000 --probes 200 \\
        --json runs/online/hessian.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spacedkd_fast.config import cli_names, setting_name
from spacedkd_fast.engine.progress import say

__all__ = ["TraceEstimate", "hessian_trace", "hessian_trace_of_checkpoint", "main"]

ROLES = ("student", "teacher")
DEFAULT_BATCH_SIZE = 256


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimate of ``tr(H)``.

    Attributes:
        trace: mean of the probe values ``vᵀHv``.
        stderr: standard error of that mean, ``sample std (ddof=1) / √probes``; NaN with a single probe.
        probes: number of Rademacher probes P.
        samples: number of data samples the loss averages over.
        values: every probe's ``vᵀHv``, in probe order (P floats), so callers can re-aggregate.
    """

    trace: float
    stderr: float
    probes: int
    samples: int
    values: tuple[float, ...]


def hessian_trace(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], *, probes: int = 100,
                  loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, seed: int = 0,
                  progress: bool = False, params: Sequence[nn.Parameter] | None = None) -> TraceEstimate:
    """Hutchinson estimate of the trace of the Hessian of ``model``'s loss over ``batches``.

    The loss is the sample-weighted mean ``L = Σ_b n_b · loss_fn(logits_b, labels_b) / Σ_b n_b`` over the batches
    (``n_b`` the batch's leading size), i.e. the mean over all samples when ``loss_fn`` returns a batch mean, however
    the samples are split into batches. ``H`` is the Hessian of ``L`` with respect to ``params``.

    The model runs in eval mode (BatchNorm on its running statistics, Dropout/DropPath off): the loss is then a fixed
    function of the weights, the same one whichever batches the samples fall into. Every module's mode is restored
    afterwards, and no parameter's ``.grad`` is read or written (gradients come from ``torch.autograd.grad``).

    Cost: each probe costs about one forward + two backward passes over the subset (a double backward re-traverses
    the forward and backward graphs; measured: 2.3x a training forward+backward for resnet8 on a CPU, about 2.4 s per
    probe for 1,000 32x32 images on 2 cores). The batches are the outer loop: per batch, one forward and one backward
    with ``create_graph=True`` give ``∇L_b``; that graph is kept while every probe takes its ``H_b v = ∇(∇L_b · v)``,
    and the per-probe values are summed over the batches. So the forward and first backward are shared by all
    probes, and memory is one batch's double-backward graph, whatever the number of batches. The probe vectors are
    drawn again from the seeded generator for each batch (the same P vectors each time).

    Args:
        model: maps ``inputs`` to logits ``(B, C)``; an output tuple uses its first element (e.g. the engine's
            ``(logits, features)``); multi-exit logits ``(E, B, C)`` (one more dimension than ``(B, C)`` for
            ``(B,)`` labels) use exit 0, the deepest exit of the BYOT models. ``loss_fn`` sees the selected logits.
        batches: the fixed data, a sequence of ``(inputs, labels)`` already on the model's device, e.g. float
            ``(B, C, H, W)`` images and int64 ``(B,)`` labels; ``B ≥ 1`` may differ between batches.
        probes: number of Rademacher probes P ≥ 1 (the standard error falls as ``1/√P``).
        loss_fn: ``(logits, labels) -> ()`` batch-mean loss; default ``F.cross_entropy`` (mean reduction).
        seed: seed of the ``torch.Generator`` (on the parameters' device) that draws the probes: the same seed gives
            the same probes, hence the same values, on the same device.
        progress: show a tqdm bar over the ``probes × len(batches)`` Hessian-vector products.
        params: the parameters θ of ``H = ∇²_θ L`` (all on one device); default: every parameter of ``model`` that
            requires grad. The probes are drawn in the widest dtype among them (float64 if any is float64).

    Returns:
        A :class:`TraceEstimate`.

    Raises:
        ValueError / TypeError naming the argument: probes < 1, empty or malformed batches, parameters that do not
        require grad or span several devices, a non-scalar loss, or a loss that does not depend on ``params``.
    """
    if isinstance(probes, bool) or not isinstance(probes, Integral) or probes < 1:
        raise ValueError(f"hessian_trace: probes must be an integer >= 1, got {probes!r}")
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise TypeError(f"hessian_trace: seed must be an integer, got {type(seed).__name__}")
    probes = int(probes)
    params = _resolve_params(model, params)
    device = params[0].device
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    count = sum(p.numel() for p in params)

    def rademacher() -> Iterator[Tensor]:
        # A fresh generator per call: every batch sees the same P probes, so the per-batch values add up.
        generator = torch.Generator(device=device).manual_seed(int(seed))
        for _ in range(probes):
            yield torch.randint(0, 2, (count,), generator=generator, device=device, dtype=dtype).mul_(2).sub_(1)

    values, samples = _quadratic_forms(model, batches, rademacher, probes, loss_fn=loss_fn, params=params,
                                       progress=progress)
    mean = math.fsum(values) / probes
    if probes > 1:
        variance = math.fsum((x - mean) ** 2 for x in values) / (probes - 1)
        stderr = math.sqrt(variance / probes)
    else:
        stderr = math.nan
    return TraceEstimate(trace=mean, stderr=stderr, probes=probes, samples=samples, values=tuple(values))


# ---- the Hessian-vector products -----------------------------------------------------------------------------------

def _resolve_params(model: nn.Module, params: Sequence[nn.Parameter] | None) -> list[Tensor]:
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("hessian_trace: model has no parameter that requires grad")
    else:
        params = list(params)
        if not params:
            raise ValueError("hessian_trace: params is empty")
        for i, p in enumerate(params):
            if not isinstance(p, Tensor) or not p.requires_grad or not p.is_floating_point():
                raise ValueError(f"hessian_trace: params[{i}] must be a floating tensor that requires grad")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("hessian_trace: params lists a parameter twice")
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"hessian_trace: params must all be on one device, found {sorted(map(str, devices))}")
    return params


def _check_batches(batches: Sequence[tuple[Tensor, Tensor]]) -> list[int]:
    """The leading size of every batch (validated)."""
    sizes = []
    for i, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2 \
                or not all(isinstance(t, Tensor) for t in batch):
            raise TypeError(f"hessian_trace: batches[{i}] must be an (inputs, labels) pair of tensors")
        inputs, labels = batch
        if inputs.dim() == 0 or labels.dim() == 0 or inputs.shape[0] != labels.shape[0] or inputs.shape[0] == 0:
            raise ValueError(f"hessian_trace: batches[{i}] must hold B >= 1 inputs and B labels, got shapes "
                             f"{tuple(inputs.shape)} and {tuple(labels.shape)}")
        sizes.append(int(inputs.shape[0]))
    if not sizes:
        raise ValueError("hessian_trace: batches is empty")
    return sizes


def _select_logits(output, labels: Tensor) -> Tensor:
    """The logits the loss is taken on: the first element of a tuple output, exit 0 of multi-exit ``(E, B, C)``."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, Tensor):
        raise TypeError(f"hessian_trace: the model must return logits (a tensor, or a tuple starting with one), "
                        f"got {type(output).__name__}")
    if output.dim() == labels.dim() + 2:  # (E, B, C) for (B,) labels: exits stacked, deepest first
        output = output[0]
    return output


def _quadratic_forms(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]],
                     vectors: Callable[[], Iterator[Tensor]], count: int, *,
                     loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                     params: Sequence[nn.Parameter] | None = None, progress: bool = False) -> tuple[list[float], int]:
    """``vᵀHv`` for ``count`` vectors ``v``, with ``H`` the Hessian of the sample-weighted mean loss (see
    :func:`hessian_trace`, which this computes for Rademacher ``v``).

    Args:
        vectors: called once per batch, returns an iterator over the same ``count`` flat vectors each time, each
            ``(Σ numel(params),)`` on the parameters' device, the parameters' entries concatenated in order.

    Returns:
        ``(values, samples)``: ``count`` floats (accumulated in float64) and the total number of samples.
    """
    params = _resolve_params(model, params)
    sizes = _check_batches(batches)
    total = sum(sizes)
    device = params[0].device
    numels = [p.numel() for p in params]
    values = torch.zeros(count, dtype=torch.float64, device=device)  # on the device: no host sync per product
    modes = [(module, module.training) for module in model.modules()]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=count * len(batches), unit="hvp", dynamic_ncols=True, mininterval=0.5, leave=False,
                   desc=f"tr(H): {count} probes x {len(batches)} batches")
    model.eval()
    try:
        with torch.enable_grad():
            for b, ((inputs, labels), size) in enumerate(zip(batches, sizes)):
                logits = _select_logits(model(inputs), labels)
                loss = loss_fn(logits, labels) if loss_fn is not None else F.cross_entropy(logits, labels)
                if not isinstance(loss, Tensor) or loss.dim() != 0:
                    shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                    raise ValueError(f"hessian_trace: loss_fn must return a scalar (the batch mean), got {shape}")
                if not loss.requires_grad:
                    raise ValueError("hessian_trace: the loss does not depend on params (no autograd graph; "
                                     "called under torch.inference_mode?)")
                # Weighting each batch's mean by its share of the samples makes L the mean over all samples.
                grads = torch.autograd.grad(loss * (size / total), params, create_graph=True, allow_unused=True,
                                            materialize_grads=True)
                # A gradient without a graph is constant in θ: its rows of H are zero, nothing to differentiate.
                live = [i for i, g in enumerate(grads) if g.requires_grad]
                produced = 0
                for k, v in enumerate(vectors()):
                    if k >= count:
                        break
                    if v.shape != (sum(numels),):
                        raise ValueError(f"hessian_trace: probe vectors must be flat ({sum(numels)},), got "
                                         f"{tuple(v.shape)}")
                    if live:
                        pieces = v.split(numels)
                        hv = torch.autograd.grad([grads[i] for i in live], params,
                                                 grad_outputs=[pieces[i].view_as(grads[i]).to(grads[i].dtype)
                                                               for i in live],
                                                 retain_graph=True, allow_unused=True, materialize_grads=True)
                        flat = torch.cat([h.reshape(-1).to(v.dtype) for h in hv])
                        values[k] += torch.dot(flat, v).double()
                    produced += 1
                    if bar is not None:
                        bar.update()
                if produced != count:
                    raise ValueError(f"hessian_trace: expected {count} probe vectors for batches[{b}], got "
                                     f"{produced}")
                del grads, loss, logits  # free this batch's graph before the next forward
    finally:
        for module, training in modes:  # exactly as before, including submodules the caller froze in eval mode
            module.training = training
        if bar is not None:
            bar.close()
    return values.tolist(), total


# ---- command line --------------------------------------------------------------------------------------------------

@dataclass
class _Target:
    """What the CLI measures: a role's network on the first ``samples`` images of a run's training set."""

    path: Path
    role: str
    arch: str
    multi_exit: bool
    model: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    config: dict
    steps: int | None
    epoch: int | None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spacedkd_fast.hessian",
        description=(
            "Hutchinson estimate of tr(H), the trace of the Hessian of a trained network's cross-entropy loss on\n"
            "a fixed subset of its training set (flatness; the Spaced-KD paper's explanation of its gains):\n"
            "tr(H) ~ mean of v'Hv over Rademacher probes v, with Hv from double backward. The network runs in\n"
            "eval mode (BatchNorm on running statistics) on un-augmented, normalized images."),
        epilog=(
            "Data: the first --samples images of a fixed shuffle of the run's training set (its --subset, if it\n"
            "had one), the same whatever --seed; no augmentation. --seed only changes the probes.\n"
            "Self mode (BYOT): the checkpoint holds one multi-exit network, --model student; exit 0 (the deepest)\n"
            "is measured.\n"
            "Cost: each probe is about one forward + two backward passes over the samples (resnet8, 1,000\n"
            "images: ~2.4 s per probe on 2 CPU cores); memory: one --batch-size batch's double-backward graph."),
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=30, width=110),
    )
    parser.add_argument("--checkpoint", required=True, metavar="RUN/last.pt",
                        help="a training run's last.pt (or the run folder holding it)")
    parser.add_argument("--model", required=True, choices=ROLES,
                        help="which network of the run: student (the multi-exit network in self mode) or teacher")
    parser.add_argument("--samples", required=True, type=int, metavar="N",
                        help="training images the loss averages over")
    parser.add_argument("--probes", required=True, type=int, metavar="P",
                        help="Rademacher probes (the standard error falls as 1/sqrt(P))")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="B",
                        help="images per forward pass; memory holds one batch's double-backward graph, the result "
                             f"does not depend on it beyond rounding (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the probes (default: 0)")
    parser.add_argument("--device", default="auto", metavar="D",
                        help="auto (cuda if available), cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--json", metavar="OUT.json",
                        help="also write the estimate, every probe value, the checkpoint, role and run config here")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def _load_checkpoint(argument: str) -> tuple[Path, dict]:
    from spacedkd_fast.engine.checkpoint import READABLE_FORMATS
    from spacedkd_fast.engine.outputs import CHECKPOINT

    path = Path(argument)
    if path.is_dir():
        path = path / CHECKPOINT
    named = f"{setting_name('checkpoint')} {argument}"
    if not path.is_file():
        raise FileNotFoundError(f"{named}: no such file")
    not_ours = f"{named}: not a spacedkd_fast checkpoint"
    try:
        # weights_only: the engine's checkpoints hold only tensors and plain containers, and a file named by the user
        # must not be able to run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (UnpicklingError, RuntimeError, EOFError...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{not_ours} (torch.load failed: {reason})") from exc
    if not isinstance(state, dict) or not {"format", "config", "roles"} <= set(state) \
            or not isinstance(state["config"], dict) or not isinstance(state["roles"], dict) \
            or not all(isinstance(r, dict) and "model" in r for r in state["roles"].values()):
        raise ValueError(f"{not_ours} (no format/config/roles entries; expected a training run's last.pt)")
    if state["format"] not in READABLE_FORMATS:
        raise ValueError(f"{named}: checkpoint format {state['format']!r}, this version reads "
                         f"{', '.join(map(str, READABLE_FORMATS))}")
    return path, state


def _load_target(argument: str, role: str, samples: int, batch_size: int, device: torch.device) -> _Target:
    """Rebuild ``role``'s network from the checkpoint and its first ``samples`` training images, with the engine's
    own code (config, dataset loader, subset, model registry, FeatureForward wrapper, normalization)."""
    from spacedkd_fast.config import TrainConfig
    from spacedkd_fast.data import load_dataset
    from spacedkd_fast.data.augment import normalize
    from spacedkd_fast.engine.feeds import subset_dataset
    from spacedkd_fast.engine.roles import FeatureForward
    from spacedkd_fast.models import build_model, is_multi_exit

    path, state = _load_checkpoint(argument)
    named = f"{setting_name('checkpoint')} {argument}"
    try:
        cfg = TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{named}: its config does not load ({exc})") from exc
    roles = state["roles"]
    if role not in roles:
        raise ValueError(f"{setting_name('role', flag='model')} {role}: this checkpoint (mode {cfg.mode!r}) has no "
                         f"{role}; available: {', '.join(sorted(roles))}")
    arch = cfg.teacher_arch if role == "teacher" else cfg.student_arch
    custom = [what for what, name in (("model", arch), ("dataset", cfg.dataset)) if name.startswith("custom:")]
    if custom:
        raise ValueError(f"{named}: the run's {' and '.join(custom)} came from Python "
                         f"({arch if 'model' in custom else cfg.dataset}), which this command cannot rebuild; load "
                         f"last.pt['roles'][{role!r}]['model'] into spacedkd_fast.engine.roles.FeatureForward(your "
                         f"module) and call spacedkd_fast.hessian.hessian_trace(model, batches)")

    dataset = load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size)
    if cfg.subset is not None:
        dataset = subset_dataset(dataset, cfg.subset)  # the images the run trained on
    available = len(dataset.train_labels)
    if samples > available:
        raise ValueError(f"{setting_name('samples')} {samples} is larger than the run's training set "
                         f"({dataset.name}: {available} images)")
    # The first `samples` images of the fixed, seed-independent shuffle that --subset uses.
    dataset = subset_dataset(dataset, samples)

    channels, size = dataset.image_shape[0], dataset.image_shape[1]
    model = FeatureForward(build_model(arch, num_classes=dataset.num_classes, in_channels=channels,
                                       image_size=size))
    try:
        model.load_state_dict(roles[role]["model"])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise ValueError(f"{named}: the {role} weights do not fit a {arch} for {dataset.name} "
                         f"({str(exc).strip().splitlines()[0]})") from exc
    model = model.to(device)

    images, labels = dataset.train_images, dataset.train_labels
    batches = []
    for start in range(0, samples, batch_size):
        chunk = images[start:start + batch_size].to(device)
        # float32 regardless of the run's --precision / --channels-last: bf16 would swamp the curvature in rounding.
        batches.append((normalize(chunk, dataset.mean, dataset.std), labels[start:start + batch_size].to(device)))
    history = state.get("history") or []
    return _Target(path=path, role=role, arch=arch, multi_exit=is_multi_exit(arch), model=model, batches=batches,
                   config=cfg.to_dict(), steps=roles[role].get("steps"),
                   epoch=history[-1].get("epoch") if history else None)


def hessian_trace_of_checkpoint(checkpoint: str | Path, *, role: str = "student", samples: int = 1000,
                                probes: int = 100, batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
                                device: str = "auto", progress: bool = False) -> TraceEstimate:
    """``python -m spacedkd_fast.hessian`` from Python: the trace estimate of a run's ``role`` network."""
    from spacedkd_fast.engine.runtime import resolve_device

    check_counts(samples=samples, probes=probes, batch_size=batch_size)
    target = _load_target(str(checkpoint), role, samples, batch_size, resolve_device(device))
    return hessian_trace(target.model, target.batches, probes=probes, seed=seed, progress=progress)


def _run_name(path: Path) -> str:
    from spacedkd_fast.engine.outputs import CHECKPOINT

    return str(path.parent) if path.name == CHECKPOINT else str(path)


def format_result(estimate: TraceEstimate, role: str, run: str) -> str:
    """``tr(H) = 1234.5 ± 12.3 (standard error, 200 probes, 1000 samples, student of RUN)``."""
    if math.isfinite(estimate.stderr) and estimate.stderr > 0:
        # Three significant digits of the standard error; the trace to the same decimal place.
        decimals = max(0, 2 - math.floor(math.log10(estimate.stderr)))
        spread = f"{estimate.trace:.{decimals}f} ± {estimate.stderr:.{decimals}f} (standard error"
    elif estimate.stderr == 0:  # every probe gave the same value (e.g. H = 0)
        spread = f"{estimate.trace:.6g} ± 0 (standard error"
    else:  # a single probe
        spread = f"{estimate.trace:.6g} (no standard error"
    probes = f"{estimate.probes} probe{'s' if estimate.probes != 1 else ''}"
    return f"tr(H) = {spread}, {probes}, {estimate.samples} samples, {role} of {run})"


def check_counts(**counts) -> None:
    """Refuse a count < 1 (``samples``, ``probes``, ``batch_size``) before any loading: zero samples or probes
    would otherwise load the run and fail deep in :func:`hessian_trace`. Named as the caller wrote it
    (``--samples`` on the command line, ``samples=`` from Python)."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise TypeError(f"{setting_name(name)} must be an integer >= 1, got {value!r} ({type(value).__name__})")
        if value < 1:
            raise ValueError(f"{setting_name(name)} must be >= 1, got {value!r}")


def main(argv: list[str] | None = None) -> int:
    from spacedkd_fast.engine.runtime import resolve_device

    args = build_parser().parse_args(argv)
    try:
        with cli_names():  # the messages name the flags
            check_counts(samples=args.samples, probes=args.probes, batch_size=args.batch_size)
            if args.json is not None and not Path(args.json).resolve().parent.is_dir():
                raise FileNotFoundError(f"--json {args.json}: the folder {Path(args.json).parent} does not exist")
            device = resolve_device(args.device)
            if device.type == "cpu":
                torch.set_flush_denormal(True)  # as the trainer: denormal activations are ~10x slower on x86
            target = _load_target(args.checkpoint, args.model, args.samples, args.batch_size, device)
    except (ValueError, FileNotFoundError) as exc:
        say(f"error: {exc}")
        return 2
    start = time.perf_counter()
    estimate = hessian_trace(target.model, target.batches, probes=args.probes, seed=args.seed,
                             progress=args.progress)
    seconds = time.perf_counter() - start
    print(format_result(estimate, target.role, _run_name(target.path)))
    if args.json is not None:
        record = dataclasses.asdict(estimate)
        record["stderr"] = estimate.stderr if math.isfinite(estimate.stderr) else None  # JSON has no NaN
        record |= {"checkpoint": str(target.path), "role": target.role, "arch": target.arch,
                   "exit": 0 if target.multi_exit else None, "seed": args.seed, "batch_size": args.batch_size,
                   "device": str(device), "seconds": seconds, "seconds_per_probe": seconds / estimate.probes,
                   "role_steps": target.steps, "epoch": target.epoch, "config": target.config}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
