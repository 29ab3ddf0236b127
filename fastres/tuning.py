"""Tuning decisions and their on-disk cache, shared by every backend and by "auto".

A decision (the Triton config for a shape, the CUTLASS tile for a shape, the backend "auto" picks
for a shape) is measured once per device + software stack and remembered:

- in memory, for the life of the process, and
- on disk, one JSON file per (device name, fastres, torch, triton, CUDA versions, a digest of
  the kernels' code) under $FASTRES_CACHE_DIR, else $XDG_CACHE_HOME/fastres, else
  ~/.cache/fastres. The digest keeps an update of the kernels within one version (a git
  checkout) from reusing choices, checked against float64 once, that were measured on other
  code; a rebuild of the same sources keeps them.

Writes take a file lock, merge with what is on disk and land by atomic rename, so concurrent
processes never corrupt the file. A corrupt, unreadable or stale file is ignored with one warning
and rebuilt; a read-only directory degrades to in-memory tuning with one warning.

FASTRES_AUTOTUNE=0 turns timing off (cached decisions and heuristics only), =1 forces it on
(also in the Triton interpreter, which tests use); by default timing runs on CUDA devices only,
and never while a CUDA graph is being captured.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch

FORMAT_VERSION = 1
T = TypeVar("T")

_lock = threading.RLock()
_caches: dict[Path, "_CacheFile"] = {}
# (device, cache-directory settings) -> its cache file: the identity (device name, versions,
# digest) is computed once per process, not on every op call.
_by_device: dict[tuple[str, str, str], "_CacheFile"] = {}
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def cache_dir() -> Path:
    """Where tuning files live; FASTRES_CACHE_DIR overrides."""
    if os.environ.get("FASTRES_CACHE_DIR"):
        return Path(os.environ["FASTRES_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastres"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}-triton-interpreter" if device.type == "cpu" else device.type


def code_digest(files: Iterable[Path], *facts: str | None) -> str:
    """sha256 (12 hex digits) of these files' names and contents, in sorted order, and of `facts`."""
    digest = hashlib.sha256()
    for path in sorted(set(files)):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for fact in facts:
        digest.update(str(fact).encode() + b"\0")
    return digest.hexdigest()[:12]


def kernel_files() -> list[Path]:
    """The Triton kernels with their configs and launchers (fastres.kernels)."""
    spec = importlib.util.find_spec("fastres.kernels")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec is not None else []
    return [p for root in roots for p in root.rglob("*.py")]


@functools.cache
def kernels_digest() -> str:
    """The code tuning measures: the Triton kernels and what the CUDA extension was built from."""
    from fastres.backends import cuda

    return code_digest(kernel_files(), cuda.build_digest())


def stack_identity(device: torch.device) -> dict[str, str]:
    """Everything a measured decision depends on besides the problem itself."""
    from fastres import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": device_name(device),
        "fastres": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": str(torch.version.cuda),
        "kernels": kernels_digest(),
    }


