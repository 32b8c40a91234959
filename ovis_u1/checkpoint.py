"""Reading an Ovis-U1 checkpoint directory (Hugging Face layout) into modules built on the meta device.

Every key is checked against the module before any weight is read: a missing, unexpected or mis-shaped key is an
error that names it. Weights are read tensor by tensor from the memory-mapped safetensors files and converted
straight to the target dtype and device, so the whole model never exists twice in full precision.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import torch

from .errors import CheckpointError  # noqa: F401 — re-exported: defined here first

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
GGUF_VAE_FILE = "vae.safetensors"  # a GGUF folder's VAE (ovis_u1.gguf)
TIED_KEYS = ("llm.lm_head.weight",)  # tied to llm.model.embed_tokens.weight, never stored


def is_ovis_u1_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds an Ovis-U1 config.json. For listing folders: a config.json that cannot be read
    (missing, no permission, invalid) is quietly not one; loading that folder explains why (``check_directory``)."""
    try:
        return read_json(Path(directory) / "config.json").get("model_type") == "ovis_u1"
    except CheckpointError:
        return False


def read_json(path: Path, what: str = "") -> dict:
    """A checkpoint JSON file as a dict; unreadable, invalid or non-object files are CheckpointErrors naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except PermissionError as e:
        raise CheckpointError(f"cannot read {path}: permission denied; make the file readable (e.g. chmod a+r)") from e
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path} ({e}); download it again") from e
    try:
        data = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); download {what or path.name} again") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object; download it again")
    return data


def check_directory(directory: str | Path) -> Path:
    directory = Path(directory)
    try:
        return _check_directory(directory)
    except PermissionError as e:  # a folder on the way to it may not be entered: looking inside fails, not reading
        raise CheckpointError(
            f"cannot open model folder {str(directory)!r}: permission denied ({e.filename or directory}); make it and "
            "the folders above it readable and enterable by this process (e.g. chmod a+rx)"
        ) from e


def _check_directory(directory: Path) -> Path:
    if directory.is_file():
        parent = f"; use its folder {str(directory.parent)!r}" if (directory.parent / "config.json").is_file() else ""
        raise CheckpointError(
            f"model path {str(directory)!r} is a file, but a checkpoint is a folder (config.json, weights, "
            f"tokenizer files){parent}"
        )
    if not directory.is_dir():
        raise CheckpointError(f"model folder {str(directory)!r} does not exist")
    if not os.access(directory, os.R_OK | os.X_OK):
        raise CheckpointError(f"cannot open model folder {str(directory)!r}: permission denied (this process may not "
                              "list or enter it); make it readable and enterable (e.g. chmod a+rx)")
    config = directory / "config.json"
    if not config.is_file():
        raise CheckpointError(
            f"model folder {str(directory)!r} has no config.json; put the complete ATH-MaaS/Ovis-U1-3B download there"
        )
    model_type = read_json(config).get("model_type")
    if model_type != "ovis_u1":
        raise CheckpointError(
            f"{config} is not an Ovis-U1 config (model_type must be 'ovis_u1', it is {model_type!r}); choose an "
            "Ovis-U1 checkpoint folder"
        )
    return directory


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or the single file."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map of file names); "
                                  "download it again")
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
    elif (directory / SINGLE_FILE).is_file():
        files = [directory / SINGLE_FILE]
    elif any(directory.glob("*.gguf")):  # a GGUF folder (ovis_u1.gguf): the VAE beside the GGUF file
        files = [directory / GGUF_VAE_FILE]
        if not files[0].is_file():
            raise CheckpointError(f"GGUF model folder {str(directory)!r} has no {GGUF_VAE_FILE} (the fp32 VAE that "
                                  "'python -m ovis_u1 quantize' writes beside the .gguf file); convert the model again")
    else:
        raise CheckpointError(
            f"no weights in {str(directory)!r}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards"
        )
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"weight shard {f.name} named by {INDEX_FILE} is missing from {str(directory)!r}")
        if not os.access(f, os.R_OK):
            raise CheckpointError(f"cannot read {f}: permission denied; make the file readable (e.g. chmod a+r)")
    return files


def stored_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """key → (shape, file), from the safetensors headers only (no tensor data is read).

    Every header entry is checked (``read_header``): its data offsets also reveal a file cut short, which safetensors
    itself would only notice when the missing tensor is read.
    """
    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for path in files:
        try:
            fh = open(path, "rb")
        except PermissionError as e:
            raise CheckpointError(f"cannot read {path}: permission denied; make the file readable (e.g. chmod a+r)") from e
        with fh:
            _, tensors = read_header(fh, path)
        not_float = sorted(f"{k} ({v['dtype']})" for k, v in tensors.items() if v["dtype"] not in FLOAT_DTYPES)
        if not_float:
            raise CheckpointError(
                f"{path} stores tensor(s) that are not floating point: {_names(not_float)}; Ovis-U1 weights are "
                "F32/F16/BF16 — this file was converted or quantized wrongly; use an unmodified ATH-MaaS/Ovis-U1-3B "
                "download"
            )
        for key, info in tensors.items():
            shapes[key] = (tuple(info["shape"]), path)
    return shapes


def read_header(file, path: Path) -> tuple[int, dict[str, dict]]:
    """The header of the open safetensors ``file``: (where the tensor data starts, key → {dtype, shape,
    data_offsets}), every entry checked against the layout the format prescribes (github.com/huggingface/
    safetensors, README "Format"): a dtype name, a shape of whole numbers, offsets [begin, end] into the data with
    end − begin = numel · itemsize, no two tensors sharing bytes, none past the end of the file. A bad entry
    would otherwise be read as whatever bytes its offsets point at, or fail in torch with an error that names
    neither the file nor the key."""
    size = os.fstat(file.fileno()).st_size
    try:
        header_len = int.from_bytes(file.read(8), "little")
        if not 0 < header_len <= size - 8:
            raise ValueError(f"header length {header_len} does not fit a file of {size} bytes")
        header = json.loads(file.read(header_len))
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    except (ValueError, OSError) as e:
        raise CheckpointError(f"cannot read {path} ({e}); the file is truncated or corrupt — download it "
                              "again") from e
    metadata = header.get("__metadata__")
    if metadata is not None and not isinstance(metadata, dict):
        raise CheckpointError(f"{path} is corrupt: its __metadata__ is a JSON {type(metadata).__name__}, not an "
                              "object; download it again")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    data_start = 8 + header_len
    for key, info in tensors.items():
        _check_entry(path, key, info)
    spans = sorted((info["data_offsets"][0], info["data_offsets"][1], key) for key, info in tensors.items()
                   if info["data_offsets"][1] > info["data_offsets"][0])
    for (_, end, key), (begin, _, next_key) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(
                f"{path} is corrupt: tensors {key!r} (bytes {tensors[key]['data_offsets']}) and {next_key!r} (bytes "
                f"{tensors[next_key]['data_offsets']}) overlap in its header's data_offsets; download it again")
    end, last = max(((e, k) for _, e, k in spans), default=(0, None))
    if size < data_start + end:
        raise CheckpointError(f"{path} is truncated: {size} bytes on disk, {data_start + end} expected (tensor "
                              f"{last!r} has data_offsets {tensors[last]['data_offsets']} after a header of "
                              f"{data_start} bytes); download it again")
    return data_start, tensors


def _check_entry(path: Path, key: str, info) -> None:
    """One header entry: {"dtype": known name, "shape": [whole numbers ≥ 0], "data_offsets": [begin, end]}."""

    def bad(problem: str):
        raise CheckpointError(f"{path} is corrupt: the header entry of tensor {key!r} {problem}; download it again")

    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(info, dict):
        bad(f"is a JSON {type(info).__name__}, not an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            bad(f"has no {field}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or not dtype:
        bad(f"has dtype {json.dumps(dtype)}, not a safetensors dtype name such as \"F32\"")
    if not isinstance(shape, list) or not all(whole(n) for n in shape):
        bad(f"has shape {json.dumps(shape)}, not a list of whole numbers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(whole(n) for n in offsets):
        bad(f"has data_offsets {json.dumps(offsets)}, not [begin, end] with whole numbers")
    begin, end = offsets
    if begin > end:
        bad(f"has data_offsets {offsets}: it begins after it ends")
    if dtype not in _DTYPE_BYTES:  # a name this table does not know: stored_shapes reports it as not floating point
        return
    needed = math.prod(shape) * _DTYPE_BYTES[dtype]
    if end - begin != needed:
        bad(f"has data_offsets {offsets} ({end - begin} bytes), but its shape {shape} in {dtype} takes {needed} bytes")


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


# The smallest magnitude byte (sign bit cleared) that is NaN or inf in each fp8 format: e4m3fn has no inf and one
# NaN magnitude (0x7F); e5m2 is IEEE-like, an all-ones exponent (0x7C and up) is inf or NaN.
_FP8_FIRST_NON_FINITE = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


def _all_finite(part: torch.Tensor) -> bool:
    """Whether a (chunk of a) weight has no NaN/inf. One sum in the tensor's own dtype reads it once at memory speed
    (torch accumulates half types in fp32) and is exact in one direction: any NaN/inf makes the sum non-finite. Only
    a non-finite sum of finite values (an overflow) needs the element-wise test. fp8 is checked on its bytes: torch
    converts fp8 to anything else ~20× slower than it reads bytes."""
    if part.dtype in _FP8_FIRST_NON_FINITE:
        magnitude = torch.bitwise_and(part.view(torch.uint8), 0x7F)
        return int(magnitude.max()) < _FP8_FIRST_NON_FINITE[part.dtype]
    if part.element_size() == 1:  # another fp8 format: bf16 holds every fp8 value
        part = part.to(torch.bfloat16)
    if bool(torch.isfinite(part.sum())):
        return True
    return bool(torch.isfinite(part).all())


def non_finite_error(corrupt: list[str], overflow: list[str], directory: str | Path) -> CheckpointError:
    """NaN/inf in a weight turns every output into garbage without an error. ``corrupt``: the checkpoint itself
    holds them (a broken download); ``overflow``: finite in the checkpoint, beyond the range of the dtype loaded."""
    problems = []
    if corrupt:
        problems.append(f"the checkpoint in {str(directory)!r} has NaN or infinite values in {_names(corrupt)}; the "
                        "weights are corrupt — download them again")
    if overflow:
        fixes = []
        if any("torch.float16" in b for b in overflow):
            fixes.append("load in bf16 or fp32 instead of fp16")
        if any("float8" in b for b in overflow):
            fixes.append("use weight_dtype fp8_e4m3fn (it saturates) or default instead of fp8_e5m2")
        problems.append(f"{_names(overflow)} hold values beyond the range of the dtype they are loaded in (they are "
                        f"finite in the checkpoint, in {str(directory)!r}): " + "; ".join(fixes))
    return CheckpointError(". ".join(problems) + ".")


def validate_keys(expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[tuple[int, ...], Path]]) -> None:
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if tuple(expected[k]) != stored[k][0])
    problems = []
    if missing:
        problems.append(f"missing key(s): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s): {_names(unexpected)}")
    if wrong:
        problems.append(
            "wrong shape: "
            + _names([f"{k} (checkpoint {list(stored[k][0])}, model {list(expected[k])})" for k in wrong])
        )
    if problems:
        raise CheckpointError(
            "the checkpoint does not match the Ovis-U1 architecture described by its config.json — "
            + "; ".join(problems)
            + ". Use an unmodified ATH-MaaS/Ovis-U1-3B download."
        )


def _names(items: list[str], most: int = 8) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


# safetensors dtype names → torch dtypes
_STORED_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
# bytes per value of every whole-byte safetensors dtype (the format's Dtype enum), also those Ovis-U1 never stores
_DTYPE_BYTES = {**{name: dtype.itemsize for name, dtype in _STORED_DTYPES.items()},
                "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1}
_CHUNK_BYTES = 32 << 20  # a tensor that needs converting is converted in pieces of this size
_RELEASE = hasattr(mmap, "MADV_DONTNEED")  # can mapped file pages be dropped from this process again?
_CPU = torch.device("cpu")


class _ReadAhead:
    """Keeps the kernel reading a file up to ``window`` bytes past the reader's position, from a background thread.

    Tensors are converted from a map of the file, and a page fault reads only a little around the faulting page: on
    a cold disk the CPU would wait for every piece, then the disk for the CPU. Asking for the pages in small steps
    ahead (posix_fadvise WILLNEED: asynchronous, nothing copied, next to free when the pages are already cached)
    keeps the disk busy while the CPU converts and checks, so a cold load takes about as long as reading the file
    once (bench/bench_loading.py). The window bounds how much page cache it claims; the page cache is not this
    process's memory. Where posix_fadvise does not exist, nothing happens."""

    STEP = 2 << 20

    def __init__(self, file, window: int = 128 << 20):
        self.file, self.size, self.window = file, os.fstat(file.fileno()).st_size, window
        self.position, self.closed = 0, False
        self.changed = threading.Condition()
        self.thread = None
        if hasattr(os, "posix_fadvise"):
            self.thread = threading.Thread(target=self._run, name="ovis-u1-read-ahead", daemon=True)
            self.thread.start()

    def advance(self, position: int) -> None:
        if self.thread is not None and position >= self.position + self.STEP:
            with self.changed:
                self.position = position
                self.changed.notify()

    def close(self) -> None:
        if self.thread is not None:
            with self.changed:
                self.closed = True
                self.changed.notify()
            self.thread.join()

    def _run(self) -> None:
        asked = 0
        while asked < self.size:
            with self.changed:
                while not self.closed and asked >= self.position + self.window:
                    self.changed.wait()
                if self.closed:
                    return
                asked = max(asked, self.position)
            try:
                os.posix_fadvise(self.file.fileno(), asked, self.STEP, os.POSIX_FADV_WILLNEED)
            except OSError:  # only a hint: the reads themselves report real errors
                return
            asked += self.STEP


