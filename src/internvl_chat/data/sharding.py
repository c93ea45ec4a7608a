"""Data-parallel runs of the inference verbs (``eval``, ``caption``, ``select``): which process handles which item,
where each process writes, how the parts are merged and how a killed run resumes. One rule for every verb.

    torchrun --nproc-per-node 8 -m internvl_chat.cli eval --model DIR --task textvqa ...
    accelerate launch --num_processes 8 -m internvl_chat.cli caption images/ --model DIR --output caps.json

    from internvl_chat.data.sharding import ShardedJsonl, launch_state, shard
    ranks = launch_state()                      # rank 0 of 1 in a plain run; PartialState under a launcher
    store = ShardedJsonl("out.jsonl", key=lambda r: r["id"], ranks=ranks)
    done = store.read()                         # out.jsonl + every out.jsonl.rankN part, whatever wrote them
    mine = shard([i for i in items if i not in done], ranks.rank, ranks.world_size)
    ranks.barrier()                             # every process has read before anyone appends
    for batch in ...: store.append(records)     # this process's own file
    records = store.finish(order)               # barrier; the main process merges the parts (others get None)

* **Processes**: a launched run (``torchrun`` / ``accelerate launch``, which set ``LOCAL_RANK``) joins the process
  group through accelerate's ``PartialState``: NCCL with one GPU per process (``cuda:LOCAL_RANK``) when CUDA is
  present, gloo on CPU. A plain run is rank 0 of 1 and creates no process group.
* **Files**: a job's output is one JSONL file PATH (the merged file) plus, while several processes work, one part
  per process, ``PATH.rankN``; each line is one finished item, named by ``key(record)``. A single process appends to
  PATH itself.
* **Appends**: a process appends only to its own file, a whole batch as one ``write`` of complete lines, then
  ``fsync``; a torn last line left by a killed process is isolated by starting the next append on a fresh line.
* **Resume**: every process reads PATH and every part, whatever world size wrote them; complete JSON lines only (a
  torn or unreadable line is skipped with a warning); a later line for a key wins. What is not done is dealt out
  again, so a resumed run may use another number of processes.
* **Sharding**: the items still to do, in input order, are dealt round-robin: process r of N takes positions r,
  r + N, r + 2N... (shares differ by at most one item, and a file whose long items are grouped still splits evenly);
  each verb then orders its own share (eval: by prompt length, for batching).
* **Merge**: after a barrier the main process reads everything, puts the records in the caller's order, writes
  PATH atomically (temporary file + ``os.replace``) and deletes the parts. The merged file depends only on the
  records and the order, never on which process wrote what, so one process and N give the same bytes.
"""

from __future__ import annotations

import datetime
import glob
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

__all__ = [
    "EXIT_AFTER_ENV",
    "Ranks",
    "ShardedJsonl",
    "append_jsonl",
    "close_process_group",
    "launch_state",
    "launched",
    "log_level",
    "ordered_by",
    "part_path",
    "part_paths",
    "read_jsonl",
    "shard",
]

T = TypeVar("T")

# Testing hook: a process exits (SIGKILL to itself) once it has appended at least this many records, so tests can
# kill a multi-process run mid-way at a known point and check that it resumes.
EXIT_AFTER_ENV = "INTERNVL_CHAT_EXIT_AFTER_ITEMS"
# [IMPORTANT] a barrier waits for the slowest process (its whole share of a benchmark, or a model load); the default
# NCCL timeout (10 min) would kill a healthy run. A launcher ends every process when one dies, so nothing hangs.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)
_PART = re.compile(r"\.rank(\d+)$")


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Process ``rank``'s share of ``items``: positions ``rank, rank + world_size, ...`` (round-robin)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
    return list(items[rank::world_size])


def part_path(path: str | os.PathLike, rank: int) -> str:
    """The part file process ``rank`` appends to: ``PATH.rankN``."""
    return f"{os.fspath(path)}.rank{rank}"


def part_paths(path: str | os.PathLike) -> list[str]:
    """The part files of PATH that exist, by rank number (``.rank10`` after ``.rank2``)."""
    base = os.fspath(path)
    found = []
    for name in glob.glob(glob.escape(base) + ".rank*"):
        match = _PART.search(name[len(base) :])
        if match and name[len(base) :] == match.group(0):
            found.append((int(match.group(1)), name))
    return [name for _, name in sorted(found)]


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSONL file (missing file: none). A line that is not a JSON object -- a line torn by a killed
    writer, or garbage -- is skipped with a warning naming the file and line."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return []
    records = []
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if not isinstance(record, dict):
                logger.warning("%s:%d: ignoring an unreadable line (interrupted write?)", path, line_no)
                continue
            records.append(record)
    return records


def append_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]], sync: bool = False) -> None:
    """Appends records as JSON lines in one ``write``, starting on a fresh line; ``sync``: ``fsync`` after.

    # [IMPORTANT] a run killed mid-write leaves a torn last line without "\\n"; appending right after it would glue
    # the next record onto it and lose that record too. One newline first isolates the torn line.
    """
    path = os.fspath(path)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    if not data:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