class _CacheFile:
    """One JSON file of decisions for one device + software stack."""

    def __init__(self, path: Path, identity: dict[str, str]) -> None:
        self.path = path
        self.identity = identity
        self.entries: dict[str, Any] = {}
        # pick()'s answers in this process, per entry: (the entry's value when answered, the answer,
        # whether it holds only while timing is off). Valid while entries[entry] is that same object.
        self.answers: dict[str, tuple[Any, Any, bool]] = {}
        self.writable = True
        self._load()

    def _read_disk(self) -> dict[str, Any]:
        try:
            text = self.path.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as exc:
            _warn_once(f"read:{self.path}", f"fastres: cannot read tuning cache {self.path} ({exc}); retuning")
            return {}
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT_VERSION or data.get("identity") != self.identity:
                raise ValueError("written by another version or device")
            entries = data["entries"]
            if not isinstance(entries, dict):
                raise ValueError("entries is not a mapping")
            return entries
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            _warn_once(f"corrupt:{self.path}", f"fastres: ignoring unusable tuning cache {self.path} ({exc}); it will be rebuilt")
            return {}

    def _load(self) -> None:
        self.entries = self._read_disk()

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        import fcntl

        lock_path = self.path.with_suffix(".lock")
        with open(lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def put(self, key: str, value: Any) -> None:
        self.entries[key] = value
        if not self.writable:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._file_lock():
                merged = {**self._read_disk(), **self.entries}
                payload = {"format": FORMAT_VERSION, "identity": self.identity, "entries": merged}
                fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
                try:
                    with os.fdopen(fd, "w") as handle:
                        json.dump(payload, handle, indent=1, sort_keys=True)
                    os.replace(tmp, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                self.entries = merged
        except OSError as exc:
            self.writable = False
            _warn_once(
                f"write:{self.path.parent}",
                f"fastres: tuning cache directory {self.path.parent} is not writable ({exc}); tuning stays in memory",
            )


def _cache_for(device: torch.device) -> _CacheFile:
    # Keyed on the raw settings, so the hot path does no path building or user expansion.
    where = (str(device), os.environ.get("FASTRES_CACHE_DIR", ""), os.environ.get("XDG_CACHE_HOME", ""))
    cache = _by_device.get(where)
    if cache is not None:
        return cache
    identity = stack_identity(device)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    safe_device = "".join(ch if ch.isalnum() else "-" for ch in identity["device"]).strip("-")
    path = cache_dir() / f"tuning-{safe_device}-{digest}.json"
    with _lock:
        cache = _caches.get(path)
        if cache is None:
            cache = _caches[path] = _CacheFile(path, identity)
        _by_device[where] = cache
        return cache


def cache_file(device: torch.device) -> Path:
    """The JSON file holding this device's and stack's decisions."""
    return _cache_for(device).path


def lookup(device: torch.device, kind: str, key: str) -> Any | None:
    """A remembered decision for (kind, key) on this device and stack, or None."""
    cache = _cache_for(device)
    with _lock:
        return cache.entries.get(f"{kind}/{key}")


def remember(device: torch.device, kind: str, key: str, value: Any) -> None:
    cache = _cache_for(device)
    with _lock:
        cache.put(f"{kind}/{key}", value)


def forget_in_memory() -> None:
    """Drop the in-process copies (the next lookup rereads disk): what a new process would see."""
    with _lock:
        _caches.clear()
        _by_device.clear()
        _warned.clear()


def may_time(device: torch.device) -> bool:
    """Whether measuring candidates is allowed right now on this device."""
    setting = os.environ.get("FASTRES_AUTOTUNE", "").strip()
    if setting == "0":
        return False
    if device.type == "cuda":
        return not torch.cuda.is_current_stream_capturing()
    return setting == "1"


def time_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Median time of fn in milliseconds, warm-up excluded (triton.testing.do_bench on CUDA)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))
    fn()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


REFINE_TOP = 2  # how many of the fastest first-round candidates have their variants timed


