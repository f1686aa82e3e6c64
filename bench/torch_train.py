"""The PyTorch twin of ``fastconv train``, for comparisons on the same data.

    python bench/torch_train.py --dataset fashion-mnist --data-dir DIR [--limit N]
        [--epochs E] [--batch-size 64] [--threads T] [--metrics-json PATH]

It uses the same network, initial scheme, optimizer (SGD lr 0.05, momentum 0.9, the same
per-step cosine schedule), batch size, data loading (fastconv.data), normalisation,
per-epoch shuffling and evaluation.
Its ``train_samples_per_second`` is timed over the training steps only, as fastconv's is.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fastconv import data

import cases


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int)
    p.add_argument("--limit", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics-json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    xtr, ytr, xte, yte = data.load_dataset(a.dataset, a.data_dir, download=False)
    if a.limit:
        xtr, ytr = xtr[:a.limit], ytr[:a.limit]
    model = cases.torch_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps = a.epochs * -(-len(xtr) // a.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + np.cos(np.pi * min(t + 1, steps) / steps)))
    rng = np.random.default_rng([a.seed, 1])
    busy, seen, epochs = 0.0, 0, []
    x0 = torch.from_numpy(xtr[:2].astype(np.float32)[:, None] / 255)
    torch.nn.functional.cross_entropy(model(x0), torch.from_numpy(ytr[:2].astype(np.int64)))
    for epoch in range(a.epochs):
        order = rng.permutation(len(xtr))
        for start in range(0, len(order), a.batch_size):
            idx = order[start:start + a.batch_size]
            x = torch.from_numpy(xtr[idx].astype(np.float32)[:, None] / np.float32(255))
            y = torch.from_numpy(ytr[idx].astype(np.int64))
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            busy += time.perf_counter() - t0
            seen += len(idx)
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(torch.from_numpy(xte[s:s + 500].astype(np.float32)[:, None]
                                                      / 255)).argmax(1)
                               == torch.from_numpy(yte[s:s + 500].astype(np.int64))).sum())
                          for s in range(0, len(xte), 500))
        model.train()
        epochs.append({"epoch": epoch + 1, "test_accuracy": correct / len(xte)})
    metrics = {"epochs": epochs, "test_accuracy": epochs[-1]["test_accuracy"],
               "train_samples_per_second": seen / busy, "threads": torch.get_num_threads()}
    print(json.dumps(metrics))
    if a.metrics_json:
        with open(a.metrics_json, "w") as f:
            json.dump(metrics, f)


if __name__ == "__main__":
    main()
