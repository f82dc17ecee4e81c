#!/usr/bin/python3
"""Trains a ternary MLP on scikit-learn's digits over gRPC, and says honestly how well it did.

    PYTHONPATH=build/python /usr/bin/python3 client/python/examples/train_digits.py \
        --server 127.0.0.1:50051 --plot digits.png

The data: sklearn's bundled 8x8 digits (1797 samples, 64 features, 10 classes), split 80/20 into
training and held-out sets with a seeded permutation, features standardised with the training
set's mean and deviation. The model: fc1 (ternary linear 64 -> hidden), RELU, fc2 (ternary linear
hidden -> 10); --layers N stacks N hidden layers. Every step is one TrainStep call with
CROSS_ENTROPY, exactly once by expected_step.

The learning rule (docs/arithmetic.md) never changes a ternary sign: it only moves each group's
scale S = 2^(E + 4 * mean correlation), a running mean over all steps of the gradient's sign
agreement, so the signs the seed drew stay fixed, what is learnt is how much each group of weights
counts, and learning settles within the first epoch or two. With the service's group size of 32 a
narrow model barely learns (hidden 256: about 28% held-out accuracy); a wide hidden layer gives
the scales enough random features to weigh: hidden 4096, batch 128 reaches about 83% (from 2.5%
untrained) in about a second of training on two CPU cores, the defaults here. Smaller groups learn
more at a higher cost in state: --group-size 8 reaches about 86% at hidden 256 and 94% at 4096;
--group-size 1 (one scale per weight; 9 bytes of state per weight instead of about 0.5) about 98%
with --hidden 256 --batch 64. Depth does not help: with --layers 4 --hidden 256 the outputs are so
small that the loss stays near its untrained 2.30 (while the accuracy creeps to about 46%).

When the mean loss of the last --plateau-steps steps is not 1% lower than that of as many steps
before them, the example says so once, in one line, with the likely reason and what to try.

Deterministic for a given --seed (the model's initialisation, the split and the batch order).
"""

import argparse
import math
import os
import sys
import time

import numpy as np

import tscale


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of tscale-server")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=128, help="samples per TrainStep")
    p.add_argument("--seed", type=int, default=0, help="model initialisation, split and order")
    p.add_argument("--hidden", type=int, default=4096, help="width of the hidden layers")
    p.add_argument("--layers", type=int, default=1, help="hidden layers")
    p.add_argument("--group-size", type=int, default=32,
                   help="weights sharing one scale (32 is the service's default)")
    p.add_argument("--plot", default="", help="write a PNG of the training curves here")
    p.add_argument("--model-id", default="digits", help="the model's id on the server")
    p.add_argument("--device", default="", help="cpu, cuda, cuda:N; empty: the server's default")
    p.add_argument("--replace", action="store_true",
                   help="delete an existing model of that id first")
    p.add_argument("--keep", action="store_true", help="leave the model on the server")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    p.add_argument("--plateau-steps", type=int, default=50,
                   help="say so when the mean loss of this many steps is not 1%% lower than "
                        "that of as many steps before them (0: never)")
    args = p.parse_args(argv)
    if args.plateau_steps < 0:
        p.error("--plateau-steps must be at least 0")
    for name in ("epochs", "batch", "hidden", "layers", "group_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def load_data(seed):
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.RandomState(seed).permutation(len(x))
    n_train = int(round(0.8 * len(x)))
    train, held = order[:n_train], order[n_train:]
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std[std == 0] = 1.0  # a few corner pixels are always 0
    x = ((x - mean) / std).astype(np.float32)
    return x[train], y[train], x[held], y[held]


def cross_entropy(logits, labels):
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def evaluate(client, model_id, x, y, timeout):
    """Held-out accuracy and cross-entropy (Forward with train=false: no state is kept)."""
    logits = client.forward(model_id, x, train=False, timeout=timeout).output
    return float((logits.argmax(axis=1) == y).mean()), cross_entropy(logits, y)


class Progress:
    """A hand-written progress bar, redrawn with \\r on a terminal; silent otherwise."""

    def __init__(self, total, label, stream=sys.stdout, width=30):
        self.total, self.label, self.stream, self.width = total, label, stream, width
        self.tty = stream.isatty()
        self.start = time.monotonic()

    def update(self, done, text=""):
        if not self.tty:
            return
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        rate = done / max(time.monotonic() - self.start, 1e-9)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} {rate:5.1f} steps/s {text}")
        self.stream.flush()

    def clear(self):
        if self.tty:
            self.stream.write("\r" + " " * (self.width + len(self.label) + 60) + "\r")
            self.stream.flush()


