"""Loader rank -> model rank transport over torch.distributed point-to-point, at each batch's real size.

A message is a fixed-size int64 header, then the tensors it describes. The header says what follows:

    [kind, n, then per tensor slot: name id, dtype id, ndim, shape padded to MAX_NDIM]

``kind`` is BATCH (n tensors follow), END (the loader has no more data) or ERROR (a uint8 tensor of n
bytes follows: the loader's error message). The reference padded every latent to the maximum resolution
(filling the rest with inf) so that shapes never had to travel; sending the shapes first costs a few
hundred bytes and lets every bucket travel at its own size (benchmarks/transport_bytes.py).

The text embeddings travel without their zero rows and columns (``pack_text``): most of a short
caption's 77 rows are padding, and a narrower encoder's block is zero past its width. That is most of
a batch's bytes, and leaving exact zeros out loses nothing.

Every receive and send is bounded by its own timeout (``timeout_s``; a longer one while the peer starts),
so the process group's timeout need not be: a dead or stuck peer gives an error naming it, never a hang.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.prefetch import Prefetcher

MAX_TEXT_BLOCKS = 4
TENSOR_NAMES = ("latents", "text", "pooled", "text_rows", "text_layout", *(f"text_{k}" for k in range(MAX_TEXT_BLOCKS)))
DTYPES = (
    torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool
)
MAX_NDIM = 4
SLOT = 3 + MAX_NDIM
HEADER_LEN = 2 + len(TENSOR_NAMES) * SLOT
BATCH, END, ERROR = 1, 2, 3
MAX_MESSAGE_BYTES = 4096


class TransportError(RuntimeError):
    pass


class TransportTimeout(TransportError):
    pass


class LoaderFailed(TransportError):
    pass


def _header(kind: int, n: int, device) -> torch.Tensor:
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[0], header[1] = kind, n
    return header.to(device)


def _batch_header(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[0], header[1] = BATCH, len(batch)
    for slot, (name, tensor) in enumerate(batch.items()):
        if name not in TENSOR_NAMES:
            raise TransportError(f"cannot send tensor {name!r}: a batch holds only {TENSOR_NAMES}")
        if tensor.dtype not in DTYPES:
            raise TransportError(f"cannot send {name} of dtype {tensor.dtype}: supported {DTYPES}")
        if tensor.dim() > MAX_NDIM:
            raise TransportError(f"cannot send {name} with {tensor.dim()} dimensions (at most {MAX_NDIM})")
        start = 2 + slot * SLOT
        fields = [TENSOR_NAMES.index(name), DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape]
        header[start : start + len(fields)] = torch.tensor(fields, dtype=torch.int64)
    return header


def pack_text(text: torch.Tensor, blocks: int = 1) -> dict[str, torch.Tensor]:
    """(B, L, D) text as its ``blocks`` row blocks (one per sequence encoder) without the all-zero rows, each
    block at the width of its last used column; ``text_rows`` (B, L) marks the rows kept and
    ``text_layout`` holds [dtype id, D, each block's width]. Lossless: only exact zeros are left out (a
    -0.0 comes back as 0.0, which computes the same). A block with nothing left sends no tensor."""
    if text.dim() != 3 or not 1 <= blocks <= MAX_TEXT_BLOCKS or text.shape[1] % blocks:
        raise TransportError(f"cannot pack text of shape {tuple(text.shape)} into {blocks} row blocks")
    if text.dtype not in DTYPES:
        raise TransportError(f"cannot send text of dtype {text.dtype}: supported {DTYPES}")
    per = text.shape[1] // blocks
    used = text.ne(0)
    rows = used.any(-1)
    packed, widths = {"text_rows": rows.to(torch.uint8)}, []
    for k in range(blocks):
        span = slice(k * per, (k + 1) * per)
        columns = used[:, span].flatten(0, 1).any(0).nonzero()
        width = int(columns.max()) + 1 if len(columns) else 0
        values = text[:, span, :width][rows[:, span]]
        widths.append(width)
        if values.numel():
            packed[f"text_{k}"] = values
    layout = [DTYPES.index(text.dtype), text.shape[2], *widths]
    return {**packed, "text_layout": torch.tensor(layout, dtype=torch.int64, device=text.device)}


def unpack_text(packed: dict[str, torch.Tensor]) -> torch.Tensor:
    """The (B, L, D) text that ``pack_text`` packed."""
    dtype_id, dim, *widths = packed["text_layout"].tolist()
    rows = packed["text_rows"].bool()
    per = rows.shape[1] // len(widths)
    text = torch.zeros(*rows.shape, dim, dtype=DTYPES[dtype_id], device=rows.device)
    for k, width in enumerate(widths):
        span = slice(k * per, (k + 1) * per)
        if f"text_{k}" in packed:
            text[:, span, :width][rows[:, span]] = packed[f"text_{k}"]
    return text


def pack_batch(batch: dict[str, torch.Tensor], text_blocks: int) -> dict[str, torch.Tensor]:
    """``batch`` as it goes over the wire: its ``text`` through ``pack_text`` (``recv_batch`` unpacks it)."""
    if "text" not in batch:
        return batch
    return {name: t for name, t in batch.items() if name != "text"} | pack_text(batch["text"], text_blocks)


def send_batch(batch: dict[str, torch.Tensor], dst: int, group=None) -> list[dist.Work]:
    """Start sending ``batch`` (plain or ``pack_batch``ed) to global rank ``dst``; keep its tensors alive and
    wait on the returned works before reusing them."""
    if not batch:
        raise TransportError("cannot send an empty batch")
    tensors = [t.contiguous() for t in batch.values()]
    device = tensors[0].device
    works = [dist.isend(_batch_header(batch).to(device), dst, group=group)]
    works.extend(dist.isend(tensor, dst, group=group) for tensor in tensors)
    return works


class SendWaits:
    """A loader's waits for its sends to complete, which needs the model rank to take them. A model rank
    takes its first batches, then builds its model (loads a checkpoint, compiles its first step), so the
    first ``early`` sends to each rank may wait ``startup_timeout_s``; every later one ``timeout_s``."""

    def __init__(self, timeout_s: float, startup_timeout_s: float, early: int):
        self.timeout_s, self.startup_timeout_s, self.early = timeout_s, startup_timeout_s, early
        self._done: dict[int, int] = {}

    def wait(self, works: list[dist.Work], dst: int) -> None:
        starting = self._done.get(dst, 0) < self.early
        limit = max(self.timeout_s, self.startup_timeout_s) if starting else self.timeout_s
        try:
            for work in works:
                work.wait(timeout=timedelta(seconds=limit))
        except RuntimeError as err:
            still = " or is it still starting (loading, compiling)?" if starting else "?"
            raise RuntimeError(f"sending a batch to model rank {dst} failed or timed out after {limit:g} s "
                               f"(did that rank die{still}): {err}") from err
        self._done[dst] = self._done.get(dst, 0) + 1


def _send_now(tensor: torch.Tensor, dst: int, group, timeout_s: float) -> None:
    dist.isend(tensor, dst, group=group).wait(timeout=timedelta(seconds=timeout_s))


def send_end(dst: int, group=None, device="cpu", timeout_s: float = 300.0) -> None:
    """Tell ``dst`` that no more batches follow (it then stops cleanly)."""
    _send_now(_header(END, 0, device), dst, group, timeout_s)


def send_error(dst: int, message: str, group=None, device="cpu", timeout_s: float = 300.0) -> None:
    """Tell ``dst`` that its loader failed, with the reason, so it exits non-zero instead of waiting."""
    data = message.encode("utf-8", errors="replace")[:MAX_MESSAGE_BYTES]
    _send_now(_header(ERROR, len(data), device), dst, group, timeout_s)
    if data:
        _send_now(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device), dst, group, timeout_s)


def _receive(tensor: torch.Tensor, src: int, group, timeout_s: float, what: str) -> torch.Tensor:
    # Posting the receive fails too when the connection to ``src`` is already closed (gloo raises from irecv
    # itself: seen when a loader died before the next header was posted), so both steps name the peer.
    try:
        dist.irecv(tensor, src, group=group).wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as err:  # gloo and NCCL report timeouts and closed connections as RuntimeError
        text = str(err)
        if "timed out" in text.lower() or "timeout" in text.lower():
            raise TransportTimeout(f"no {what} from rank {src} within {timeout_s:g} s: is that rank alive?") from err
        raise TransportError(f"receiving {what} from rank {src} failed (did that rank die?): {text}") from err
    return tensor


def recv_batch(src: int, group=None, device="cpu", timeout_s: float = 300.0) -> dict[str, torch.Tensor] | None:
    """The next batch from global rank ``src``; None when it sent the end sentinel.

    Raises ``LoaderFailed`` when ``src`` sent its error sentinel and ``TransportTimeout`` after ``timeout_s``.
    """
    header = _receive(torch.empty(HEADER_LEN, dtype=torch.int64, device=device), src, group, timeout_s, "batch header")
    kind, n, *slots = header.tolist()
    if kind == END:
        return None
    if kind == ERROR:
        message = "(no message)"
        if n:
            data = _receive(torch.empty(n, dtype=torch.uint8, device=device), src, group, timeout_s, "error message")
            message = bytes(data.cpu().tolist()).decode("utf-8", errors="replace")
        raise LoaderFailed(f"loader failed: {message} (reported by rank {src})")
    if kind != BATCH or not 0 < n <= len(TENSOR_NAMES):
        raise TransportError(f"malformed header from rank {src}: kind {kind}, {n} tensors")
    batch: dict[str, torch.Tensor] = {}
    for slot in range(n):
        name_id, dtype_id, ndim, *shape = slots[slot * SLOT : (slot + 1) * SLOT]
        if not (0 <= name_id < len(TENSOR_NAMES) and 0 <= dtype_id < len(DTYPES) and 0 <= ndim <= MAX_NDIM):
            raise TransportError(f"malformed header from rank {src}: tensor slot {slot} is {slots[slot * SLOT:][:SLOT]}")
        name = TENSOR_NAMES[name_id]
        tensor = torch.empty(shape[:ndim], dtype=DTYPES[dtype_id], device=device)
        batch[name] = _receive(tensor, src, group, timeout_s, f"tensor {name!r}")
    if "text_layout" in batch:
        text_parts = {name: batch.pop(name) for name in list(batch) if name.startswith("text_")}
        batch["text"] = unpack_text(text_parts)
    return batch


def batches_from(src: int, group=None, device="cpu", timeout_s: float = 300.0,
                 first_timeout_s: float | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Every batch global rank ``src`` sends, until its end sentinel; the first may take ``first_timeout_s``."""
    wait = first_timeout_s or timeout_s
    while (batch := recv_batch(src, group=group, device=device, timeout_s=wait)) is not None:
        wait = timeout_s
        yield batch


class BatchReceiver(Prefetcher):
    """Receives batches from one loader in a background thread, up to ``depth`` ahead of the training step.

    ``get()`` returns (batch, seconds waited for it); the batch is None once the loader has sent its end
    sentinel. A loader failure or a timeout in the thread is raised by ``get()``; ``close()`` consumes what
    the loader still sends (each receive stays bounded by ``timeout_s``).
    """

    def __init__(self, src: int, depth: int, device="cpu", group=None, timeout_s: float = 300.0,
                 first_timeout_s: float | None = None):
        self.src = src
        super().__init__(batches_from(src, group, device, timeout_s, first_timeout_s), depth, name=f"recv-from-{src}")
