"""The data pipeline: every bad row is named, labels are the replies, sources mix and split."""

import json

import pytest

from finetune.data.cache import prepare
from finetune.data.chat_format import IGNORE_INDEX
from finetune.data.rows import DataError
from finetune.recipe.schema import DataSection, DataSource


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def labelled_ids(sample: dict) -> list[int]:
    return [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE_INDEX]


def chat(*turns, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"messages": messages}


GOOD = chat("What is 2+2?", "4")
BROKEN_CHAT = [
    ('{"messages": [', "malformed JSON"),
    ({"conversation": []}, "missing field 'messages'"),
    (chat("hi", "hello", "again"), "must end with an assistant turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "roles do not alternate"),
    (chat("question", "   "), "empty reply"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}]}, "content is not text"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "function calling needs a model with the v3 tokenizer"),
    ({"messages": [{"role": "user"}]}, "must have 'role' and 'content'"),
    (chat("word " * 300, "ok"), "too long"),
    ([1, 2, 3], "row is not a JSON object"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "roles do not alternate"),
]


def config(path, **kw):
    return DataSection(train=[DataSource(path=str(path))], eval_fraction=0.0, max_length=128, **kw)


def test_every_bad_chat_row_is_named(tmp_path, encoder):
    rows = [GOOD]
    for row, _ in BROKEN_CHAT:
        rows += [row, GOOD]
    path = write_jsonl(tmp_path / "broken.jsonl", rows)
    expected = [(f"{path}:{2 + 2 * i}", reason) for i, (_, reason) in enumerate(BROKEN_CHAT)]
    # Default: stop, listing the first rows and the counts per reason.
    with pytest.raises(DataError) as err:
        prepare(config(path), "sft", encoder, progress=False)
    message = str(err.value)
    assert f"{len(BROKEN_CHAT)} bad row(s)" in message
    for where, reason in expected[:10]:
        line = next(x for x in message.splitlines() if x.strip().startswith(where + ": "))
        assert reason in line
    assert f"... and {len(BROKEN_CHAT) - 10} more" in message
    assert "counts:" in message and "data.on_bad_rows=skip" in message
    # Skip: every bad row is still named, with its reason.
    prepared = prepare(config(path, on_bad_rows="skip"), "sft", encoder, progress=False)
    assert len(prepared.train) == len(BROKEN_CHAT) + 1
    assert len(prepared.bad_rows) == len(expected)
    for bad, (where, reason) in zip(prepared.bad_rows, expected):
        assert bad.where == where and reason in bad.reason


def test_skip_drops_bad_rows_and_counts_them(tmp_path, encoder):
    rows = [GOOD] * 5 + [row for row, _ in BROKEN_CHAT]
    path = write_jsonl(tmp_path / "broken.jsonl", rows)
    prepared = prepare(config(path, on_bad_rows="skip"), "sft", encoder, progress=False)
    assert len(prepared.train) == 5
    assert len(prepared.bad_rows) == len(BROKEN_CHAT)
    counts = prepared.skipped_by_reason()
    assert counts["too long"] == 1 and counts["malformed JSON"] == 1


def test_over_length_is_never_truncated(tmp_path, encoder):
    long_reply = "many words " * 100
    path = write_jsonl(tmp_path / "long.jsonl", [GOOD, chat("q", long_reply)])
    prepared = prepare(config(path, on_bad_rows="skip"), "sft", encoder, progress=False)
    assert len(prepared.train) == 1
    reason = prepared.bad_rows[0].reason
    assert reason.startswith("too long:") and "data.max_length=128" in reason


def test_labels_decode_to_replies_plus_eos(repo_root, encoder):
    path = repo_root / "data" / "chat" / "train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()[:200]]
    prepared = prepare(
        DataSection(train=[DataSource(path=str(path))], eval_fraction=0.0, seed=0), "sft", encoder, progress=False
    )
    by_ids = {tuple(s["input_ids"]): s for s in prepared.train}
    for row in rows:
        sample = by_ids[tuple(encoder.encode(row["messages"]).input_ids)]
        labelled = labelled_ids(sample)
        expected = "".join(m["content"] + "</s>" for m in row["messages"] if m["role"] == "assistant")
        pieces = []
        run = []
        for t in labelled:
            if t == encoder.eos_id:
                pieces.append(encoder.decode(run) + "</s>")
                run = []
            else:
                run.append(t)
        assert run == []
        assert "".join(pieces) == expected


def test_mixing_weights_and_eval_split(tmp_path, encoder):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(f"a{i}", "x") for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [chat(f"b{i}", "y") for i in range(40)])
    data = DataSection(
        train=[DataSource(path=str(a), weight=0.5), DataSource(path=str(b), weight=2.0)], eval_fraction=0.1, seed=3
    )
    prepared = prepare(data, "sft", encoder, progress=False)
    first_user = lambda s: encoder.decode(s["input_ids"][1:]).split(" ")[1]  # noqa: E731
    train_names = [first_user(s) for s in prepared.train]
    eval_names = {first_user(s) for s in prepared.eval}
    assert len(prepared.eval) == 8  # 10% of each source, split before weighting
    assert sum(n.startswith("a") for n in train_names) == 18  # round(0.5 * 36)
    assert sum(n.startswith("b") for n in train_names) == 72  # 2 * 36
    assert not eval_names & set(train_names)
    again = prepare(data, "sft", encoder, progress=False)
    assert list(again.train) == list(prepared.train)  # seeded


