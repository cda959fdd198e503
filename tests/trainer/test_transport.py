"""Real gloo processes (torch.multiprocessing spawn). The workers import only torch and the light trainer
modules (transport, topology), so each spawn stays quick."""

import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.topology import Topology, new_groups
from trainer.transport import (
    BatchReceiver,
    SendWaits,
    LoaderFailed,
    TransportError,
    TransportTimeout,
    batches_from,
    pack_batch,
    pack_text,
    recv_batch,
    send_batch,
    send_end,
    send_error,
)

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def bucket_shapes(resolution: int) -> list[tuple[int, int]]:
    """Every (height, width) bucket with the long side at ``resolution``, aspect ratios 1:2 to 2:1."""
    sides = range(resolution // 2, resolution + 1, 16)
    return sorted({(resolution, s) for s in sides} | {(s, resolution) for s in sides})


CASES = [(h, w, FLOAT_DTYPES[i % 4]) for i, (h, w) in enumerate(bucket_shapes(128) + bucket_shapes(256))]


def expected_batch(i: int) -> dict[str, torch.Tensor]:
    if i == len(CASES):  # a last batch with fewer tensors and integer dtypes
        return {"pooled": torch.arange(6, dtype=torch.int64).view(2, 3), "text": torch.ones(1, 2, 3, dtype=torch.uint8)}
    height, width, dtype = CASES[i]
    generator = torch.Generator().manual_seed(i)
    b = 1 + i % 3
    batch = {
        "latents": torch.randn(b, 16, height // 8, width // 8, generator=generator).to(dtype),
        "text": torch.randn(b, 154, 64, generator=generator).to(dtype),
        "pooled": torch.randn(b, 64, generator=generator).to(dtype),
    }
    batch["latents"][0, 0, 0, 0] = float("inf")  # the reference's padding value travels unchanged too
    # as encode_text makes it: each caption's padding rows zero, the second encoder narrower (48 of 64)
    for row, length in enumerate(torch.randint(0, 78, (b, 2), generator=generator).tolist()):
        batch["text"][row, length[0] : 77] = 0
        batch["text"][row, 77 + length[1] :] = 0
    batch["text"][:, 77:, 48:] = 0
    return batch


def _init(rank: int, world: int, init: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=30))


def _spawn(worker, tmp_path, nprocs: int = 2):
    out = tmp_path / "result.json"
    mp.spawn(worker, args=(f"file://{tmp_path / 'rendezvous'}", out), nprocs=nprocs)
    return json.loads(out.read_text())


def _stream_worker(rank, init, out):
    _init(rank, 2, init)
    if rank == 0:
        in_flight = []
        for i in range(len(CASES) + 1):
            batch = expected_batch(i)
            # half of them as a loader sends them: text without its zero rows and columns
            wire = pack_batch(batch, text_blocks=2 if batch["text"].shape[1] % 2 == 0 else 1) if i % 2 else batch
            in_flight.append((send_batch(wire, dst=1), wire))
            if len(in_flight) > 2:  # two batches on their way, as a loader with prefetch 2 keeps them
                for work in in_flight.pop(0)[0]:
                    work.wait()
        for works, _ in in_flight:
            for work in works:
                work.wait()
        send_end(1)
    else:
        receiver = BatchReceiver(0, depth=2, timeout_s=30)
        mismatches = []
        for i in range(len(CASES) + 1):
            batch, waited = receiver.get()
            expected = expected_batch(i)
            if batch is None or batch.keys() != expected.keys() or waited < 0:
                mismatches.append([i, "keys"])
                continue
            for name, tensor in expected.items():
                got = batch[name]
                if got.dtype != tensor.dtype or got.shape != tensor.shape or not torch.equal(got, tensor):
                    mismatches.append([i, name])
        after_end = [receiver.get()[0], receiver.get()[0]]
        out.write_text(json.dumps({"mismatches": mismatches, "after_end": after_end}))
    dist.destroy_process_group()


def test_every_bucket_shape_and_dtype_round_trips_exactly_then_the_sentinel_stops(tmp_path):
    assert len(CASES) == 2 * 9 - 1 + 2 * 5 - 1
    result = _spawn(_stream_worker, tmp_path)
    assert result == {"mismatches": [], "after_end": [None, None]}


def test_packed_text_unpacks_to_the_same_tensor_and_leaves_only_zeros_out():
    from trainer.transport import unpack_text

    batch = expected_batch(4)
    text = batch["text"]
    packed = pack_text(text, blocks=2)
    kept_rows = int(text.ne(0).any(-1).sum())
    assert packed["text_0"].shape[1] == 64 and packed["text_1"].shape[1] == 48
    assert packed["text_0"].shape[0] + packed["text_1"].shape[0] == kept_rows < text.shape[0] * 154
    assert torch.equal(unpack_text(packed), text) and unpack_text(packed).dtype == text.dtype
    negative_zero = torch.full((2, 4, 3), -0.0)
    negative_zero[0, 0] = torch.tensor([1.0, -0.0, 2.0])
    assert torch.equal(unpack_text(pack_text(negative_zero)), negative_zero)  # -0.0 == 0.0, and computes alike
    nothing = pack_text(torch.zeros(3, 154, 8, dtype=torch.bfloat16), blocks=2)
    assert set(nothing) == {"text_rows", "text_layout"}  # no empty tensor ever travels
    assert torch.equal(unpack_text(nothing), torch.zeros(3, 154, 8, dtype=torch.bfloat16))
    for shape, blocks in (((2, 154), 1), ((2, 153, 8), 2), ((2, 154, 8), 5)):
        try:
            pack_text(torch.ones(shape), blocks)
            raise AssertionError(f"{shape} into {blocks} blocks packed")
        except TransportError as err:
            assert "cannot pack text" in str(err)


def _error_worker(rank, init, out):
    _init(rank, 2, init)
    if rank == 0:
        for work in send_batch(expected_batch(0), dst=1):
            work.wait()
        send_error(1, "cannot decode demo-000000007: truncated PNG")
    else:
        first = recv_batch(0, timeout_s=30)
        try:
            recv_batch(0, timeout_s=30)
            message = None
        except LoaderFailed as err:
            message = str(err)
        same = torch.equal(first["latents"], expected_batch(0)["latents"])
        out.write_text(json.dumps({"first": same, "error": message}))
    dist.destroy_process_group()


def test_error_sentinel_carries_the_loaders_message(tmp_path):
    result = _spawn(_error_worker, tmp_path)
    assert result["first"]
    assert result["error"] == "loader failed: cannot decode demo-000000007: truncated PNG (reported by rank 0)"


def _dead_sender_worker(rank, init, out):
    _init(rank, 2, init)
    if rank == 0:
        os._exit(0)  # dies without a word, as a crashed or OOM-killed loader does
    receiver = BatchReceiver(0, depth=2, timeout_s=20)
    try:
        receiver.get()
        error = None
    except TransportError as err:
        error = [type(err).__name__, str(err)]
    out.write_text(json.dumps({"error": error}))


def test_dead_sender_is_an_error_naming_it_not_a_hang(tmp_path):
    error_type, message = _spawn(_dead_sender_worker, tmp_path)["error"]
    assert error_type in ("TransportError", "TransportTimeout")
    assert "from rank 0" in message


def _silent_sender_worker(rank, init, out):
    _init(rank, 2, init)
    if rank == 0:
        time.sleep(3)  # alive but sending nothing: a stuck loader
        os._exit(0)
    try:
        recv_batch(0, timeout_s=0.5)
        error = None
    except TransportTimeout as err:
        error = str(err)
    out.write_text(json.dumps({"error": error}))
    os._exit(0)  # the pending receive would otherwise wait for the peer at shutdown


def test_silent_sender_times_out_naming_the_peer(tmp_path):
    error = _spawn(_silent_sender_worker, tmp_path)["error"]
    assert error == "no batch header from rank 0 within 0.5 s: is that rank alive?"


def _slow_first_batch_worker(rank, init, out):
    _init(rank, 2, init)
    if rank == 0:
        time.sleep(1.5)  # a loader loading its encoders
        for work in send_batch(expected_batch(0), dst=1):
            work.wait()
        time.sleep(3)  # then stuck
        os._exit(0)
    received = []
    try:
        for batch in batches_from(0, timeout_s=0.5, first_timeout_s=10):
            received.append(batch["latents"].shape[0])
        error = None
    except TransportTimeout as err:
        error = str(err)
    out.write_text(json.dumps({"received": received, "error": error}))
    os._exit(0)


def test_the_first_batch_may_take_the_startup_timeout_and_the_next_ones_only_the_timeout(tmp_path):
    result = _spawn(_slow_first_batch_worker, tmp_path)
    assert result["received"] == [expected_batch(0)["latents"].shape[0]]
    assert result["error"] == "no batch header from rank 0 within 0.5 s: is that rank alive?"


def _slow_model_rank_worker(rank, init, out):
    _init(rank, 2, init)
    if rank == 0:  # the loader: its first two sends may wait 10 s, the others 0.5 s
        sends, sent, error = SendWaits(timeout_s=0.5, startup_timeout_s=10, early=2), 0, None
        try:
            for i in range(4):
                sends.wait(send_batch(expected_batch(i), dst=1), 1)
                sent += 1
        except RuntimeError as err:
            error = str(err).split(": ", 1)[0]
        out.write_text(json.dumps({"sent": sent, "error": error}))
        os._exit(0)
    time.sleep(1.5)  # a model rank building its model before it takes a batch
    for _ in range(2):
        recv_batch(0, timeout_s=10)
    time.sleep(3)  # then stuck
    os._exit(0)


def test_a_loader_waits_the_startup_timeout_for_a_model_rank_to_take_its_first_batches_then_only_the_timeout(
        tmp_path):
    result = _spawn(_slow_model_rank_worker, tmp_path)
    assert result == {"sent": 2, "error": "sending a batch to model rank 1 failed or timed out after 0.5 s "
                                          "(did that rank die?)"}


def _groups_worker(rank, init, out):
    _init(rank, 3, init)
    topology = Topology({0: [1, 2]}, 3)
    group = new_groups(topology)
    value = torch.tensor([float(rank)])
    if group is not None:
        dist.all_reduce(value, group=group)
    mine = torch.tensor([float(group is None), value.item()])
    values = [torch.empty(2) for _ in range(3)]
    dist.all_gather(values, mine)
    if rank == 0:
        out.write_text(json.dumps([[bool(v[0]), v[1].item()] for v in values]))
    dist.destroy_process_group()


def test_model_group_excludes_the_loaders(tmp_path):
    # topology.new_groups lives here with the other multi-process tests: the topology tests stay in-process.
    assert _spawn(_groups_worker, tmp_path, nprocs=3) == [[True, 0.0], [False, 3.0], [False, 3.0]]
