"""Mixtral 8x22B's v3 chat format, function calling included, is token-exact with mistral_common's v3 tokenizer."""

import copy
import json
import random

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import helpers
from finetune.data.chat_format import IGNORE_INDEX, bundled_sentencepiece_path, save_tokenizer
from finetune.data.chat_format_v3 import ChatEncoderV3
from finetune.data.encoders import chat_encoder, chat_format_of
from finetune.data.rows import chat_messages, encode_chat_row, encode_preference_row
from finetune.data.tool_rows import check_tool_conversation, parse_json_content
from helpers import random_conversation, random_tool_row

N = 300


@pytest.fixture(scope="module")
def v3():
    return ChatEncoderV3(bundled_sentencepiece_path("v3"))


@pytest.fixture(scope="module")
def reference():
    """(for conversations ending with an assistant turn, for prompts)."""
    path = str(bundled_sentencepiece_path("v3"))
    return (MistralTokenizer.from_file(path, mode=ValidationMode.finetuning),
            MistralTokenizer.from_file(path, mode=ValidationMode.test))


@pytest.fixture
def v3_lookalikes(monkeypatch):
    monkeypatch.setattr(helpers, "LOOKALIKES", helpers.V3_LOOKALIKES)


def ref_ids(tokenizer, row):
    request = ChatCompletionRequest.from_openai(messages=copy.deepcopy(row["messages"]), tools=row.get("tools"))
    return tokenizer.encode_chat_completion(request).tokens


def ours(encoder, row, ends_with="assistant"):
    conversation, reason = check_tool_conversation(row["messages"], row.get("tools"), ends_with=ends_with)
    assert reason is None, (reason, row)
    return encoder.encode(conversation)


def test_reference_is_the_v3_tokenizer(reference):
    assert type(reference[0].instruct_tokenizer).__name__ == "InstructTokenizerV3"
    assert reference[0].instruct_tokenizer.tokenizer.n_words == 32768


def test_format_is_read_from_the_tokenizer_file():
    assert chat_format_of(bundled_sentencepiece_path("v3")) == "v3"
    assert chat_format_of(bundled_sentencepiece_path("v1")) == "v1"
    assert isinstance(chat_encoder(bundled_sentencepiece_path("v3")), ChatEncoderV3)
    assert chat_encoder(bundled_sentencepiece_path("v3"), "v1").format == "v1"
    with pytest.raises(ValueError, match=r"is not a v3 tokenizer \(no \[INST\] control token\)"):
        chat_encoder(bundled_sentencepiece_path("v1"), "v3")


@pytest.mark.parametrize("lookalikes", [False, True], ids=["plain", "lookalikes"])
def test_tool_conversations_match_reference(v3, reference, lookalikes, v3_lookalikes):
    rng = random.Random(20 + lookalikes)
    for _ in range(N):
        row = random_tool_row(rng, lookalikes)
        assert ours(v3, row).input_ids == ref_ids(reference[0], row), row


@pytest.mark.parametrize("lookalikes", [False, True], ids=["plain", "lookalikes"])
def test_plain_conversations_match_reference(v3, reference, lookalikes, v3_lookalikes):
    rng = random.Random(30 + lookalikes)
    for _ in range(N):
        messages = random_conversation(rng, lookalikes)
        assert v3.encode(messages).input_ids == ref_ids(reference[0], {"messages": messages}), messages


def test_prompts_match_reference(v3, reference, v3_lookalikes):
    rng = random.Random(40)
    for _ in range(N):
        row = random_tool_row(rng, lookalikes=True, end_with_assistant=False)
        assert ours(v3, row, "user").input_ids == ref_ids(reference[1], row), row


