"""What the examples share: progress bars, the machine's description, memory, thread settings, the round-robin
schedule over heads, results files and plots."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

import sparsetarget

from ._memory import reset_peak, rss_mib


class Progress:
    """A one-line progress bar on stderr, redrawn at most a few times a second."""

    def __init__(self, total: float, label: str, width: int = 28, stream: Any = None) -> None:
        self.total = max(float(total), 1e-9)
        self.label = label
        self.width = width
        self.stream = sys.stderr if stream is None else stream
        self._last = 0.0

    def update(self, done: float, text: str = "", force: bool = False) -> None:
        """Show ``done`` out of the total, with ``text`` after the bar."""
        now = time.perf_counter()
        if not force and now - self._last < 0.3:
            return
        self._last = now
        filled = int(self.width * min(done / self.total, 1.0))
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {text}   ")
        self.stream.flush()

    def close(self, text: str = "") -> None:
        """Draw the full bar and end the line."""
        self.update(self.total, text, force=True)
        self.stream.write("\n")
        self.stream.flush()


def machine() -> str:
    """CPU model, cores, memory, OS, Python/torch/sparsetarget versions and the thread settings."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f", {int(f.readline().split()[1]) / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    info = sparsetarget.build_info()
    return (f"{cpu}, {os.cpu_count()} cores{mem}; {platform.system()} {platform.release()}; Python "
            f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"sparsetarget {info['version']} ({info['blas']}, {sparsetarget.get_num_threads()} BLAS threads)")


def set_threads(torch_threads: int, blas_threads: int) -> None:
    """torch's intra-op threads and the sparsetarget core's BLAS threads (checked: >= 1)."""
    if torch_threads < 1:
        raise ValueError(f"threads must be >= 1, got {torch_threads}")
    if blas_threads < 1:
        raise ValueError(f"blas_threads must be >= 1, got {blas_threads}")
    torch.set_num_threads(torch_threads)
    sparsetarget.set_num_threads(blas_threads)


def tensor_mib(tensors: Sequence[torch.Tensor]) -> float:
    """Total size of ``tensors`` in MiB (each storage once)."""
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total / 2**20


def parse_heads(text: str, known: Sequence[str]) -> list[str]:
    """Comma-separated head names, each one of ``known`` (the error names ``--heads``)."""
    heads = [h.strip() for h in text.split(",") if h.strip()]
    unknown = [h for h in heads if h not in known]
    if not heads or unknown:
        raise SystemExit(f"--heads: unknown or empty {unknown or text!r}; choose from {', '.join(known)}")
    if len(set(heads)) != len(heads):
        raise SystemExit(f"--heads: {text!r} names a head twice")
    return heads


def parse_overrides(items: Sequence[str], heads: Sequence[str], name: str) -> dict[str, float]:
    """``HEAD=VALUE`` pairs of an option such as ``--lr``."""
    out: dict[str, float] = {}
    for item in items:
        head, sep, value = item.partition("=")
        if not sep or head not in heads:
            raise SystemExit(f"{name}: expected HEAD=VALUE with HEAD one of {', '.join(heads)}, got {item!r}")
        try:
            out[head] = float(value)
        except ValueError:
            raise SystemExit(f"{name}: {value!r} is not a number") from None
    return out


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON (atomically: a partial file never replaces a complete one)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def plot_curves(results: dict[str, Any], metrics: Sequence[tuple[str, str]], path: str, title: str,
                extra: Any = None, logy: Sequence[str] = ()) -> bool:
    """One panel per (metric, label) of the heads' curves against their training wall-clock; ``extra(ax)`` may
    draw one more panel; metrics in ``logy`` get a log scale. Returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    panels = len(metrics) + (extra is not None)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.0), squeeze=False)
    styles = {"dense_spherical": dict(linestyle="--", marker="x"), "softmax": dict(marker="s"),
              "spherical_softmax": dict(marker="o")}
    colors = {name: f"C{i}" for i, name in enumerate(results["heads"])}  # one colour per head in every panel
    for ax, (metric, label) in zip(axes[0], metrics):
        for name, head in results["heads"].items():
            pts = [(p["wall_s"], p[metric]) for p in head["curve"] if p.get(metric) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=name, color=colors[name], **styles.get(name, dict(marker=".")))
        ax.set_xlabel("training wall-clock (s)")
        ax.set_ylabel(label)
        if metric in logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles = {h.get_label(): h for ax in axes[0][:len(metrics)] for h in ax.get_lines()}
    axes[0][0].legend(handles.values(), handles.keys(), fontsize=7)
    if extra is not None:
        extra(axes[0][-1])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


MILESTONES = frozenset({100, 300, 1000, 3000, 10000, 30000, 100000})
"""Step counts at which every head is also evaluated (outside its clock), to compare heads per step."""


class Trainer:
    """One head of a comparison: a model, its optimizers, its position in the shared data order and its clock.

    Subclasses set ``body``, ``head``, ``opt`` (and ``head_opt`` for a factored head) and provide
    ``train_step(step) -> loss`` and ``evaluate() -> dict``; what else a checkpoint needs comes from
    ``extra_state() / load_extra_state(state)``. ``wall_s`` counts training time only (the step, including building
    its batch); evaluation is excluded."""

    name = ""
    body: torch.nn.Module
    head: torch.nn.Module
    opt: torch.optim.Optimizer
    head_opt: torch.optim.Optimizer | None = None

    def __init__(self) -> None:
        self.steps = 0
        self.wall_s = 0.0
        self.curve: list[dict[str, Any]] = []
        self.first_losses: list[float] = []
        self.train_loss: list[dict[str, float]] = []
        self.step_peak_mib = 0.0
        self.failed = ""  # why training stopped early, if it did
        self._window: list[float] = []

    def train_step(self, step: int) -> float:
        raise NotImplementedError

    def evaluate(self) -> dict[str, Any]:
        raise NotImplementedError

    def optimize(self, loss: torch.Tensor) -> float:
        """One optimisation step of the body and the head on ``loss`` (gradients cleared first); returns its value."""
        self.opt.zero_grad()
        if self.head_opt is not None:
            self.head_opt.zero_grad()
        loss.backward()
        self.opt.step()
        if self.head_opt is not None:
            self.head_opt.step()
        return float(loss.detach())

    def extra_state(self) -> dict[str, Any]:
        """What a checkpoint needs besides the models and optimizers (e.g. a sampler's random state)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs: models, optimizers, :meth:`extra_state`."""
        st = {"body": self.body.state_dict(), "head": self.head.state_dict(), "opt": self.opt.state_dict(),
              **self.extra_state()}
        if self.head_opt is not None:
            st["head_opt"] = self.head_opt.state_dict()
        return st

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state`."""
        self.body.load_state_dict(state["body"])
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["opt"])
        if self.head_opt is not None:
            self.head_opt.load_state_dict(state["head_opt"])
        self.load_extra_state(state)

    def state_mib(self) -> float:
        """Size of the model and optimizer state."""
        tensors = [*self.body.state_dict().values(), *self.head.state_dict().values()]
        for st in self.opt.state.values():
            tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
        return tensor_mib([t for t in tensors if isinstance(t, torch.Tensor)])

    def train_for(self, seconds: float, label: str, first: int = 100, window: int = 50) -> None:
        """Train until this head's own clock has advanced by ``seconds``."""
        bar = Progress(seconds, label)
        start_wall = self.wall_s
        reset_peak()
        base = rss_mib()
        while self.wall_s - start_wall < seconds:
            t0 = time.perf_counter()
            loss = self.train_step(self.steps)
            self.wall_s += time.perf_counter() - t0
            self.steps += 1
            if not loss == loss or abs(loss) == float("inf"):
                raise FloatingPointError(f"{self.name}: loss is {loss} at step {self.steps}")
            if len(self.first_losses) < first:
                self.first_losses.append(loss)
            self._window.append(loss)
            if len(self._window) == window:
                self.train_loss.append({"step": self.steps, "wall_s": self.wall_s,
                                        "loss": sum(self._window) / window})
                self._window = []
            bar.update(self.wall_s - start_wall, f"step {self.steps} loss {loss:.4f}")
            if self.steps in MILESTONES:  # the same step counts for every head: quality per step
                self.step_peak_mib = max(self.step_peak_mib, rss_mib("VmHWM") - base)
                point = self.evaluate()
                reset_peak()  # the evaluation's memory is not the step's
                point.update(wall_s=self.wall_s, step=self.steps, milestone=True)
                self.curve.append(point)
        self.step_peak_mib = max(self.step_peak_mib, rss_mib("VmHWM") - base)
        bar.close(f"step {self.steps} ({self.steps / max(self.wall_s, 1e-9):.1f} steps/s)")

    def checkpoint(self) -> dict[str, Any]:
        return {"state": self.state(), "steps": self.steps, "wall_s": self.wall_s, "curve": self.curve,
                "first_losses": self.first_losses, "train_loss": self.train_loss,
                "step_peak_mib": self.step_peak_mib, "window": self._window, "failed": self.failed}

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.load_state(ckpt["state"])
        self.steps, self.wall_s, self.curve = ckpt["steps"], ckpt["wall_s"], ckpt["curve"]
        self.first_losses, self.train_loss = ckpt["first_losses"], ckpt["train_loss"]
        self.step_peak_mib, self._window = ckpt["step_peak_mib"], ckpt["window"]
        self.failed = ckpt.get("failed", "")


def round_robin(trainers: Sequence[Trainer], budget_s: float, slices: int, out: str,
                on_point: Any = None) -> None:
    """Train every head for ``budget_s`` seconds of its own clock, in ``slices`` turns (head 1 slice 1, head 2
    slice 1, ..., head 1 slice 2, ...) so that a change of the machine's load hits all heads alike; evaluate each
    head after each of its slices (a curve point) and checkpoint it to ``out/<head>.pt``. Heads restored from a
    checkpoint continue where they stopped. A head whose step raises (divergence, a singular factored update) stops
    there with its reason in ``failed`` and is evaluated as it is; the others go on. ``on_point()`` is called after
    every point (e.g. to write results)."""
    if budget_s <= 0:
        raise ValueError(f"budget_s must be > 0, got {budget_s}")
    if slices < 1:
        raise ValueError(f"slices must be >= 1, got {slices}")
    per_slice = budget_s / slices
    for turn in range(slices):
        for tr in trainers:
            target = per_slice * (turn + 1)
            done = sum(not p.get("milestone") for p in tr.curve)
            if tr.failed or (tr.wall_s >= target - 1e-9 and done > turn):
                continue  # stopped by an error, or done before a restart
            try:
                tr.train_for(target - tr.wall_s, f"{tr.name:>17} {turn + 1}/{slices}")
            except (FloatingPointError, ValueError, RuntimeError) as err:  # e.g. a singular factored update
                tr.failed = f"step {tr.steps}: {type(err).__name__}: {err}"
                print(f"\n{tr.name}: stopped training at {tr.failed}", file=sys.stderr)
            t0 = time.perf_counter()
            point = tr.evaluate()
            point.update(wall_s=tr.wall_s, step=tr.steps)
            tr.curve.append(point)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in point.items() if isinstance(v, float) and k != "wall_s")
            print(f"{tr.name:>17}: {shown} (eval {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
            torch.save(tr.checkpoint(), os.path.join(out, f"{tr.name}.pt"))
            if on_point is not None:
                on_point()



def add_shared_arguments(p: argparse.ArgumentParser, heads: Sequence[str], budget_s: float, slices: int, embed: int,
                         dim: int) -> None:
    """The options both examples take: heads, budget and schedule, output, sizes, learning rates, epsilon, threads,
    seed, resuming."""
    p.add_argument("--heads", default=",".join(heads), help=f"comma-separated, from {', '.join(heads)}")
    p.add_argument("--embed", type=int, default=embed, help="word embedding size")
    p.add_argument("--dim", type=int, default=dim, help="d, input size of the output layer")
    p.add_argument("--batch", type=int, default=128, help="examples per step")
    p.add_argument("--budget-s", type=float, default=budget_s, help="training seconds per head")
    p.add_argument("--slices", type=int, default=slices, help="round-robin turns per head (one curve point each)")
    p.add_argument("--out", required=True, help="directory for results.json, results.png, checkpoints")
    p.add_argument("--lr", action="append", default=[], metavar="HEAD=LR", help="learning rate of a head")
    p.add_argument("--body-lr", type=float, default=0.1, help="learning rate of the body (all heads)")
    p.add_argument("--eps", type=float, default=1e-2, help="spherical softmax epsilon")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--blas-threads", type=int, default=1, help="sparsetarget core BLAS threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out")


def check_positive(p: argparse.ArgumentParser, args: argparse.Namespace, integers: Sequence[str]) -> None:
    """Refuse integer options below 1 and a budget, epsilon or body learning rate that is not > 0."""
    for name in integers:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.budget_s > 0 or not args.eps > 0 or not args.body_lr > 0:
        p.error("--budget-s, --eps and --body-lr must be > 0")


def resume(trainers: Sequence[Trainer], out_dir: str) -> None:
    """Restore each trainer from its checkpoint ``out_dir/<name>.pt`` where one exists."""
    for tr in trainers:
        path = os.path.join(out_dir, f"{tr.name}.pt")
        if os.path.exists(path):
            tr.restore(torch.load(path, weights_only=False))
            print(f"{tr.name}: resumed at step {tr.steps} ({tr.wall_s:.1f} s)", file=sys.stderr)


def setup_run(args: argparse.Namespace, heads: Sequence[str], default_lr: dict[str, float]) -> tuple[list[str],
                                                                                                  dict[str, float]]:
    """The run's heads and learning rates (defaults overridden by --lr), thread counts set, output directory made."""
    chosen = parse_heads(args.heads, heads)
    lrs = {**default_lr, **parse_overrides(args.lr, heads, "--lr")}
    set_threads(args.threads, args.blas_threads)
    os.makedirs(args.out, exist_ok=True)
    return chosen, lrs
