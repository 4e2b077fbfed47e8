"""The recipe's data as tokenized Arrow datasets: built once, cached on disk, memory-mapped by every process.

`prepare` reads every source, has datasets' `map` validate and encode the rows in several processes
(finetune/data/rows.py does each row), mixes and splits them, and saves the result under `data.cache_dir`, keyed
by the data section, the data files (resolved path, size and a digest of their bytes:
finetune/data/cache_integrity.py), the tokenizer file's bytes
and `ENCODER_VERSION`. A later call with the same key (another rank, a rerun, a resume) memory-maps that
folder: no Python lists of tokens, no second tokenization. Under several processes the passes call it with
each node's main process first and the others waiting (finetune/train/steps.py), so a node tokenizes once.

Why not datasets' own fingerprint cache: it keys on the function's pickled bytes and would miss a data file
edited in place; and the mix / split / shuffle of several sources is one result to cache, not a chain of
maps. A cache folder holds each source's encoded Arrow files (bad rows included, with their reasons), the
row order of each split (train_rows.npy, eval_rows.npy), bad_rows.jsonl and summary.json; it appears under
its key only when complete (renamed from a hidden `.KEY.*.partial` folder). Hub datasets are keyed
by name, subset and split: delete the cache folder to pick up a new upstream version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune.data.cache_integrity import damage, file_digest, folder_checksums
from finetune.data.chat_format import ENCODER_VERSION, IGNORE_INDEX, ChatEncoder
from finetune.data.rows import (
    REQUIRED_FIELDS,
    BadRow,
    DataError,
    bad_rows_message,
    encode_chat_row,
    encode_preference_row,
    read_rows,
    reason_kind,
    row_byte_limit,
)
from finetune.files.output_folder import OWNER_FILE, is_alive
from finetune.recipe.schema import DataSection, DataSource

CACHE_ENV = "MIXTRAL_FINETUNE_CACHE"
MODEL_COLUMNS = {"sft": ("input_ids", "labels"), "dpo": ("prompt_ids", "chosen_ids", "rejected_ids")}
HELPER_COLUMNS = ("num_tokens", "num_trained")  # per-sample counts, so reports never read the token columns
ROWS_PER_PROCESS = 2000  # fewer rows than this per extra process and forking costs more than it saves


@dataclass
class Prepared:
    """What the trainers get (memory-mapped datasets), and the numbers the pre-flight check prints."""

    train: "datasets.Dataset"  # noqa: F821
    eval: "datasets.Dataset | None"  # noqa: F821
    bad_rows: list[BadRow]
    rows_read: int
    folder: Path
    """The cache folder the datasets are mapped from."""
    cache_hit: bool
    seconds: float
    """Time `prepare` took: tokenizing and saving, or only opening the cache."""

    def skipped_by_reason(self) -> Counter:
        return Counter(reason_kind(b.reason) for b in self.bad_rows)

    def lengths(self, split: str = "train") -> list[int]:
        """Tokens per sample (DPO: prompt + the longer reply), read from a small column."""
        dataset = self.train if split == "train" else self.eval
        return column(dataset, "num_tokens") if dataset is not None else []

    def for_trainer(self, split: str = "train"):
        """The split with only the columns the trainer reads (no copy: a column selection)."""
        dataset = self.train if split == "train" else self.eval
        if dataset is None:
            return None
        return dataset.remove_columns([c for c in HELPER_COLUMNS if c in dataset.column_names])


def prepare(data: DataSection, kind: str, encoder: ChatEncoder, progress: bool = True) -> Prepared:
    """Read, validate, encode, mix and split, or open the cached result. Raises DataError on bad rows unless
    `data.on_bad_rows` is skip (the bad rows are cached too, so a rerun reports them without re-reading)."""
    start = time.perf_counter()
    key, described = cache_key(data, kind, encoder)
    folder = cache_root(data) / key
    hit = folder.is_dir()
    problem = damage(folder) if hit else None
    if problem:  # never trained on: rebuilt from the data, saying why
        print(f"the tokenized-data cache {folder} is damaged ({problem}); rebuilding it", flush=True)
        try:
            shutil.rmtree(folder)
        except OSError as err:
            raise DataError(f"the tokenized-data cache {folder} is damaged ({problem}) and cannot be removed "
                            f"({err.strerror or err}); delete it, or set data.cache_dir (or ${CACHE_ENV}) to a "
                            "writable folder") from None
        hit = False
    if not hit:
        build(folder, data, kind, encoder, progress, described)
    prepared = open_cached(folder)
    prepared.cache_hit, prepared.seconds = hit, time.perf_counter() - start
    if prepared.bad_rows and data.on_bad_rows == "error":
        raise DataError(bad_rows_message(prepared.bad_rows))
    if len(prepared.train) == 0:
        raise DataError("no usable training rows"
                        + (f": {bad_rows_message(prepared.bad_rows)}" if prepared.bad_rows else ""))
    return prepared


def cache_root(data: DataSection) -> Path:
    if data.cache_dir:
        return Path(data.cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "mixtral-finetune" / "data"


def cache_key(data: DataSection, kind: str, encoder: ChatEncoder) -> tuple[str, dict]:
    """(key, what it was computed from). Settings that do not change the samples (where the cache is, how many
    processes tokenize, what happens to bad rows) are left out."""
    section = {k: v for k, v in asdict(data).items() if k not in ("cache_dir", "num_proc", "on_bad_rows", "packing")}
    described = {
        "kind": kind,
        "data": section,
        "files": [source_identity(s) for s in data.train + data.eval],
        "tokenizer_sha256": hashlib.sha256(encoder.path.read_bytes()).hexdigest(),
        "encoder_version": ENCODER_VERSION,
        "chat_format": encoder.format,
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]
    return f"{kind}-{digest}", described


def source_identity(source: DataSource) -> dict:
    path = Path(source.path)
    if path.is_file():
        return {"file": str(path.resolve()), "bytes": path.stat().st_size, "blake2b": file_digest(path)}
    return {"hub": source.path, "subset": source.subset, "split": source.split}


def open_cached(folder: Path) -> Prepared:
    """Memory-map a complete cache folder: each source's encoded Arrow files, in the recorded row order."""
    import datasets
    import numpy

    summary = json.loads((folder / "summary.json").read_text())
    with (folder / "bad_rows.jsonl").open() as f:
        bad = [BadRow(**json.loads(line)) for line in f]
    sources = [datasets.concatenate_datasets([datasets.Dataset.from_file(str(folder / name)) for name in files])
               for files in summary["source_files"] if files]
    everything = (datasets.concatenate_datasets(sources).remove_columns(["where", "reason"]) if sources
                  else datasets.Dataset.from_dict({}))  # only empty files: no rows, which prepare reports
    splits = {split: everything.select(numpy.load(folder / f"{split}_rows.npy"))
              for split in ("train", "eval") if (folder / f"{split}_rows.npy").is_file()}
    return Prepared(train=splits["train"], eval=splits.get("eval"), bad_rows=bad, rows_read=summary["rows_read"],
                    folder=folder, cache_hit=True, seconds=0.0)


