"""Per-sample-gradient paths side by side on cnn_small at 28x28 (P ~ 84k): our hooks, ``vmap(grad)``, Opacus.

    python -m bench.grads [--n 2000] [--chunk 256] [--repeats 3] [--threads 2]

One process, random inputs (the cost does not depend on the values): every path is warmed up on one chunk (the
first ``vmap`` imports torch._dynamo, seconds), then the repeats are interleaved across paths and the median is
reported, with the largest absolute difference from the ``vmap`` reference. Opacus has no BatchNorm rule, so it
runs on the BN-frozen copy only. ``python -m experiments.bench`` runs the same comparison on the real task.
"""
from __future__ import annotations

import argparse

import torch

from bench.grad_paths import GRAD_PATHS, compare_grad_paths, freeze_norm_layers
from bench.tables import markdown_table
from gex.models import build_model
from gex.utils import seed_everything


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paths", default=",".join(GRAD_PATHS))
    args = parser.parse_args()
    import pandas as pd
    torch.set_num_threads(args.threads)
    seed_everything(0)
    model = build_model("cnn_small", (1, 28, 28), 10, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(args.n, 1, 28, 28, generator=gen), torch.randint(0, 10, (args.n,), generator=gen)
    paths = args.paths.split(",")
    frames = []
    for variant, net in (("full", model), ("bn_frozen", freeze_norm_layers(model))):
        wanted = [p for p in paths if variant == "bn_frozen" or p != "opacus"]
        frames.append(pd.DataFrame(compare_grad_paths(net, x, y, "ce", args.chunk, args.repeats, wanted))
                      .assign(variant=variant))
    print(f"cnn_small 28x28, n={args.n}, chunk={args.chunk}, threads={args.threads}, torch {torch.__version__}")
    print(markdown_table(pd.concat(frames, ignore_index=True)))


if __name__ == "__main__":
    main()