@contextlib.contextmanager
def reading_ahead(directory: str | Path):
    """Within the block, the kernel reads the first window of every weight file in the background: the time spent
    building the model before its weights are read is then disk time too, not lost on a cold disk. Only a hint: a
    folder that cannot be read is left for load_weights to report."""
    try:
        files = [open(path, "rb", buffering=0) for path in weight_files(directory)]
    except (CheckpointError, OSError):
        files = []
    read_aheads = [_ReadAhead(f) for f in files]
    try:
        yield
    finally:
        for read_ahead, f in zip(read_aheads, files):
            read_ahead.close()
            f.close()


# Told of every loaded tensor that is a view of the file's bytes: (tensor, file path, offset of its first byte in the
# file, its size in bytes). See load_weights.
MarkFileSlice = Callable[[torch.Tensor, Path, int, int], None]


@dataclass(frozen=True)
class ReadTransform:
    """Tensors that are stored in another form than they are read in (e.g. scaled fp8, :mod:`ovis_u1.fp8`): each of
    ``keys`` is read on the CPU as a fresh tensor in the dtype ``dtype_for`` gives it (never a view of the file, so
    the pages it was read from are dropped again chunk by chunk), handed to ``entries(key, tensor)`` at once, and
    the state-dict entries that returns take its place, moved to the load's device. Only one such tensor is ever
    held in its read dtype, on the CPU, whatever the device."""

    keys: frozenset[str]
    entries: Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


