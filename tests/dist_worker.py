"""Run by tests/test_dist.py, alone or under ``mpiexec -n R``: ``train()`` from Python.

    python dist_worker.py order DATA_DIR OUT_DIR LIMIT BATCH EPOCHS
        trains, recording which training images each step of each rank read; rank 0 writes
        OUT_DIR/order.json: the global batches in order, and whether every rank ended with
        bit-identical weights.  Each rank passes its own file names (m<rank>.json,
        ck<rank>.npz): only rank 0's may appear.
    python dist_worker.py fail DATA_DIR OUT_DIR
        rank 1's third Linear backward raises: the job must end, not hang.
    python dist_worker.py api
        each rank's gradient of its half of a batch, averaged by allreduce_gradients and by
        GradientSync with each method (Iallreduce without its progress thread, and the
        shared-memory window), against the whole batch's gradient that every rank also
        computes alone; then GradientSync.close; a BatchNorm2d's buffers made equal by
        broadcast_parameters; prints "api ok" from rank 0.
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from fastconv import data, dist, nn
from fastconv import train as T


def api():
    from fastconv import models

    comm = dist.init("auto")
    rng = np.random.default_rng(0)
    x, y = rng.random((8, 1, 28, 28), np.float32), rng.integers(0, 10, 8)
    model, loss_fn = models.two_conv(seed=0), nn.CrossEntropyLoss()
    whole_loss = float(loss_fn(model(x), y))
    model.backward(loss_fn.backward())
    whole = [p.grad.copy() for p in model.parameters()]
    mine = comm.shard(np.arange(8))
    for average in ("helper", "iallreduce", "shared"):
        model.zero_grad()
        if average == "helper":
            loss_fn(model(x[mine]), y[mine])
            model.backward(loss_fn.backward())
            dist.allreduce_gradients(model)
        else:
            sync = dist.GradientSync(model, comm, bucket_mb=0.01, progress=False,
                                     method=average)
            assert sync.method == average
            if average == "iallreduce":
                assert sync._progress is None and len(sync.buckets) > 2
            loss, _ = sync.train_step(model, loss_fn, x[mine], y[mine], 8)
            assert abs(loss - whole_loss) <= 1e-5 * abs(whole_loss), (loss, whole_loss)
            # the Linear layers wrote their gradients into the buffer; the rest was copied
            linear = sum(p.data.nbytes for p in model.parameters()
                         if isinstance(p.module, nn.Linear))
            assert sync.timers["bytes"] - sync.timers["copied_bytes"] == linear, sync.timers
        for g, p in zip(whole, model.parameters(), strict=True):
            np.testing.assert_allclose(p.grad, g, rtol=1e-4, atol=1e-6, err_msg=p.name)
        # every rank holds the very same numbers
        digest = hashlib.sha256(b"".join(p.grad.tobytes() for p in model.parameters()))
        assert len(set(comm.comm.allgather(digest.hexdigest()))) == 1, average
    # closing the shared window leaves the gradients valid; the sync is then unusable
    held = [p.grad.copy() for p in model.parameters()]
    sync.close()
    for g, p in zip(held, model.parameters(), strict=True):
        np.testing.assert_array_equal(p.grad, g)
    try:
        sync.train_step(model, loss_fn, x[mine], y[mine], 8)
    except RuntimeError as e:
        assert "closed" in str(e)
    else:
        raise AssertionError("a closed GradientSync ran a step")
    # BatchNorm2d's running statistics follow each rank's shard until
    # broadcast_parameters gives every rank rank 0's parameters and buffers
    bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    bn(x[mine])
    mean = bn[1].buffers()[0]
    assert len({m.tobytes() for m in comm.comm.allgather(mean)}) == 2
    root_mean = comm.comm.bcast(mean.copy())
    comm.broadcast_parameters(bn)
    np.testing.assert_array_equal(mean, root_mean)
    state = hashlib.sha256(b"".join(a.tobytes() for a in bn.state_dict().values()))
    assert len(set(comm.comm.allgather(state.hexdigest()))) == 1
    if comm.is_root:
        print("api ok")


def main(mode, data_dir=None, out=None, *rest):
    if mode == "api":
        return api()
    out = Path(out)
    comm = dist.init("auto")
    xtr, _, _, _ = data.load_dataset("mnist", data_dir, download=False)
    ids = {img.tobytes(): i for i, img in enumerate(xtr)}
    steps = []
    normalise = T.normalise

    def recording(images):
        found = [ids.get(img.tobytes()) for img in images]
        if calls[0] and images.shape[0] and None not in found:  # not the warm-up, not a test batch
            steps.append(found)
        elif calls[0] and not images.shape[0]:
            steps.append([])
        calls[0] += 1
        return normalise(images)

    calls, models, build = [0], [], T.build
    T.normalise = recording

    def recording_build(cfg):
        model, opt = build(cfg)
        models.append(model)
        return model, opt

    T.build = recording_build
    if mode == "fail" and comm.rank == 1:
        backward, count = nn.Linear.backward, [0]

        def failing(self, dy):
            count[0] += 1
            if count[0] == 3:
                raise RuntimeError("injected failure on rank 1")
            return backward(self, dy)

        nn.Linear.backward = failing
    limit, batch, epochs = (int(v) for v in rest) if rest else (256, 32, 2)
    cfg = T.TrainConfig(dataset="mnist", limit=limit, batch_size=batch, epochs=epochs)
    T.train(cfg, data_dir=data_dir, download=False, threads=1, quiet=True,
            save=out / f"ck{comm.rank}.npz", metrics_json=out / f"m{comm.rank}.json")
    weights = b"".join(p.data.tobytes() for p in models[-1].parameters())
    digest = hashlib.sha256(weights).hexdigest()
    if comm.distributed:
        all_steps = comm.comm.gather(steps, root=0)
        digests = comm.comm.allgather(digest)
    else:
        all_steps, digests = [steps], [digest]
    if comm.is_root:
        glob = [sum((s[i] for s in all_steps), []) for i in range(len(steps))]
        (out / "order.json").write_text(json.dumps({
            "steps": glob, "per_rank": [[len(b) for b in s] for s in all_steps],
            "same_weights_on_every_rank": len(set(digests)) == 1}))


if __name__ == "__main__":
    main(*sys.argv[1:])