def pick(
    device: torch.device,
    kind: str,
    key: str,
    candidates: Callable[[], Sequence[T]],
    encode: Callable[[T], Any],
    run: Callable[[T], Any],
    default: Callable[[], T],
    refine: Callable[[T], Sequence[T]] | None = None,
    prepare: Callable[[Sequence[T]], None] | None = None,
    check: Callable[[T], str | None] | None = None,
) -> T:
    """Choose among candidates() for (kind, key): remembered choice, else time them all, else default().

    Called on every op call, so an answer is kept in memory for (device, kind, key): a repeat call
    costs a dict lookup and never lists the candidates again (`candidates` and `default` are called
    on a first call only). An answer holds while the remembered choice is unchanged; a default
    given because timing was off (FASTRES_AUTOTUNE=0, a CUDA graph capture) is given again only
    while it still is. Candidates must depend on the device and key alone.

    With `refine`, tuning runs in two rounds: the candidates, then refine(c) of the REFINE_TOP
    fastest (variants of one config such as its TMA or split-K versions, which rank with their
    base config); any of those may be the remembered choice. `prepare` gets each round's
    candidates before they are timed (e.g. to compile them all at once). `check(c)` says why a
    candidate's answers are wrong, or None; it runs before c is timed (fastres.backends.reference.
    wrong_answer: against float64). A candidate that raises or fails its check is skipped with a
    warning (out of shared memory on this GPU, a miscompiled config). When all of them raise,
    default() is the answer for the rest of the process, and nothing is written to disk; when
    none passes and some computed wrongly, RuntimeError (auto, timing a backend that raises so,
    skips it).
    """
    cache = _cache_for(device)
    entry = f"{kind}/{key}"
    remembered = cache.entries.get(entry)
    known = cache.answers.get(entry)
    if known is not None and known[0] is remembered and not (known[2] and may_time(device)):
        return known[1]

    def answer(value: T, given: Any, untimed_only: bool = False) -> T:
        """Keep `value` as the answer while the remembered choice is `given` (the object read)."""
        cache.answers[entry] = (given, value, untimed_only)
        return value

    def remembered_choice(options: Sequence[T]) -> tuple[Any, T | None]:
        """The remembered value as read, and the option it names (None: none does)."""
        with _lock:
            remembered = cache.entries.get(entry)
        if remembered is None:
            return None, None
        found = next((c for c in options if encode(c) == remembered), None)
        if found is None and refine is not None:
            found = next((v for c in options for v in refine(c) if encode(v) == remembered), None)
        return remembered, found

    wrong_answers: list[str] = []  # "candidate why" for each that ran and failed its check

    def time_each(batch: Sequence[T]) -> list[tuple[float, T]]:
        """(median ms, candidate) for each one that runs, after `prepare`; a warning per failure."""
        if prepare is not None and batch:
            prepare(batch)
        timings = []
        for candidate in batch:
            try:
                wrong = None if check is None else check(candidate)
                if wrong is None:
                    timings.append((time_ms(lambda: run(candidate), device), candidate))
                else:
                    wrong_answers.append(f"{encode(candidate)} {wrong}")
            except Exception as exc:  # noqa: BLE001 - a failing candidate is just not chosen
                wrong = f"failed: {exc}"
            if wrong is not None:
                _warn_once(f"cand:{kind}:{key}:{encode(candidate)}",
                           f"fastres: {kind} candidate {encode(candidate)} for {key} {wrong}; not used")
        return timings

    options = candidates()
    given, choice = remembered_choice(options)
    if choice is not None:
        return answer(choice, given)
    if len(options) == 1 and refine is None:
        return answer(default(), given)
    if not may_time(device):
        return answer(default(), given, untimed_only=True)
    with _lock:
        given, choice = remembered_choice(options)  # another thread may have finished meanwhile
        if choice is not None:
            return answer(choice, given)
        timed = time_each(options)
        if refine is not None and timed:
            leaders = [c for _, c in sorted(timed, key=lambda t: t[0])[:REFINE_TOP]]
            seen = {json.dumps(encode(c), sort_keys=True) for c in options}
            extra = []
            for variant in (v for c in leaders for v in refine(c)):
                code = json.dumps(encode(variant), sort_keys=True)
                if code not in seen:
                    seen.add(code)
                    extra.append(variant)
            timed += time_each(extra)
        if not timed and wrong_answers:  # the default is one of them, or untried: nothing known to be right
            raise RuntimeError(f"fastres: no {kind} candidate for {key} computes right on this device; e.g. "
                               f"{wrong_answers[0]}")
        if not timed:  # kept for this process only: a failure may not last (e.g. memory in use)
            return answer(default(), given)
        best = min(timed, key=lambda t: t[0])[1]
        remember(device, kind, key, encode(best))
        return answer(best, cache.entries.get(entry))