class _TensorReader:
    """Reads the tensors of one safetensors file, holding at most a few chunks of file data at any time, and looks
    at every value once for NaN/inf while it is at hand.

    A tensor already in the dtype it is used in, on the CPU, is not read at all: it is a view of a private
    (copy-on-write) memory map of the file, so its pages come in when first used and are shared with the page cache.
    Every other tensor is converted chunk by chunk into its destination, straight from a read-only map of the file,
    and the pages of a converted chunk are dropped from the process at once. Where pages cannot be dropped (no
    madvise, e.g. Windows) the chunks are read into one reused buffer instead. Either way fp32 files load as bf16 at
    the size of the bf16 weights plus a chunk or two, reading the file once, and the kernel reads ahead of the chunk
    at hand (``_ReadAhead``) so that a cold disk keeps reading while the CPU converts and checks.

    ``mark_file_slice``, when given, is told of every view (``MarkFileSlice``), and the pages the NaN/inf check read
    are dropped from the process again: whoever asked for the marks reads those bytes from the file itself.
    """

    def __init__(self, path: Path, mark_file_slice: MarkFileSlice | None = None):
        self.path = path
        self.mark_file_slice = mark_file_slice
        self.file = open(path, "rb", buffering=0)
        try:
            self.data_start, self.index = read_header(self.file, path)
        except BaseException:
            self.file.close()
            raise
        self._private = self._source = self._buffer = None
        self._read_ahead = _ReadAhead(self.file)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._read_ahead.close()
        self._source = None  # the maps close when the last tensor viewing them is gone
        self.file.close()

    def offset(self, key: str) -> int:
        return self.index[key]["data_offsets"][0]

    def stored_dtype(self, key: str) -> torch.dtype:
        name = self.index[key]["dtype"]
        if name not in _STORED_DTYPES:
            raise CheckpointError(f"{key!r} in {self.path} has dtype {name}, which Ovis-U1 checkpoints never use")
        return _STORED_DTYPES[name]

    def read(self, key: str, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device,
             view: bool = True) -> tuple[torch.Tensor, str | None]:
        """The tensor ``key`` as ``dtype`` on ``device``, and what is wrong with its values: None, "corrupt" (NaN/inf
        in the file) or "overflow" (finite in the file, NaN/inf after the conversion). ``view=False``: a fresh
        tensor even where a view of the file would do."""
        stored = self.stored_dtype(key)
        begin, end = self.index[key]["data_offsets"]
        offset, count = self.data_start + begin, (end - begin) // stored.itemsize
        if count == 0:
            return torch.empty(shape, dtype=dtype, device=device), None
        step = max(1, _CHUNK_BYTES // stored.itemsize)
        if view and dtype == stored and device.type == "cpu" and offset % stored.itemsize == 0:
            if self._private is None:
                self._private = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_COPY)
            out = torch.frombuffer(self._private, dtype=stored, count=count, offset=offset)
            problem = None
            for first in range(0, count, step):
                start = offset + first * stored.itemsize
                self._read_ahead.advance(start)
                if problem is None and not _all_finite(out[first : first + step]):
                    problem = "corrupt"
                if self.mark_file_slice is not None and _RELEASE:  # its reader reads the file, not these pages
                    self._release(self._private, start, min(step, count - first) * stored.itemsize)
            if self.mark_file_slice is not None:
                self.mark_file_slice(out, self.path, offset, count * stored.itemsize)
            return out.view(shape), problem
        out = torch.empty(shape, dtype=dtype, device=device)
        flat, problem = out.view(-1), None
        # fp8 e4m3fn saturates: an inf in the file becomes a finite ±448, so fp8 pieces are checked in the file too
        check_source = dtype in _FP8_FIRST_NON_FINITE
        for first in range(0, count, step):
            n = min(step, count - first)
            start, size = offset + first * stored.itemsize, n * stored.itemsize
            piece = flat[first : first + n]
            self._read_ahead.advance(start)
            source = (self._mapped(start, size) if _RELEASE else self._read_range(start, size)).view(stored)
            piece.copy_(source)
            if problem is None:  # while the piece is still in the CPU's cache
                if check_source and not _all_finite(source):
                    problem = "corrupt"
                elif not _all_finite(piece):
                    problem = "overflow" if check_source or _all_finite(source) else "corrupt"
            if _RELEASE:
                self._release(self._source, start, size)
        return out, problem

    def _mapped(self, start: int, size: int) -> torch.Tensor:
        """Bytes [start, start+size) of the read-only map."""
        if self._source is None:
            self._source = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():  # read-only by design: the map is only ever copied from
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(self._source, dtype=torch.uint8, count=size, offset=start)

    @staticmethod
    def _release(mapped: mmap.mmap, start: int, size: int) -> None:
        """Drops this process's pages of bytes [start, start+size) of ``mapped``: the file still holds them, and a
        later use reads them in again (nothing was written to them)."""
        first = start - start % mmap.PAGESIZE
        if size > 0:
            mapped.madvise(mmap.MADV_DONTNEED, first, start + size - first)

    def _read_range(self, offset: int, size: int) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() < size:
            self._buffer = torch.empty(size, dtype=torch.uint8)
        view = memoryview(self._buffer.numpy())[:size]
        self.file.seek(offset)
        done = 0
        while done < size:
            got = self.file.readinto(view[done:])
            if not got:
                raise OSError(f"unexpected end of file at byte {offset + done}")
            done += got
        return self._buffer[:size]