class Plateau:
    """Notices when training stops lowering the loss: the mean loss of the last `steps` steps is
    not lower, by more than `tolerance` of it, than the mean of the `steps` steps before them.
    update() answers (mean before, mean now) once, the first time; None otherwise."""

    def __init__(self, steps, tolerance=0.01):
        self.steps, self.tolerance = steps, tolerance
        self.losses = []
        self.seen = False

    def update(self, loss):
        self.losses.append(loss)
        n = self.steps
        if self.seen or n < 1 or len(self.losses) < 2 * n:
            return None
        before = sum(self.losses[-2 * n:-n]) / n
        now = sum(self.losses[-n:]) / n
        if before - now > self.tolerance * abs(before):
            return None
        self.seen = True
        return before, now


def plateau_advice(args, before, now, chance_loss):
    """One line: the loss stopped going down, why, and what to try."""
    tries = ["a smaller --group-size (8, 1)", "a wider --hidden"]
    if now >= 0.98 * chance_loss:  # still about the loss of outputs near zero
        why = ("the outputs are too small for the loss to see, and no scale can grow more than "
               "16x, ever more slowly")
        if args.layers > 1:
            tries.insert(0, "fewer --layers")
    else:
        why = ("the per-group scales have learnt what they can (the ternary signs stay as drawn, "
               "and each step moves a scale less)")
    return (f"plateau: loss {before:.3f} -> {now:.3f} over the last {args.plateau_steps} steps: "
            f"{why}, so more steps will not help; try {', '.join(tries[:-1])} or {tries[-1]} "
            f"(docs/arithmetic.md, section 10)")


def drift_summary(stats):
    """Per layer: (mean drift, mean |drift|, saturated fraction) from GetScaleStats."""
    return {l.layer: (l.drift_mean, l.drift_abs_mean, l.saturated_fraction) for l in stats.layers}