class Ranks:
    """This process's place in a launch: ``rank`` of ``world_size``, its device, and the two collectives the verbs
    need (``barrier``, ``gather``). ``Ranks()`` is a plain run (rank 0 of 1, no process group); ``state`` is
    accelerate's ``PartialState`` (or an ``Accelerator``) of a launched run."""

    def __init__(self, state: Any = None, rank: int = 0, world_size: int = 1):
        self.state = state
        if state is not None:
            rank, world_size = state.process_index, state.num_processes
        self.rank, self.world_size = int(rank), int(world_size)
        self.local_rank = int(getattr(state, "local_process_index", rank) or 0) if state is not None else rank
        self.device = str(state.device) if state is not None and world_size > 1 else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            self.state.wait_for_everyone()

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every process, by rank (a plain run: ``[obj]``)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, world_size={self.world_size}, device={self.device})"


def launched() -> bool:
    """Whether this process was started by a launcher (torchrun / accelerate launch set ``LOCAL_RANK``)."""
    return int(os.environ.get("LOCAL_RANK", -1)) != -1 or int(os.environ.get("WORLD_SIZE", 1) or 1) > 1


def log_level(level: int = logging.INFO) -> int:
    """``level`` for the main process of a launch (or a plain run), WARNING for the others (one copy of the logs)."""
    return level if int(os.environ.get("RANK", 0) or 0) == 0 else max(level, logging.WARNING)


def launch_state(device: str | None = None) -> Ranks:
    """The process's `Ranks`: a plain run is rank 0 of 1 (``device`` stays the caller's choice); a launched one joins
    the process group through ``PartialState`` -- each process on ``cuda:LOCAL_RANK`` (NCCL) when CUDA is present
    and ``device`` is not ``cpu``, else on CPU (gloo)."""
    if not launched():
        return Ranks()
    import torch
    from accelerate import PartialState

    # [IMPORTANT] without cpu=True accelerate ignores torchrun's RANK / WORLD_SIZE on a machine without CUDA (every
    # process would think it is alone and do everything).
    cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
    ranks = Ranks(state)
    if ranks.world_size > 1 and device not in (None, "cpu", "cuda", ranks.device):
        logger.warning(
            "--device %s ignored: under a launcher each process uses its own device (%s)", device, ranks.device
        )
    return ranks


def close_process_group() -> None:
    """Leaves the process group, if this process joined one (the end of a launched command)."""
    if not launched():
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _exit_after() -> int | None:
    value = os.environ.get(EXIT_AFTER_ENV, "").strip()
    return int(value) if value else None


class ShardedJsonl:
    """A resumable JSONL output written by one or many processes: PATH plus ``PATH.rankN`` parts (module docstring).

    ``key(record)`` names a record's item (a str); ``ranks`` is this process's `Ranks`; ``sync``: ``fsync`` each
    append (a finished batch survives a power cut, not just a killed process).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        key: Callable[[Mapping[str, Any]], str],
        ranks: Ranks | None = None,
        sync: bool = True,
    ):
        self.path = os.fspath(path)
        self.key = key
        self.ranks = ranks or Ranks()
        self.sync = sync
        self.appended = 0
        self.exit_after = _exit_after()

    @property
    def own_path(self) -> str:
        """The file this process appends to: PATH for a single process, its part otherwise."""
        return self.path if self.ranks.world_size == 1 else part_path(self.path, self.ranks.rank)

    def files(self) -> list[str]:
        return [self.path, *part_paths(self.path)]

    def read(self) -> dict[str, dict[str, Any]]:
        """``{key: record}`` of PATH then the parts by rank; a later line for a key wins (its first place is kept)."""
        records: dict[str, dict[str, Any]] = {}
        for file in self.files():
            for record in read_jsonl(file):
                try:
                    key = self.key(record)
                except (KeyError, TypeError, ValueError):
                    logger.warning("%s: ignoring a record without its key: %.80s", file, json.dumps(record))
                    continue
                records[key] = record
        return records

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        append_jsonl(self.own_path, records, sync=self.sync)
        self.appended += len(records)
        if self.exit_after is not None and self.appended >= self.exit_after:
            import signal

            logger.warning("%s=%d: process %d killing itself", EXIT_AFTER_ENV, self.exit_after, self.ranks.rank)
            os.kill(os.getpid(), signal.SIGKILL)

    def merge(
        self, order: Callable[[dict[str, dict[str, Any]]], list[dict[str, Any]]] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Main process only: PATH := ``order(records)`` (default: the read order), written atomically; the parts are
        deleted. Without ``order`` and without parts nothing is rewritten. Returns ``{key: record}`` as written."""
        parts = part_paths(self.path)
        records = self.read()
        if order is None and not parts:
            return records
        ordered = order(records) if order is not None else list(records.values())
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        for part in parts:
            os.remove(part)
        return {self.key(r): r for r in ordered}

    def finish(
        self, order: Callable[[dict[str, dict[str, Any]]], list[dict[str, Any]]] | None = None
    ) -> dict[str, dict[str, Any]] | None:
        """Every process: a barrier (all appends are done), then the main process merges (`merge`) and gets the
        records; the others get None."""
        self.ranks.barrier()
        if not self.ranks.is_main:
            return None
        return self.merge(order)

    def remove(self) -> None:
        """Deletes PATH and its parts (their records now live elsewhere)."""
        for file in self.files():
            if os.path.exists(file):
                os.remove(file)


def ordered_by(keys: Sequence[str]) -> Callable[[dict[str, dict[str, Any]]], list[dict[str, Any]]]:
    """An ``order`` for `ShardedJsonl.merge`: the records of ``keys`` in that order, then any others in read order."""

    def order(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        wanted = set(keys)
        first = [records[k] for k in dict.fromkeys(keys) if k in records]
        return first + [r for k, r in records.items() if k not in wanted]

    return order