def load_weights(
    module: torch.nn.Module,
    directory: str | Path,
    device: torch.device,
    dtype_for: Callable[[str, torch.dtype], torch.dtype],
    rename: Callable[[str], str] = lambda k: k,
    expected: dict[str, tuple[int, ...]] | None = None,
    mark_file_slice: MarkFileSlice | None = None,
    transform: ReadTransform | None = None,
) -> None:
    """Validate the stored keys against the architecture and hand the weights to ``module``'s layers.

    ``expected`` (key → shape) is the architecture, as its layers declare it (:func:`ovis_u1.model.architecture_shapes`
    builds it with plain torch.nn layers on the meta device); None takes it from ``module``'s own state dict, which
    is right only for layers that hold their (meta) weights from construction. A layer built lazily — ComfyUI's
    ``comfy.ops`` under Dynamic VRAM creates a Linear with ``weight = None`` — has no weight to report until its own
    ``_load_from_state_dict`` receives one, which is how every weight reaches its layer here
    (``load_state_dict(assign=True)``), so any layer that fills itself on load is filled.

    ``dtype_for(key, stored_dtype)`` picks each floating tensor's dtype; ``rename`` maps stored names
    (e.g. legacy VAE attention names) to the module's. Memory: tensors used in their stored dtype on the CPU are
    memory-mapped views of the file (no copy); the others are converted chunk by chunk (see ``_TensorReader``),
    so the process never holds the file and the converted weights at once. Every value is looked at once for
    NaN/inf as it is read; any is a CheckpointError naming the weights.

    ``mark_file_slice(tensor, path, offset, size)`` is called for every memory-mapped view, whose storage is exactly
    bytes [offset, offset + size) of ``path``, so that a memory manager able to read weights from their file (ComfyUI's
    file slices) can record where they are; the pages read for the NaN/inf check are then released at once. Converted
    tensors are fresh memory and are never passed to it.

    ``transform`` replaces the tensors of its keys, each right after it is read (:class:`ReadTransform`).
    """
    files = weight_files(directory)
    on_disk = stored_shapes(files)
    original = {rename(k): k for k in on_disk}
    stored = {rename(k): v for k, v in on_disk.items()}
    if expected is None:
        expected = {k: tuple(t.shape) for k, t in module.state_dict(keep_vars=True).items()}
    expected = {k: tuple(shape) for k, shape in expected.items() if k not in TIED_KEYS}
    # Legacy VAE attention weights may be stored as 1×1 convolutions; compare them as matrices.
    for k, (shape, path) in list(stored.items()):
        if k in expected and len(shape) == 4 and shape[2:] == (1, 1) and len(expected[k]) == 2:
            stored[k] = (shape[:2], path)
    validate_keys(expected, stored)

    device = torch.device(device)
    by_file: dict[Path, list[str]] = {}
    for key, (_, path) in stored.items():
        by_file.setdefault(path, []).append(key)
    state: dict[str, torch.Tensor] = {}
    problems: dict[str, list[str]] = {"corrupt": [], "overflow": []}
    for path, keys in by_file.items():
        with _TensorReader(path, mark_file_slice) as reader:
            for key in sorted(keys, key=lambda k: reader.offset(original[k])):  # one sequential pass over the file
                stored_dtype = reader.stored_dtype(original[key])
                dtype = dtype_for(key, stored_dtype) if stored_dtype.is_floating_point else stored_dtype
                transformed = transform is not None and key in transform.keys
                try:
                    tensor, problem = reader.read(original[key], dtype, expected[key],
                                                  _CPU if transformed else device, view=not transformed)
                except OSError as e:
                    raise CheckpointError(f"cannot read {original[key]!r} from {path} ({e}); download it again") from e
                if problem:
                    problems[problem].append(f"{key} ({dtype})")
                elif transformed:
                    state.update({k: v.to(device) for k, v in transform.entries(key, tensor).items()})
                else:
                    state[key] = tensor
                del tensor  # a transformed tensor's wide copy goes before the next one is read
    if problems["corrupt"] or problems["overflow"]:
        raise non_finite_error(problems["corrupt"], problems["overflow"], directory)
    result = module.load_state_dict(state, strict=False, assign=True)
    leftover = [k for k in result.missing_keys if k in expected]  # a GGUF folder loads the rest from its .gguf
    unfilled = [k for k in expected if tuple(_assigned_shape(module, k) or ()) != expected[k]]
    if leftover or result.unexpected_keys or unfilled:  # validate_keys makes this unreachable; keep it explicit
        not_assigned = sorted(set(leftover + unfilled)) + list(result.unexpected_keys)
        raise CheckpointError(f"weights not assigned: {_names(not_assigned)}")
    for p in module.parameters():
        p.requires_grad_(False)


