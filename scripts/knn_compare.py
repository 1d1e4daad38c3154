"""Paired k-NN comparison of two frozen feature sets on the same test images.

Two k-NN accuracies on one test set are not independent, so their difference is judged on the
images where the two disagree (McNemar): this prints both top-1 accuracies, the difference with a
95% interval, the exact two-sided McNemar p-value, and the effective rank of each feature set on
the test images (exp of the entropy of the normalised squared singular values: how many directions
the features really use).

    python scripts/knn_compare.py runs/dino-fmnist/teacher.pth pixels
    python scripts/knn_compare.py runs/dino-fmnist/teacher.pth:avg random:runs/dino-fmnist/teacher.pth:avg

A feature set is ``pixels``, ``CHECKPOINT[:POOL]`` or ``random:CHECKPOINT[:POOL]`` (POOL: cls, avg, cls+avg).
"""
from __future__ import annotations

import argparse
import math

import torch

from xcit.dino.knn import POOLS, embed_splits, knn_scores, load_feature_model
from xcit.train import distributed as dist_utils


def parse_source(spec: str):
    if spec == "pixels":
        return load_feature_model(pixels=True)
    random_init = spec.startswith("random:")
    path, _, pool = spec.removeprefix("random:").rpartition(":")
    if pool not in POOLS:
        path, pool = spec.removeprefix("random:"), "cls"
    return load_feature_model(path, random_init=random_init, pool=pool)


def effective_rank(features: torch.Tensor) -> float:
    centred = features.float() - features.float().mean(0)
    energy = torch.linalg.svdvals(centred) ** 2
    p = energy / energy.sum()
    return float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b and c are the two kinds of discordant images."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="first feature set")
    parser.add_argument("b", help="second feature set")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    env = dist_utils.DistEnv()
    correct, labels = {}, None
    for spec in (args.a, args.b):
        train_f, train_y, test_f, test_y, classes, _ = embed_splits(parse_source(spec), args.data, "train", "val", env,
                                                                    workers=0)
        scores = knn_scores(train_f, train_y, test_f, len(classes), args.k, args.temperature)
        correct[spec] = scores.argmax(1).eq(test_y)
        labels = test_y
        print(f"{spec}: top-1 {100 * correct[spec].float().mean():.2f} %, {test_f.shape[1]}-d, "
              f"effective rank {effective_rank(test_f):.1f}")
    a, b = correct[args.a], correct[args.b]
    n = len(labels)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    diff = (only_a - only_b) / n
    se = math.sqrt(max(only_a + only_b - (only_a - only_b) ** 2 / n, 0.0)) / n
    print(f"{args.a} - {args.b}: {100 * diff:+.2f} points (95% interval {100 * (diff - 1.96 * se):+.2f} to "
          f"{100 * (diff + 1.96 * se):+.2f}); right only with the first {only_a}, only with the second {only_b} "
          f"of {n} images; McNemar p = {mcnemar_p(only_a, only_b):.2g}")


if __name__ == "__main__":
    main()
