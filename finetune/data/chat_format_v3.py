"""Mixtral 8x22B Instruct's chat format (`mistral_common`'s v3 tokenizer), token-exact, with function calling.

What v3 changes from v1 (`finetune/data/chat_format.py`), as `InstructTokenizerV3` encodes it:
* `[INST]`, `[/INST]` are control tokens, with the message encoded on its own between them;
* the system prompt joins the *last* user message (`system + "\\n\\n" + user`), not the first;
* the tool list, `[AVAILABLE_TOOLS] json [/AVAILABLE_TOOLS]`, comes right before the last user message;
* a reply drops its trailing spaces;
* a tool-calling turn is `[TOOL_CALLS] [{"name", "arguments", "id"}, ...]</s>`, a result
  `[TOOL_RESULTS] {"content", "call_id"} [/TOOL_RESULTS]`, and every earlier call and result stays in.

Written by hand for the same reason as v1: `mistral_common` gives the ids but no label mask. Labels are
the assistant turns and their EOS, tool calls included; never the tool list, results or user text.
"""

from __future__ import annotations

import json

from finetune.data.chat_format import IGNORE_INDEX, ChatEncoder, Sample
from finetune.data.tool_rows import ToolConversation

V3_CONTROL = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
              "[/TOOL_RESULTS]")

# Transformers template for v3. Each segment between control tokens gets SentencePiece's dummy-prefix
# space from the tokenizer itself, as `mistral_common` encodes each part on its own. Exact for ordinary
# text, tool lists and calls given with object arguments; a tool result whose content is JSON text is
# written as text here, where v3 parses it (serve tools with `mistral_common`).
V3_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = none %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.index0 == ns.last_user and tools %}"
    "{%- set ns2 = namespace(tools=[]) %}"
    "{%- for tool in tools %}{%- set f = tool['function'] if 'function' in tool else tool %}"
    "{%- set ns2.tools = ns2.tools + [{'type': 'function', 'function': {'name': f['name'], "
    "'description': f.get('description', ''), 'parameters': f.get('parameters', {})}}] %}{%- endfor %}"
    "{{- '[AVAILABLE_TOOLS]' + ns2.tools|tojson + '[/AVAILABLE_TOOLS]' }}"
    "{%- endif %}"
    "{%- if loop.index0 == ns.last_user and system_message is not none %}"
    "{{- '[INST]' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{%- set ns3 = namespace(calls=[]) %}"
    "{%- for call in message['tool_calls'] %}{%- set f = call['function'] if 'function' in call else call %}"
    "{%- set ns3.calls = ns3.calls + [{'name': f['name'], 'arguments': f['arguments'], 'id': call['id']}] %}"
    "{%- endfor %}"
    "{% generation %}{{- '[TOOL_CALLS]' + ns3.calls|tojson + eos_token }}{% endgeneration %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'].rstrip(' ') + eos_token }}{% endgeneration %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '[TOOL_RESULTS]' + {'content': message['content'], 'call_id': message['tool_call_id']}|tojson"
    " + '[/TOOL_RESULTS]' }}"
    "{%- else %}{{- raise_exception('Unexpected role ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def json_text(value) -> str:
    """v3 writes every JSON part with Python's default separators and non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False)


class ChatEncoderV3(ChatEncoder):
    """Conversation (plain, or a `ToolConversation`) -> ids and labels, exactly as `MistralTokenizer.v3()`."""

    format = "v3"
    chat_template = V3_CHAT_TEMPLATE
    context = 65536  # Mixtral 8x22B's

    def __init__(self, sentencepiece_path):
        super().__init__(sentencepiece_path)
        ids = {name: self.sp.piece_to_id(name) for name in V3_CONTROL}
        missing = [name for name, i in ids.items() if i == self.sp.unk_id() or not self.sp.is_control(i)]
        if missing:
            raise ValueError(f"{self.path} is not a v3 tokenizer (no {missing[0]} control token); the v3 chat "
                             "format needs Mixtral 8x22B's tokenizer")
        (self.inst, self.end_inst, self.tool_calls, self.tools_start, self.tools_end, self.results_start,
         self.results_end) = (ids[name] for name in V3_CONTROL)

    def __reduce__(self):
        return ChatEncoderV3, (self.path,)

    def user_ids(self, content: str) -> list[int]:
        return [self.inst, *self.text_ids(content), self.end_inst]

    def reply_ids(self, content) -> list[int]:
        """A text reply (a string) or a tool-calling turn (a list of `{"name", "arguments", "id"}`)."""
        if isinstance(content, list):
            return [self.tool_calls, *self.text_ids(json_text(content)), self.eos_id]
        return self.text_ids(content.rstrip(" ")) + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids, with the control tokens written out (`[TOOL_CALLS]` starts a tool call);
        SentencePiece alone drops them."""
        text, start = "", 0
        for i, token in enumerate(ids + [None]):
            if token is None or (token != self.eos_id and self.sp.is_control(token)):
                text += self.sp.decode(ids[start:i]) + (self.sp.id_to_piece(token) if token is not None else "")
                start = i + 1
        return text

    def tool_result_ids(self, message: dict) -> list[int]:
        result = {"content": message["content"], "call_id": message["call_id"]}
        return [self.results_start, *self.text_ids(json_text(result)), self.results_end]

    def encode(self, messages, tools: list[dict] | None = None) -> Sample:
        if isinstance(messages, ToolConversation):
            messages, tools = messages.messages, messages.tools
        system = None
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        ids, labels = [self.bos_id], [IGNORE_INDEX]
        for i, message in enumerate(messages):
            if message["role"] == "user":
                part = []
                if i == last_user and tools:
                    part += [self.tools_start, *self.text_ids(json_text(tools)), self.tools_end]
                content = message["content"]
                if i == last_user and system is not None:
                    content = system + "\n\n" + content
                part += self.user_ids(content)
            elif message["role"] == "tool":
                part = self.tool_result_ids(message)
            else:
                part = self.reply_ids(message.get("tool_calls") or message["content"])
                ids += part
                labels += part
                continue
            ids += part
            labels += [IGNORE_INDEX] * len(part)
        return Sample(ids, labels)

    def encode_prompt(self, messages, tools: list[dict] | None = None) -> list[int]:
        return self.encode(messages, tools).input_ids