def _assigned_shape(module: torch.nn.Module, key: str) -> tuple[int, ...] | None:
    """The shape of the tensor ``module`` now holds under ``key``; None where it holds none."""
    owner, _, name = key.rpartition(".")
    try:
        tensor = getattr(module.get_submodule(owner), name)
    except AttributeError:
        return None
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None


MODELS_DIR_ENV = "OVIS_U1_MODELS_DIR"  # extra roots, separated like PATH
PACK_ROOT = Path(__file__).resolve().parents[1]


def default_model_roots() -> list[Path]:
    """Where Ovis-U1 folders are looked for outside ComfyUI's folder_paths: ``$OVIS_U1_MODELS_DIR`` (os.pathsep
    separated), ``./models/ovis_u1``, and the ``models/ovis_u1`` of the ComfyUI this pack is installed in
    (``ComfyUI/custom_nodes/<pack>/``)."""
    roots = [Path(p) for p in os.environ.get(MODELS_DIR_ENV, "").split(os.pathsep) if p]
    roots += [Path.cwd() / "models" / "ovis_u1", PACK_ROOT.parent.parent / "models" / "ovis_u1"]
    return list(dict.fromkeys(roots))


def find_model_dirs(roots: list[str | Path]) -> list[Path]:
    """Ovis-U1 checkpoint folders directly under each root (a folder counts when its config.json says
    model_type ovis_u1), in root order then name order; a root that is itself a checkpoint counts too."""
    found: list[Path] = []
    for root in roots:
        root = Path(root)
        try:
            if is_ovis_u1_dir(root):
                found.append(root)
            elif root.is_dir():
                found.extend(sorted(d for d in root.iterdir() if d.is_dir() and is_ovis_u1_dir(d)))
        except PermissionError:  # a root this process may not list holds nothing it could load
            continue
    return list(dict.fromkeys(found))