def build(folder: Path, data: DataSection, kind: str, encoder: ChatEncoder, progress: bool, described: dict) -> None:
    """Tokenize every source into the cache folder, with the row order of each split; the folder appears under
    its name only when complete. The tokens are written once, by the processes that encode them: the mix and
    split are row numbers, so this process never reads them."""
    import numpy

    staging = new_staging(folder)
    try:
        rng = random.Random(data.seed)
        bad, rows_read, source_files, offset = [], 0, [], 0
        train_rows, eval_rows = [], []
        sources = [(s, "train") for s in data.train] + [(s, "eval") for s in data.eval]
        with progress_bars(progress), sigterm_ends_the_build():
            for number, (source, role) in enumerate(sources):
                encoded = tokenize_source(source, kind, encoder, data, staging, f"source-{number}")
                shutil.rmtree(staging / "scratch", ignore_errors=True)  # the rows as read: encoded now
                if encoded is None:  # an empty file: no rows, no draws
                    source_files.append([])
                    continue
                source_files.append([Path(f["filename"]).name for f in encoded.cache_files])
                rows_read += len(encoded)
                reasons = column(encoded, "reason")
                bad_indices = [i for i, reason in enumerate(reasons) if reason]
                if bad_indices:
                    wheres = column(encoded.select(bad_indices), "where")
                    bad += [BadRow(where, reasons[i]) for where, i in zip(wheres, bad_indices)]
                # Seeded draws on row numbers: the same draws, in the same order, as on the samples themselves.
                good = [offset + i for i, reason in enumerate(reasons) if not reason]
                offset += len(encoded)
                if role == "train" and not data.eval and data.eval_fraction > 0 and good:
                    # Split each source before weighting, so repeated rows never land on both sides.
                    shuffled = rng.sample(good, len(good))
                    n_eval = max(1, round(data.eval_fraction * len(good)))
                    eval_rows += shuffled[:n_eval]
                    good = shuffled[n_eval:]
                (train_rows if role == "train" else eval_rows).extend(apply_weight(good, source.weight, rng))
        rng.shuffle(train_rows)
        numpy.save(staging / "train_rows.npy", numpy.array(train_rows, dtype=numpy.int64))
        if eval_rows:
            numpy.save(staging / "eval_rows.npy", numpy.array(eval_rows, dtype=numpy.int64))
        with (staging / "bad_rows.jsonl").open("w") as f:
            f.writelines(json.dumps(asdict(b), ensure_ascii=False) + "\n" for b in bad)
        (staging / OWNER_FILE).unlink()
        summary = {"rows_read": rows_read, "bad_rows": len(bad), "source_files": source_files, "built_from": described,
                   "checksums": folder_checksums(staging)}
        (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")  # written last: complete
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "summary.json").is_file():  # not a concurrent builder that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def new_staging(folder: Path) -> Path:
    """A new hidden `.KEY.*.partial` folder beside `folder` to build in, owned by this process; the ones a killed
    build left (their owner gone) are removed first."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        for stale in folder.parent.glob(f".{folder.name}.*.partial"):
            owner = stale / OWNER_FILE
            pid = owner.read_text().strip() if owner.is_file() else ""
            if not (pid.isdigit() and is_alive(int(pid))):
                print(f"removing {stale}, left by a tokenization that was stopped", flush=True)
                shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
        (staging / OWNER_FILE).write_text(str(os.getpid()))
    except OSError as err:
        raise DataError(f"cannot write the tokenized-data cache in {folder.parent} ({err.strerror or err}); set "
                        f"data.cache_dir (or ${CACHE_ENV}) to a writable folder") from None
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the cache is read by every rank
    return staging


def column(dataset, name: str) -> list:
    """One column as a list, read through Arrow (datasets' row-by-row `Column` is ~100x slower)."""
    return dataset.with_format("arrow")[name].to_pylist()


def apply_weight(indices: list[int], weight: float, rng: random.Random) -> list[int]:
    """round(weight * n) rows: whole repeats, then a seeded subset for the fractional part."""
    target = round(weight * len(indices))
    whole, rest = divmod(target, len(indices)) if indices else (0, 0)
    return indices * whole + rng.sample(indices, rest)


def tokenize_source(source: DataSource, kind: str, encoder: ChatEncoder, data: DataSection, folder: Path, name: str):
    """One source as Arrow files `folder/NAME*.arrow` with the model columns, the counts, and `where` / `reason`
    per row (reason empty for a good row), or None for a source without rows. Rows are read here; `map`
    encodes them in `data.num_proc` processes."""
    import datasets

    raw_features = datasets.Features({name: datasets.Value("large_string") for name in ("where", "row", "problem")})
    try:
        raw = datasets.Dataset.from_generator(
            raw_rows, gen_kwargs={"source": source, "columns": REQUIRED_FIELDS[kind],
                                     "max_bytes": row_byte_limit(data.max_length)}, features=raw_features,
            cache_dir=str(folder / "scratch" / name),
        )
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__ or err.__context__
        raise (cause if isinstance(cause, DataError) else DataError(f"{source.path}: cannot be read ({cause})")) from None
    except ValueError:  # datasets refuses a generator that yields nothing: an empty source is zero rows
        if next(read_rows(source, REQUIRED_FIELDS[kind]), None) is not None:
            raise
        return None
    processes = data.num_proc or min(os.cpu_count() or 1, 8, max(1, len(raw) // ROWS_PER_PROCESS))
    ids = datasets.Sequence(datasets.Value("int32"))
    count = datasets.Value("int32")
    features = {name: ids for name in MODEL_COLUMNS[kind]} | {"num_tokens": count}
    if kind == "sft":
        features["num_trained"] = count
    features |= {"where": datasets.Value("large_string"), "reason": datasets.Value("large_string")}
    return raw.map(
        encode_batch, fn_kwargs={"kind": kind, "encoder": encoder, "max_length": data.max_length},
        batched=True, batch_size=256, num_proc=processes if processes > 1 else None,
        remove_columns=["row", "problem"], features=datasets.Features(features),
        cache_file_name=str(folder / f"{name}.arrow"), new_fingerprint=name,
        desc=f"tokenizing {source.path}",
    )


def raw_rows(source: DataSource, columns: tuple[str, ...], max_bytes: int):
    """Each row as JSON text (or its problem: bad UTF-8, malformed JSON), named by `where`."""
    for where, row in read_rows(source, columns, max_bytes):
        if isinstance(row, BadRow):
            yield {"where": where, "row": None, "problem": row.reason}
        else:
            yield {"where": where, "row": json.dumps(row, ensure_ascii=False, default=str), "problem": None}


def encode_batch(batch: dict, kind: str, encoder: ChatEncoder, max_length: int) -> dict:
    """datasets.map function: the model columns and counts for good rows, the reason for bad ones."""
    encode = encode_preference_row if kind == "dpo" else encode_chat_row
    out = {name: [] for name in (*MODEL_COLUMNS[kind], "num_tokens", "reason")}
    if kind == "sft":
        out["num_trained"] = []
    for text, problem in zip(batch["row"], batch["problem"]):
        sample, reason = (None, problem) if problem else encode(json.loads(text), encoder, max_length)
        out["reason"].append(reason)
        for name in MODEL_COLUMNS[kind]:
            out[name].append(sample[name] if sample else [])
        if kind == "sft":
            out["num_tokens"].append(len(sample["input_ids"]) if sample else 0)
            out["num_trained"].append(sum(t != IGNORE_INDEX for t in sample["labels"]) if sample else 0)
        else:
            longest = max(len(sample["chosen_ids"]), len(sample["rejected_ids"])) if sample else 0
            out["num_tokens"].append(len(sample["prompt_ids"]) + longest if sample else 0)
    return out


@contextlib.contextmanager
def sigterm_ends_the_build():
    """SIGTERM while tokenizing raises here instead of killing the process outright, so the tokenizing worker
    processes are terminated (datasets' pool closes on the exception) and the partial folder is removed, before
    the process exits with 143, as a SIGTERM would have it.

    Two things make this more than a handler that raises. The pool's workers (and datasets' queue manager) are
    forked from this process and inherit the handler: there a SIGTERM (which the pool itself sends to close)
    must end the process at once, as the default action would, not raise inside multiprocessing's plumbing,
    where it can hang the pool's join. And datasets' cleanup on the way out (`iflatmap_unordered` reads each
    unfinished result with a 0.05 s timeout) can replace our SystemExit with its own TimeoutError: once the
    signal came, whatever escapes the block is the stop, exit 143."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()
    stopped = False

    def stop(signum, frame):
        nonlocal stopped
        if os.getpid() != owner:  # a forked worker: die as SIGTERM's default action would
            os._exit(128 + signal.SIGTERM)
        if stopped:  # a second SIGTERM while the workers close: the first is already being handled
            return
        stopped = True
        print("SIGTERM received while tokenizing: stopping the workers and removing the partial cache", flush=True)
        raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except BaseException:
        if stopped:
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def maps_outside_cache():
    """datasets' `map` results go to a temporary folder for a block, not next to the source files: TRL packs
    (and otherwise maps) our memory-mapped datasets while building its trainer, and its files must not land in
    the cache folder (which may be read-only, and whose files are checksummed)."""
    import datasets

    was_enabled = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_caching()


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """datasets' progress bars on or off for a block (the switch is global), restored after."""
    import datasets

    was_enabled = not datasets.are_progress_bars_disabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()
