"""Tokenized data on disk: the same samples as encoding the rows one by one, read back from the cache on a
rerun, rebuilt when the data section, a data file, the tokenizer or the encoder changes."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.data import cache as data_cache
from finetune.data.cache import prepare
from finetune.data.chat_format import ChatEncoder
from finetune.data.rows import BadRow, DataError, encode_chat_row, encode_preference_row, read_rows
from finetune.recipe.schema import DataSection, DataSource


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(user, reply):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


@pytest.fixture
def two_sources(tmp_path):
    a = write_rows(tmp_path / "a.jsonl", [chat(f"question a{i}", f"answer {i}") for i in range(37)]
                   + ['{"messages": [', chat("too " * 200, "long")])
    b = write_rows(tmp_path / "b.jsonl", [chat(f"question b{i}", "yes " * (i % 5 + 1)) for i in range(23)])
    return a, b


def encoded_one_by_one(data: DataSection, kind: str, encoder: ChatEncoder):
    """The samples as a plain loop over the rows computes them: each source encoded in order, split before
    weighting, weighted with whole repeats plus a seeded subset, the training mix shuffled last."""
    encode = encode_preference_row if kind == "dpo" else encode_chat_row
    rng = random.Random(data.seed)
    train, held_out = [], []

    def samples(source):
        out = []
        for _, row in read_rows(source):
            if not isinstance(row, BadRow):
                sample, reason = encode(row, encoder, data.max_length)
                if sample:
                    out.append(sample)
        return out

    def weighted(rows, weight):
        whole, rest = divmod(round(weight * len(rows)), len(rows)) if rows else (0, 0)
        return rows * whole + rng.sample(rows, rest)

    for source in data.train:
        rows = samples(source)
        if not data.eval and data.eval_fraction > 0 and rows:
            rows = rng.sample(rows, len(rows))
            n_eval = max(1, round(data.eval_fraction * len(rows)))
            held_out += rows[:n_eval]
            rows = rows[n_eval:]
        train += weighted(rows, source.weight)
    for source in data.eval:
        held_out += weighted(samples(source), source.weight)
    rng.shuffle(train)
    return train, held_out


def as_lists(dataset):
    return [] if dataset is None else [dict(row) for row in dataset]


def test_cached_samples_are_the_rows_encoded_one_by_one(two_sources, encoder, tmp_path):
    a, b = two_sources
    data = DataSection(train=[DataSource(str(a), weight=0.5), DataSource(str(b), weight=2.5)], eval_fraction=0.2,
                      max_length=128, seed=7, on_bad_rows="skip", cache_dir=str(tmp_path / "cache"))
    prepared = prepare(data, "sft", encoder, progress=False)
    train, held_out = encoded_one_by_one(data, "sft", encoder)
    assert as_lists(prepared.for_trainer("train")) == train and len(train) == 15 + 45
    assert as_lists(prepared.for_trainer("eval")) == held_out and len(held_out) == 7 + 5
    assert prepared.lengths("train") == [len(s["input_ids"]) for s in train]
    assert [r.reason.split(" (")[0].split(":")[0] for r in prepared.bad_rows] == ["malformed JSON", "too long"]
    assert prepared.rows_read == 39 + 23
    # Memory-mapped from the cache folder, not held in memory.
    assert prepared.train.cache_files and all(f["filename"].startswith(str(prepared.folder))
                                              for f in prepared.train.cache_files)


def test_preference_pairs_with_an_eval_source(repo_root, encoder, tmp_path):
    train_file, eval_file = repo_root / "data/preferences/train.jsonl", repo_root / "data/preferences/eval.jsonl"
    data = DataSection(train=[DataSource(str(train_file), weight=0.3)], eval=[DataSource(str(eval_file))],
                      max_length=512, seed=1, cache_dir=str(tmp_path / "cache"))
    prepared = prepare(data, "dpo", encoder, progress=False)
    train, held_out = encoded_one_by_one(data, "dpo", encoder)
    assert as_lists(prepared.for_trainer("train")) == train and train
    assert as_lists(prepared.for_trainer("eval")) == held_out and held_out


def test_several_tokenizing_processes_give_the_same_samples(two_sources, encoder, tmp_path):
    a, b = two_sources
    results = []
    for processes in (1, 3):
        data = DataSection(train=[DataSource(str(a)), DataSource(str(b))], eval_fraction=0.1, max_length=128,
                          on_bad_rows="skip", num_proc=processes, cache_dir=str(tmp_path / f"cache-{processes}"))
        prepared = prepare(data, "sft", encoder, progress=False)
        results.append((as_lists(prepared.train), as_lists(prepared.eval), prepared.bad_rows))
        files = {f["filename"] for f in prepared.train.cache_files}
        assert len(files) == (2 if processes == 1 else 6)  # one Arrow file per source and process
    assert results[0] == results[1]


def trained_tokenizer(tmp_path, repo_root):
    """A second, different SentencePiece model (same special ids, byte fallback), trained here."""
    import sentencepiece

    text = [m["content"] for line in (repo_root / "data/chat/train.jsonl").read_text().splitlines()
            for m in json.loads(line)["messages"]]
    path = tmp_path / "other"
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(path), vocab_size=400,
                                             byte_fallback=True, minloglevel=2)
    return ChatEncoder(f"{path}.model")


def test_a_rerun_hits_the_cache_and_every_input_of_the_samples_invalidates_it(two_sources, encoder, tmp_path,
                                                                              repo_root, monkeypatch):
    a, b = two_sources
    root = tmp_path / "cache"
    data = DataSection(train=[DataSource(str(a)), DataSource(str(b))], max_length=128, on_bad_rows="skip",
                      cache_dir=str(root))
    first = prepare(data, "sft", encoder, progress=False)
    again = prepare(data, "sft", encoder, progress=False)
    assert not first.cache_hit and again.cache_hit and again.folder == first.folder
    assert as_lists(again.train) == as_lists(first.train)
    # Settings that do not change the samples share the cache.
    assert prepare(DataSection(**{**data.__dict__, "num_proc": 2}), "sft", encoder, progress=False).cache_hit

    def folder_for(changed: DataSection, enc=encoder, kind="sft"):
        prepared = prepare(changed, kind, enc, progress=False)
        assert not prepared.cache_hit
        return prepared

    folders = {first.folder}
    for change in ({"max_length": 96}, {"seed": 5}, {"eval_fraction": 0.2},
                   {"train": [DataSource(str(a), weight=2.0), DataSource(str(b))]}):
        folders.add(folder_for(DataSection(**{**data.__dict__, **change})).folder)
    folders.add(folder_for(data, enc=trained_tokenizer(tmp_path, repo_root)).folder)
    monkeypatch.setattr(data_cache, "ENCODER_VERSION", data_cache.ENCODER_VERSION + 1)
    folders.add(folder_for(data).folder)
    monkeypatch.undo()
    # A data file edited in place (same path) is read again, with its new row.
    with b.open("a") as f:
        f.write(json.dumps(chat("one more", "row")) + "\n")
    edited = folder_for(data)
    folders.add(edited.folder)
    assert len(edited.train) == len(first.train) + 1
    assert len(folders) == 8 and sorted(p.name for p in root.iterdir()) == sorted(p.name for p in folders)


def test_bad_rows_are_cached_too_and_a_failed_build_leaves_nothing(two_sources, encoder, tmp_path):
    a, _ = two_sources
    root = tmp_path / "cache"
    data = DataSection(train=[DataSource(str(a))], max_length=128, cache_dir=str(root))
    messages = []
    for _ in range(2):
        with pytest.raises(DataError) as err:
            prepare(data, "sft", encoder, progress=False)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and f"{a}:38: malformed JSON" in messages[0]
    assert len(list(root.iterdir())) == 1  # the second run read the bad rows from the cache
    missing = DataSection(train=[DataSource(str(a)), DataSource(str(tmp_path / "gone.jsonl"))], cache_dir=str(root))
    with pytest.raises(DataError, match="data file not found"):
        prepare(missing, "sft", encoder, progress=False)
    assert len(list(root.iterdir())) == 1  # no half-built folder, hidden or not


def test_an_empty_file_is_zero_rows(two_sources, encoder, tmp_path):
    a, _ = two_sources
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    alone = DataSection(train=[DataSource(str(empty))], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="no usable training rows"):
        prepare(alone, "sft", encoder, progress=False)
    mixed = DataSection(train=[DataSource(str(empty)), DataSource(str(a))], max_length=128, on_bad_rows="skip",
                       seed=2, cache_dir=str(tmp_path / "cache"))
    prepared = prepare(mixed, "sft", encoder, progress=False)
    train, held_out = encoded_one_by_one(mixed, "sft", encoder)
    assert as_lists(prepared.for_trainer("train")) == train and as_lists(prepared.for_trainer("eval")) == held_out
    assert prepared.rows_read == 39


def test_a_cache_folder_that_cannot_be_written_is_named(two_sources, encoder, tmp_path):
    a, _ = two_sources
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    data = DataSection(train=[DataSource(str(a))], on_bad_rows="skip", cache_dir=str(blocked / "cache"))
    with pytest.raises(DataError, match=rf"cannot write the tokenized-data cache in {blocked}/cache .*set data.cache_dir"):
        prepare(data, "sft", encoder, progress=False)


def test_an_edit_that_keeps_size_and_time_is_seen(tmp_path, encoder, capsys):
    a = write_rows(tmp_path / "a.jsonl", [chat(f"question a{i}", f"answer {i}") for i in range(20)])
    data = DataSection(train=[DataSource(str(a))], eval_fraction=0, max_length=128, cache_dir=str(tmp_path / "c"))
    before = prepare(data, "sft", encoder, progress=False)
    stat = a.stat()
    a.write_text(a.read_text().replace("answer 7", "ANSWER 7"))  # same size
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `touch -r` or rsync leave it
    assert a.stat().st_size == stat.st_size and a.stat().st_mtime_ns == stat.st_mtime_ns
    after = prepare(data, "sft", encoder, progress=False)
    assert not after.cache_hit and after.folder != before.folder
    replies = {encoder.decode([t for t in s["labels"] if t >= 0]) for s in after.train}
    assert "ANSWER 7" in replies and "answer 7" not in replies


@pytest.mark.parametrize("damage", ["flipped byte", "truncated arrow", "no train_rows.npy", "no summary.json"])
def test_a_damaged_cache_is_rebuilt_not_trained_on(tmp_path, encoder, capsys, damage):
    a = write_rows(tmp_path / "a.jsonl", [chat(f"question a{i}", f"answer {i}") for i in range(20)])
    data = DataSection(train=[DataSource(str(a))], eval_fraction=0, max_length=128, cache_dir=str(tmp_path / "c"))
    good = prepare(data, "sft", encoder, progress=False)
    expected = [(s["input_ids"], s["labels"]) for s in good.train]
    arrow = sorted(good.folder.glob("*.arrow"))[0]
    if damage == "flipped byte":
        raw = bytearray(arrow.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        arrow.write_bytes(bytes(raw))
    elif damage == "truncated arrow":
        arrow.write_bytes(arrow.read_bytes()[:100])
    else:
        (good.folder / damage.removeprefix("no ")).unlink()
    capsys.readouterr()
    again = prepare(data, "sft", encoder, progress=False)
    assert f"the tokenized-data cache {good.folder} is damaged" in capsys.readouterr().out
    assert not again.cache_hit and again.folder == good.folder
    assert [(s["input_ids"], s["labels"]) for s in again.train] == expected
    assert prepare(data, "sft", encoder, progress=False).cache_hit  # whole again


def test_a_line_too_long_for_max_length_is_refused_unread(tmp_path, encoder):
    a = write_rows(tmp_path / "a.jsonl", [chat("short", "fine"), chat("x" * 3_000_000, "long")])
    data = DataSection(train=[DataSource(str(a))], eval_fraction=0, max_length=128, on_bad_rows="skip",
                       cache_dir=str(tmp_path / "c"))
    prepared = prepare(data, "sft", encoder, progress=False)
    assert len(prepared.train) == 1
    (bad,) = prepared.bad_rows
    assert bad.where == f"{a}:2" and bad.reason.startswith("too long: a line of 3,000,0")


@pytest.mark.slow
def test_sigterm_while_tokenizing_leaves_no_worker_and_no_partial_folder(tmp_path, repo_root, tiny_model_dir):
    rows = (repo_root / "data" / "chat" / "train.jsonl").read_text()
    big = tmp_path / "big.jsonl"
    big.write_text(rows * 15)  # 30,000 conversations: several seconds of tokenizing in 2 processes
    cache = tmp_path / "cache"
    args = ["finetune.check", "recipes/tiny/sft.yaml", f"model={tiny_model_dir}", f"output_dir={tmp_path / 'out'}",
            f"data.train=[{{path: {big}}}]", "data.eval=[]", "data.eval_fraction=0", "data.num_proc=2",
            f"data.cache_dir={cache}"]
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=repo_root, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (list(cache.glob(".*.partial/source-0*.arrow")) and children(proc.pid)):
        assert proc.poll() is None and time.monotonic() < deadline, "tokenizing never started in workers"
        time.sleep(0.1)
    workers = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output[-3000:]
    assert "Traceback" not in output and "SIGTERM received while tokenizing" in output
    time.sleep(1)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "tokenizing workers outlived the run"
    assert not list(cache.glob(".*.partial"))


def children(pid: int) -> list[int]:
    """The ids of a process's child processes (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(c) for c in (task / "children").read_text().split()] if (task / "children").is_file() else []
    return found


def test_a_partial_folder_left_by_a_killed_build_is_removed_by_the_next(tmp_path, encoder, capsys):
    a = write_rows(tmp_path / "a.jsonl", [chat(f"question a{i}", f"answer {i}") for i in range(20)])
    data = DataSection(train=[DataSource(str(a))], eval_fraction=0, max_length=128, cache_dir=str(tmp_path / "c"))
    key, _ = data_cache.cache_key(data, "sft", encoder)
    stale = tmp_path / "c" / f".{key}.abc123.partial"
    stale.mkdir(parents=True)
    (stale / ".writer-pid").write_text("999999999")  # no such process
    prepare(data, "sft", encoder, progress=False)
    assert not stale.exists() and f"removing {stale}" in capsys.readouterr().out