def test_json_and_parquet_files(tmp_path, encoder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [chat("q1", "a1"), chat("q2", "a2", "q3", "a3", system="be brief")]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.parquet"):
        prepared = prepare(config(tmp_path / name), "sft", encoder, progress=False)
        assert sorted(len(s["input_ids"]) for s in prepared.train) == sorted(
            len(encoder.encode(r["messages"]).input_ids) for r in rows
        )


def test_missing_file_is_reported(tmp_path, encoder):
    with pytest.raises(DataError, match="data file not found"):
        prepare(config(tmp_path / "nope.jsonl"), "sft", encoder, progress=False)


PROMPT = [{"role": "user", "content": "Pick one"}]
BROKEN_PREFS = [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "empty chosen response"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({"prompt": "[INST] q [/INST]", "chosen": "a", "rejected": "b"}, "prompt already contains [INST] markers"),
    ({"prompt": PROMPT + [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "prompt: conversation must end with a user turn"),
    ({"prompt": PROMPT, "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "chosen must be one assistant message"),
    ({"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": ""}]}, "empty rejected response"),
]


def test_every_bad_preference_row_is_named(tmp_path, encoder):
    good = {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "A"}], "rejected": "B"}
    # UltraFeedback style: chosen/rejected repeat the prompt messages first.
    ultra = {"prompt": "Pick one", "chosen": PROMPT + [{"role": "assistant", "content": "A"}],
             "rejected": PROMPT + [{"role": "assistant", "content": "B"}]}
    rows = [good, ultra] + [row for row, _ in BROKEN_PREFS]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(DataError) as err:
        prepare(config(path), "dpo", encoder, progress=False)
    for i, (_, reason) in enumerate(BROKEN_PREFS):
        assert f"{path}:{i + 3}: {reason}" in str(err.value)
    prepared = prepare(config(path, on_bad_rows="skip"), "dpo", encoder, progress=False)
    assert len(prepared.train) == 2
    for sample in prepared.train:
        assert sample["prompt_ids"] == encoder.encode_prompt(PROMPT)
    assert {tuple(s["chosen_ids"]) for s in prepared.train} == {tuple(encoder.reply_ids("A"))}


def test_bad_utf8_is_named_by_line_byte_and_column(tmp_path, encoder):
    good = json.dumps(GOOD).encode()
    bad = json.dumps(chat("caf_ au lait?", "yes")).encode().replace(b"caf_", b"caf\xe9")  # Latin-1 e-acute
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n" + bad + b"\n" + good + b"\n")
    column = bad.index(b"\xe9") + 1  # everything before it is ASCII: bytes = characters
    with pytest.raises(DataError, match=rf"{path}:2: not valid UTF-8 \(byte 0xe9 at column {column}\)"):
        prepare(config(path), "sft", encoder, progress=False)
    prepared = prepare(config(path, on_bad_rows="skip"), "sft", encoder, progress=False)
    assert len(prepared.train) == 2 and prepared.skipped_by_reason() == {"not valid UTF-8": 1}
    # The column counts characters: a valid two-byte character before the bad byte counts once.
    path.write_bytes(good + b'\n{"x": "\xc3\xa9\xff"}\n')
    prepared = prepare(config(path, on_bad_rows="skip"), "sft", encoder, progress=False)
    assert prepared.bad_rows[0].reason == "not valid UTF-8 (byte 0xff at column 9)"
    # A .json file is one document: the error names its line.
    whole = tmp_path / "rows.json"
    whole.write_bytes(b'[\n  {"messages": []},\n  {"x": "\xff"}\n]')
    with pytest.raises(DataError, match=rf"{whole}:3: not valid UTF-8 \(byte 0xff at column 10\)"):
        prepare(config(whole), "sft", encoder, progress=False)


def test_a_leading_byte_order_mark_is_accepted(tmp_path, encoder):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n").encode() * 3)
    assert len(prepare(config(jsonl), "sft", encoder, progress=False).train) == 3
    whole = tmp_path / "bom.json"
    whole.write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD, GOOD]).encode())
    assert len(prepare(config(whole), "sft", encoder, progress=False).train) == 2


def test_parquet_with_wrong_columns_or_not_parquet_is_named(tmp_path, encoder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"text": ["a"], "id": [1]}), wrong)
    with pytest.raises(DataError, match=rf"{wrong}: has columns text, id; rows here need messages \(missing: messages\)"):
        prepare(config(wrong), "sft", encoder, progress=False)
    with pytest.raises(DataError, match=r"has columns text, id; rows here need prompt, chosen, rejected"):
        prepare(config(wrong), "dpo", encoder, progress=False)
    fake = tmp_path / "fake.parquet"
    fake.write_text('{"messages": []}\n')
    with pytest.raises(DataError, match=rf"{fake}: not a readable parquet file"):
        prepare(config(fake), "sft", encoder, progress=False)


def test_a_folder_given_as_data_file_is_named_as_a_folder(tmp_path, encoder):
    (tmp_path / "chat.jsonl").mkdir()
    with pytest.raises(DataError, match="is a folder"):
        prepare(config(tmp_path / "chat.jsonl"), "sft", encoder, progress=False)


def test_data_errors_reach_the_command_line_as_one_line(tmp_path, repo_root, tiny_model_dir):
    import subprocess
    import sys

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "\xe9"}\n')
    proc = subprocess.run([sys.executable, "-m", "finetune.check", "recipes/tiny/sft.yaml", f"model={tiny_model_dir}",
                           f"output_dir={tmp_path / 'out'}", f"data.train=[{{path: {path}}}]", "data.eval=[]",
                           "data.eval_fraction=0"], cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"{path}:2: not valid UTF-8 (byte 0xe9 at column 15)" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