def is_folder_name(name) -> bool:
    """Whether ``name`` can only mean an entry directly inside a model root: one path component of either OS, not
    ``.`` or ``..``, not absolute, no drive, no NUL. A loader's model name is such a name (what
    :func:`find_model_dirs` lists); anything else would join onto a root and reach elsewhere on the disk."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
            and not PureWindowsPath(name).drive)


def missing_model_message(name: str, roots) -> str:
    """What the loader says of a model name that is no checkpoint folder of ``roots``: where the download must go."""
    shown = ", ".join(str(r) for r in roots) or "(none)"
    return (
        f"model {name!r} is not an Ovis-U1 checkpoint folder in {shown}: put the complete ATH-MaaS/Ovis-U1-3B "
        "download (formerly AIDC-AI/Ovis-U1-3B) in a folder there (e.g. models/ovis_u1/Ovis-U1-3B, or an "
        "'ovis_u1:' entry of extra_model_paths.yaml) and pick it in the model list"
    )


def model_dir_named(name, roots: list[str | Path]) -> Path | None:
    """The folder a loader's model ``name`` stands for: the checkpoint folder of that name that
    :func:`find_model_dirs` lists, failing that an entry of that name directly inside a root (loading it then explains
    what is wrong with it); None for every other name, before the disk is looked at.

    Names resolve only inside the roots, as ComfyUI's own loaders resolve theirs (``folder_paths.get_full_path``), but
    stricter: ``folder_paths`` folds an absolute path or a ``..`` chain back into the root
    (``os.path.relpath(os.path.join("/", name), "/")``) and loads whatever that names; here such a name is no name
    the list holds and is refused. A symbolic link that is itself an entry of a root is followed, as ComfyUI follows
    it (``folder_paths.recursive_search`` walks with ``followlinks=True``; ``get_full_path`` accepts a link): whoever
    runs the server put it there (a client cannot make one), and it is how model folders are shared between installs.
    A path through such a link (``link/folder``) is more than one component and refused like any other path."""
    if not is_folder_name(name):
        return None
    for path in find_model_dirs(roots):
        if path.name == name:
            return path
    for root in roots:
        if os.path.isdir(Path(root) / name):  # False, not an error, where a root may not be entered
            return Path(root) / name
    return None