def plot(path, history, untrained, layers, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="training (mean over epoch)")
    ax.plot([0] + epochs, [untrained[1]] + [h["held_loss"] for h in history], "s-",
            label="held-out")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax.set_title("loss")
    ax.legend()
    ax = axes[1]
    ax.plot([0] + epochs, [100 * untrained[0]] + [100 * h["held_acc"] for h in history], "o-",
            label="held-out")
    ax.axhline(10, color="gray", linestyle="--", label="chance (10%)")
    ax.set_ylim(0, 100)
    ax.set_xlabel("epoch (0 = untrained)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("held-out accuracy")
    ax.legend()
    ax = axes[2]
    for i, name in enumerate(layers):
        color = f"C{i}"
        ax.plot([0] + epochs, [0.0] + [h["drift"][name][1] for h in history], "o-",
                color=color, label=f"{name} mean |drift|")
        ax.plot([0] + epochs, [0.0] + [h["drift"][name][0] for h in history], "x--",
                color=color, label=f"{name} mean drift")
        ax.plot([0] + epochs, [0.0] + [h["drift"][name][2] for h in history], ":",
                color=color, label=f"{name} saturated fraction")
    ax.set_xlabel("epoch")
    ax.set_ylabel("log2 S - E  (saturated: fraction of groups)")
    ax.set_title("per-layer scale drift (GetScaleStats)")
    ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    x_train, y_train, x_held, y_held = load_data(args.seed)
    # fc1, act1, ..., fcN, actN (hidden), fc<N+1> (-> 10)
    layers, width = [], 64
    for i in range(1, args.layers + 2):
        out = args.hidden if i <= args.layers else 10
        layers.append({"name": f"fc{i}", "ternary_linear": {
            "in_features": width, "out_features": out, "group_size": args.group_size}})
        if i <= args.layers:
            layers.append({"name": f"act{i}", "activation": {"kind": "RELU"}})
        width = out
    spec = {"layers": layers}
    ternary_layers = [l["name"] for l in layers if "ternary_linear" in l]

    with tscale.Client(args.server, timeout=args.timeout) as client:
        client.wait_ready(timeout=30)
        info = client.server_info()
        print(f"server {args.server}: tscale {info.version}, default device {info.default_device}")
        if args.replace:
            try:
                client.delete_model(args.model_id)
            except tscale.Error as e:
                if e.code.name != "NOT_FOUND":
                    raise
        try:
            model = client.create_model(args.model_id, spec, seed=args.seed, device=args.device)
        except tscale.Error as e:
            if e.code.name == "ALREADY_EXISTS":
                sys.exit(f"train_digits: model '{args.model_id}' already exists on the server; "
                         "pass --replace or another --model-id")
            raise
        try:
            return train(client, args, model, x_train, y_train, x_held, y_held, ternary_layers)
        finally:
            if not args.keep:
                try:
                    client.delete_model(args.model_id)
                except tscale.Error:
                    pass


def train(client, args, model, x_train, y_train, x_held, y_held, ternary_layers):
    steps_per_epoch = math.ceil(len(x_train) / args.batch)
    shape = " -> ".join(["64"] + [str(args.hidden)] * args.layers + ["10"])
    print(f"model '{model.model_id}' on {model.device}: {shape}, "
          f"{model.ternary_params} ternary weights in {model.groups} scale groups "
          f"(group size {args.group_size})")
    print(f"data: {len(x_train)} training / {len(x_held)} held-out digits, batch {args.batch}, "
          f"{steps_per_epoch} TrainSteps per epoch")

    untrained = evaluate(client, args.model_id, x_held, y_held, args.timeout)
    print(f"untrained: held-out accuracy {100 * untrained[0]:.1f}%, loss {untrained[1]:.3f} "
          f"(chance: 10%, loss {math.log(10):.3f})")

    step = model.step
    history = []
    plateau = Plateau(args.plateau_steps)
    t_start = time.monotonic()
    for epoch in range(1, args.epochs + 1):
        t0 = time.monotonic()
        order = np.random.RandomState(args.seed * 1000 + epoch).permutation(len(x_train))
        bar = Progress(steps_per_epoch, f"epoch {epoch}/{args.epochs}")
        loss_sum = 0.0
        updates = {}
        for i in range(steps_per_epoch):
            idx = order[i * args.batch:(i + 1) * args.batch]
            r = client.train_step(args.model_id, x_train[idx], y_train[idx],
                                  loss="cross_entropy", expected_step=step)
            step = r.step
            loss_sum += r.loss * len(idx)
            updates = {u.layer: u.mean_abs_drift for u in r.layers}
            flat = plateau.update(r.loss)
            if flat:
                bar.clear()
                print(plateau_advice(args, *flat, math.log(10)), flush=True)
            bar.update(i + 1, f"loss {r.loss:.3f}")
        bar.clear()
        train_loss = loss_sum / len(x_train)
        held_acc, held_loss = evaluate(client, args.model_id, x_held, y_held, args.timeout)
        drift = drift_summary(client.scale_stats(args.model_id))
        seconds = time.monotonic() - t0
        history.append({"epoch": epoch, "train_loss": train_loss, "held_acc": held_acc,
                        "held_loss": held_loss, "drift": drift, "seconds": seconds,
                        "update_drift": updates})
        layers_text = "  ".join(
            f"{name} drift {drift[name][0]:+.2f} |{drift[name][1]:.2f}| sat {drift[name][2]:.2f}"
            for name in ternary_layers)
        print(f"epoch {epoch:2d}/{args.epochs}  step {step:5d}  train loss {train_loss:.3f}  "
              f"held-out acc {100 * held_acc:5.1f}% loss {held_loss:.3f}  {layers_text}  "
              f"({1000 * seconds:.0f} ms)", flush=True)

    total = time.monotonic() - t_start
    final = history[-1]
    print(f"\nheld-out accuracy: untrained {100 * untrained[0]:.1f}% -> after {args.epochs} "
          f"epoch(s) {100 * final['held_acc']:.1f}% (chance 10.0%); held-out loss "
          f"{untrained[1]:.3f} -> {final['held_loss']:.3f}")
    print(f"{step} TrainSteps in {total:.2f} s ({1000 * total / args.epochs:.0f} ms per epoch, "
          f"{1000 * total / max(step, 1):.1f} ms per step, evaluation included)")
    print("only the per-group scales learnt: the ternary signs are those the seed drew")
    if args.plot:
        plot(args.plot, history, untrained, ternary_layers,
             f"tscale: ternary MLP {shape.replace(' -> ', '-')} (group size {args.group_size}) "
             f"on digits, batch {args.batch}, seed {args.seed}")
        print(f"plot: {args.plot}")
    if args.keep:
        print(f"model '{args.model_id}' left on the server at step {step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
