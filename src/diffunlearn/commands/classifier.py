"""``python -m diffunlearn.commands.classifier``: train the domain classifier that scores MNIST T-Shirt samples
(the shipped ``pretrained/mnist-classifier`` was trained so), and print its held-out accuracies."""

from __future__ import annotations

import argparse

import torch

from ..metrics.classifier import run_train_classifier


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=run_train_classifier.__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (training is small; leave cores to others)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for key, value in run_train_classifier(args.out, args.steps, args.seed).items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