def test_labels_of_a_tool_conversation():
    """Trained: the reply text, `[TOOL_CALLS]` with the call JSON, and each turn's EOS. Not the tool list, the
    system prompt, user text or tool results."""
    v3 = ChatEncoderV3(bundled_sentencepiece_path("v3"))
    row = {"tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                       "parameters": {"type": "object"}}}],
           "messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Weather in Paris?"},
                        {"role": "assistant", "tool_calls": [{"id": "abc123def", "type": "function", "function": {
                            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                        {"role": "tool", "tool_call_id": "abc123def", "content": '{"celsius": 20}'},
                        {"role": "assistant", "content": "It is 20 degrees.  "}]}
    sample = ours(v3, row)
    trained = [t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(sample.input_ids, sample.labels))
    call = [v3.tool_calls, *v3.text_ids('[{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123def"}]'),
            v3.eos_id]
    reply = v3.text_ids("It is 20 degrees.") + [v3.eos_id]
    assert trained == call + reply
    untrained = [t for t, label in zip(sample.input_ids, sample.labels) if label == IGNORE_INDEX]
    for never in (v3.tools_start, v3.tools_end, v3.results_start, v3.results_end, v3.inst, v3.end_inst):
        assert never in untrained and never not in trained
    # The result's JSON is parsed and re-written as v3 does, and sits between its control tokens, untrained.
    result = v3.text_ids('{"content": {"celsius": 20}, "call_id": "abc123def"}')
    start = sample.input_ids.index(v3.results_start)
    assert sample.input_ids[start + 1: start + 1 + len(result)] == result
    assert set(sample.labels[start: start + len(result) + 2]) == {IGNORE_INDEX}


def test_call_ids_of_other_shapes_become_v3_ids_consistently(v3, reference):
    """Public sets use `call_...` ids or none; v3 takes 9 letters or digits. The row encodes as the same row
    with those ids replaced by the 9-character ones we derive, call and result alike."""
    row = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
           "messages": [{"role": "user", "content": "go"},
                        {"role": "assistant", "tool_calls": [
                            {"id": "call_Xy12", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                            {"type": "function", "function": {"name": "f", "arguments": {"n": 1}}}]},
                        {"role": "tool", "tool_call_id": "call_Xy12", "content": "a"},
                        {"role": "tool", "content": "b"},
                        {"role": "assistant", "content": "done"}]}
    conversation, reason = check_tool_conversation(row["messages"], row["tools"], ends_with="assistant")
    assert reason is None
    first, second = (call["id"] for call in conversation.messages[1]["tool_calls"])
    assert len({first, second}) == 2 and all(len(i) == 9 and i.isalnum() for i in (first, second))
    assert [m["call_id"] for m in conversation.messages[2:4]] == [first, second]
    import hashlib  # as the module documents: SHA-1 of the row's id, else of the call's position
    assert first == hashlib.sha1(b"call_Xy12").hexdigest()[:9] and second == hashlib.sha1(b"call at 1.1").hexdigest()[:9]
    renamed = copy.deepcopy(row)
    renamed["messages"][1]["tool_calls"][0]["id"] = renamed["messages"][2]["tool_call_id"] = first
    renamed["messages"][1]["tool_calls"][1]["id"] = renamed["messages"][3]["tool_call_id"] = second
    assert v3.encode(conversation).input_ids == ref_ids(reference[0], renamed)
    again, _ = check_tool_conversation(row["messages"], row["tools"], ends_with="assistant")
    assert again == conversation  # the same row always encodes the same way


@pytest.mark.parametrize("change, reason", [
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(name="nope"),
     "message 1 calls tool 'nope', which the row's 'tools' does not declare"),
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="{city: Paris}"),
     "message 1: arguments of the call to 'get_weather' are not JSON (Expecting property name enclosed in double "
     "quotes)"),
    (lambda r: r["messages"].insert(1, {"role": "tool", "tool_call_id": "abc123def", "content": "x"}),
     "message 1 is a tool result with no call"),
    (lambda r: r["messages"][2].update(tool_call_id="zzz"),
     "message 2 is a tool result for call id 'zzz', which no open call has"),
    (lambda r: (r["messages"][2].pop("tool_call_id"), r["messages"][2].update(name="capital_of")),
     "message 2 is a tool result for 'capital_of', which no open call has"),
    (lambda r: r["messages"].pop(2), "message 2: 1 tool call(s) of message 1 have no result before it"),
    (lambda r: r["messages"].insert(1, {"role": "assistant", "content": "hm"}),
     "roles out of order: message 2 is 'assistant' after a reply"),
    (lambda r: r["messages"][1].update(content="Let me look."),
     "message 1 has both content and tool_calls; the v3 format encodes one or the other"),
    (lambda r: r.update(tools=[{"type": "function", "function": {"description": "x"}}]), "tools[0] has no function name"),
    (lambda r: r["messages"].pop(), "conversation must end with an assistant turn"),
])
def test_bad_tool_rows_are_named(v3, change, reason):
    row = {"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
           "messages": [{"role": "user", "content": "Weather?"},
                        {"role": "assistant", "tool_calls": [{"id": "abc123def", "type": "function", "function": {
                            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                        {"role": "tool", "tool_call_id": "abc123def", "content": "sunny"},
                        {"role": "assistant", "content": "Sunny."}]}
    assert encode_chat_row(row, v3, 4096)[1] is None
    change(row)
    sample, got = encode_chat_row(row, v3, 4096)
    assert sample is None and got.startswith(reason), got


def test_v1_refuses_tool_rows_and_names_v3(encoder):
    row = random_tool_row(random.Random(1))
    sample, reason = encode_chat_row(row, encoder, 4096)
    assert sample is None and "v1 chat format" in reason and "v3 tokenizer (Mixtral 8x22B)" in reason
    pair = {"prompt": row["messages"][:1], "tools": row["tools"], "chosen": "a", "rejected": "b"}
    assert "v3 tokenizer" in encode_preference_row(pair, encoder, 4096)[1]
    assert chat_messages({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                         "v1")[1] is None


def test_preference_rows_with_tools_split_where_the_whole_conversation_does(v3):
    rng = random.Random(50)
    checked = 0
    for _ in range(100):
        row = random_tool_row(rng)
        messages = row["messages"]
        if messages[-1]["role"] != "assistant" or messages[-2]["role"] == "system":
            continue
        rejected = {"role": "assistant", "content": "I cannot."}
        pair = {"tools": row["tools"], "prompt": messages[:-1], "chosen": [messages[-1]], "rejected": [rejected]}
        sample, reason = encode_preference_row(pair, v3, 100000)
        if messages[-2]["role"] == "assistant":  # a prompt may not end on a reply
            assert "prompt must end" in reason
            continue
        assert reason is None, reason
        assert sample["prompt_ids"] + sample["chosen_ids"] == ours(v3, row).input_ids
        assert sample["prompt_ids"] + sample["rejected_ids"] == ours(v3, {**row, "messages": messages[:-1] + [rejected]}
                                                                    ).input_ids
        checked += 1
    assert checked > 30


def test_saved_tokenizer_reproduces_v3(tmp_path, v3, reference, v3_lookalikes):
    """Ordinary text: exact, with the trained tokens marked. Tool lists, calls with object arguments and results
    that are not JSON text: exact too."""
    from transformers import AutoTokenizer

    save_tokenizer(v3, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.model_max_length == 65536
    rng = random.Random(60)
    for _ in range(N):
        messages = random_conversation(rng, lookalikes=False)
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert out["input_ids"] == ref_ids(reference[0], {"messages": messages}), messages
        assert out["assistant_masks"] == [int(label != IGNORE_INDEX) for label in v3.encode(messages).labels]
        prompt = messages[:-1]
        ids = hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
        assert ids["input_ids"] == ref_ids(reference[1], {"messages": prompt})
    spaced = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello  "}]  # v3 drops them
    assert hf.apply_chat_template(spaced, tokenize=True, return_dict=True)["input_ids"] == \
        ref_ids(reference[0], {"messages": spaced})
    with_tools = 0
    for _ in range(300):
        row = random_tool_row(rng)
        conversation = row["messages"]
        if any(m["role"] == "tool" and parse_json_content(m["content"]) != m["content"] for m in conversation):
            continue  # the template writes JSON results as text, where v3 parses them: the residual difference
        for m in conversation:
            for call in m.get("tool_calls", []):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        tools = row["tools"]
        ids = hf.apply_chat_template(conversation, tools=tools, tokenize=True, return_dict=True)["input_ids"]
        assert ids == ours(v3, {"tools": tools, "messages": conversation}).input_ids, conversation
        with_tools += 1
    assert with_tools > 50
