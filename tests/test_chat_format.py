"""The chat format is token-exact with mistral_common, the reference for Mixtral-Instruct."""

import random

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from finetune.data.chat_format import IGNORE_INDEX, ChatEncoder, bundled_sentencepiece_path, save_tokenizer
from helpers import random_conversation

N = 300
SPECIAL_SPELLINGS = ("<s>", "</s>", "<unk>")


@pytest.fixture(scope="module")
def reference():
    """(reference for conversations ending with a reply, reference for prompts)."""
    path = str(bundled_sentencepiece_path())
    return (
        MistralTokenizer.from_file(path, mode=ValidationMode.finetuning),
        MistralTokenizer.from_file(path, mode=ValidationMode.test),
    )


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(ChatEncoder(bundled_sentencepiece_path()), out)
    return AutoTokenizer.from_pretrained(out)


def ref_ids(tokenizer, messages):
    return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


@pytest.mark.parametrize("lookalikes", [False, True], ids=["plain", "lookalikes"])
def test_training_encoder_matches_reference(encoder, reference, lookalikes):
    rng = random.Random(1 + lookalikes)
    for _ in range(N):
        messages = random_conversation(rng, lookalikes)
        assert encoder.encode(messages).input_ids == ref_ids(reference[0], messages), messages


@pytest.mark.parametrize("lookalikes", [False, True], ids=["plain", "lookalikes"])
def test_prompt_encoder_matches_reference(encoder, reference, lookalikes):
    rng = random.Random(3 + lookalikes)
    for _ in range(N):
        messages = random_conversation(rng, lookalikes, end_with_assistant=False)
        assert encoder.encode_prompt(messages) == ref_ids(reference[1], messages), messages


def test_labels_are_the_replies_and_eos_only(encoder):
    rng = random.Random(5)
    for _ in range(N):
        messages = random_conversation(rng, lookalikes=True)
        sample = encoder.encode(messages)
        assert sample.input_ids.count(encoder.bos_id) == 1 and sample.input_ids[0] == encoder.bos_id
        labelled = [t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE_INDEX]
        assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(sample.input_ids, sample.labels))
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        # Split the labelled tokens at EOS: each run decodes to exactly one reply.
        runs, current = [], []
        for token in labelled:
            if token == encoder.eos_id:
                runs.append(current)
                current = []
            else:
                current.append(token)
        assert current == [] and len(runs) == len(replies)
        for run, reply in zip(runs, replies):
            # SentencePiece writes spaces as U+2581, so a literal U+2581 decodes back as a space.
            assert encoder.decode(run) == reply.replace("\u2581", " ")
        # Text `</s>` typed inside a message never becomes the EOS id.
        assert labelled.count(encoder.eos_id) == len(replies)
        assert sample.input_ids.count(encoder.eos_id) == len(replies)


def test_saved_tokenizer_template_matches_reference_on_ordinary_text(hf_tokenizer, encoder, reference):
    rng = random.Random(7)
    for _ in range(N):
        messages = random_conversation(rng, lookalikes=False)
        out = hf_tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert out["input_ids"] == ref_ids(reference[0], messages), messages
        # The {% generation %} markers select exactly the tokens the training encoder labels.
        labels = encoder.encode(messages).labels
        assert out["assistant_masks"] == [int(lab != IGNORE_INDEX) for lab in labels]


def test_saved_tokenizer_prompt_with_generation_prompt_matches(hf_tokenizer, reference):
    rng = random.Random(8)
    for _ in range(50):
        messages = random_conversation(rng, lookalikes=False, end_with_assistant=False)
        ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
        assert ids["input_ids"] == ref_ids(reference[1], messages)


def test_saved_tokenizer_residual_difference_is_special_token_spellings_only(hf_tokenizer, reference, monkeypatch):
    """README documents it: text spelling <s>, </s> or <unk> becomes a control id in transformers."""
    import helpers

    rng = random.Random(9)
    monkeypatch.setattr(helpers, "LOOKALIKES", [x for x in helpers.LOOKALIKES if x not in SPECIAL_SPELLINGS])
    for _ in range(N):
        messages = random_conversation(rng, lookalikes=True)
        out = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
        assert out["input_ids"] == ref_ids(reference[0], messages), messages
    messages = [{"role": "user", "content": "say </s> please"}, {"role": "assistant", "content": "ok"}]
    hf_ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert hf_ids.count(2) == 2 and ref_ids(reference[0], messages).count(2) == 1


def test_saved_tokenizer_plain_text_matches_sentencepiece(hf_tokenizer, encoder):
    rng = random.Random(11)
    alphabet = list("abcdefXYZ  \n\t.,:!?0123456789éàüß日本🤖Æ\u00a0") + ["    ", "the", " and", "[INST]"]
    for _ in range(1000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == encoder.text_ids(text), repr(text)
        assert hf_tokenizer(text)["input_ids"] == [encoder.bos_id] + encoder.text_ids(text)


def test_pad_is_not_eos(hf_tokenizer, encoder):
    assert encoder.pad_id != encoder.eos_id
    assert hf_tokenizer.pad_token_id == encoder.pad_id
    assert hf_tokenizer.eos_token_id == encoder.eos_id


@pytest.mark.parametrize("roles", [("user", "user"), ("assistant",), ("system", "assistant"),
                                   ("user", "assistant", "assistant")])
def test_template_rejects_non_alternating_roles(hf_tokenizer, roles):
    from jinja2.exceptions import TemplateError

    messages = [{"role": role, "content": f"m{i}"} for i, role in enumerate(roles)]
    with pytest.raises(TemplateError, match=r"^Conversation roles must alternate user/assistant/user/assistant"):
        hf_tokenizer.apply_chat_template(messages, tokenize=False)


def test_template_accepts_alternating_roles_after_a_system_message(hf_tokenizer, encoder):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert list(ids) == encoder.encode_prompt(messages)


def test_hub_tokenizer_falls_back_to_the_bundled_one_only_offline_and_says_so(repo_root):
    import os
    import subprocess
    import sys

    code = ("import warnings; warnings.simplefilter('always')\n"
            "from finetune.data.chat_format import bundled_sentencepiece_path, find_sentencepiece\n"
            "print(find_sentencepiece('mistralai/Mixtral-8x7B-v0.1') == bundled_sentencepiece_path())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "True"
    assert "cannot fetch tokenizer.model of mistralai/Mixtral-8x7B-v0.1 (LocalEntryNotFoundError)" in proc.stderr
