"""Process memory housekeeping."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # torch is not imported here, so that `enable_huge_page_allocations` can run before it is
    import torch

MADV_DONTNEED = 4  # Linux
MADV_PAGEOUT = 21  # Linux >= 5.4


@functools.lru_cache(maxsize=1)
def _glibc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.malloc_trim  # only glibc has it
    except (OSError, AttributeError):
        return None
    return libc


HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def enable_huge_page_allocations() -> bool:
    """Ask PyTorch's CPU allocator for 2 MB transparent huge pages for tensors of 2 MB and more
    (`THP_MEM_ALLOC_ENABLE=1`). torch reads the variable once, at its first allocation, so this only acts when
    called before torch is imported (the `clipvis` command and the benchmarks call it first thing); a value the
    user set is left as it is. Returns whether the variable is set for this process's torch.

    Why: a frame's large temporaries otherwise fault in 4 KB pages; on an AVX2 EPYC VM that was 1.3M page faults
    and 3.6 s of system time per 24 frames, and glibc's heap fragmented to a 100 MB higher peak (README "Speed")."""
    if "torch" not in sys.modules:
        os.environ.setdefault(HUGE_PAGES_VARIABLE, "1")
    return os.environ.get(HUGE_PAGES_VARIABLE) == "1"


def release_freed_memory() -> None:
    """Return freed heap memory to the operating system (glibc keeps freed blocks inside its heap, so a long run
    of same-sized frame forwards otherwise ratchets resident memory up by fragmentation). Takes about a
    millisecond; a no-op where the C library is not glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def anonymous_resident_bytes() -> Optional[int]:
    """This process's resident memory that maps no file (heap, tensors), in bytes, from /proc/self/statm
    (resident minus shared pages); None where the OS does not tell."""
    try:
        with open("/proc/self/statm") as statm:
            fields = statm.read().split()
    except OSError:
        return None
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


class TrimWhenGrown:
    """Called between the windows of a video: returns freed heap to the system (`release_freed_memory`) only
    once the anonymous resident memory has grown more than `margin_bytes` above what it was after the first
    window, so that heap fragmentation cannot creep up over a long video while the steady per-frame working
    set stays mapped. Trimming after every window instead gave that working set back each time, and every
    next window page-faulted it in again (where the system is a VM that reports freed pages to its host, each
    fault is the host's too): on an AMX Xeon VM, 24 frames in bf16 took 5.45-5.59 s instead of 5.64 and page-
    faulted 33k times instead of 98k (README "Speed"). Where the OS does not report resident memory it trims
    every time. Returns whether it trimmed."""

    def __init__(self, margin_bytes: int = 64 * 2**20):
        self.margin_bytes = margin_bytes
        self.baseline: Optional[int] = None

    def __call__(self) -> bool:
        resident = anonymous_resident_bytes()
        if resident is not None and self.baseline is None:
            self.baseline = resident
            return False
        if resident is not None and resident <= self.baseline + self.margin_bytes:
            return False
        release_freed_memory()
        return True


def _file_backed_ranges() -> List[Tuple[int, int]]:
    """Address ranges [start, end) of this process's memory mappings that map a file (Linux)."""
    ranges = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def _whole_pages(tensor: torch.Tensor) -> Tuple[int, int]:
    """[start, end) of the whole memory pages inside `tensor`'s storage (empty when end <= start)."""
    storage = tensor.untyped_storage()
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    return -(-first // page) * page, last // page * page


def evict_file_pages(dead: Sequence[torch.Tensor], keep: Sequence[torch.Tensor] = ()) -> int:
    """Drop from resident memory the pages of tensors that are no longer used and were memory-mapped from a
    file (weights of a checkpoint loaded with mmap, since replaced): the mapping stays alive as long as any
    other tensor of the file does, so without this their pages stay resident. Only whole pages inside a
    file-backed mapping and overlapping none of the `keep` tensors are dropped (were they read again, the
    kernel would reload them from the file). Returns the bytes dropped; 0 off Linux/glibc."""
    libc = _glibc()
    if libc is None or not dead or not os.path.exists("/proc/self/maps"):
        return 0
    mapped = _file_backed_ranges()
    kept = [(t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
            for t in keep if t.device.type == "cpu"]
    dropped = 0
    for tensor in dead:
        if tensor.device.type != "cpu":
            continue
        start, end = _whole_pages(tensor)
        if end <= start or not any(s <= start and end <= e for s, e in mapped):
            continue
        if any(s < end and start < e for s, e in kept):
            continue
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) == 0:
            dropped += end - start
    return dropped


def page_out(tensors: Sequence[torch.Tensor]) -> None:
    """Hint the kernel to take the pages of `tensors` out of this process's resident memory now (weights
    needed only once in a while, e.g. CLIP's text tower between vocabularies). Contents never change: pages
    memory-mapped from a checkpoint are read back from the file when next used; anonymous memory stays
    unless there is swap. A no-op off Linux/glibc or on kernels without MADV_PAGEOUT."""
    libc = _glibc()
    if libc is None:
        return
    for tensor in tensors:
        if tensor.device.type != "cpu":
            continue
        start, end = _whole_pages(tensor)
        if end > start:
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT)
