"""Talk to the model you trained: a multi-turn chat in the exact Mixtral-Instruct format, streamed.

    python -m finetune.chat runs/demo/dpo                         (or: finetune chat runs/demo/dpo)
    python -m finetune.chat runs/demo/merged --system "Réponds brièvement." --temperature 0.7
    python -m finetune.chat runs/demo/dpo --prompt "What is 12 + 30?"        # one reply, then exit
    python -m finetune.chat runs/tiny/sft_tools --tools tools.json            # v3 models: function calling

MODEL_OR_ADAPTER is loaded as finetune.evaluate loads it: a merged (or any full) model folder or Hub id, or
an adapter folder on the base it records (or --base). Every turn, the whole conversation (the --system text,
each user message and each reply so far) is encoded by the training encoder (finetune/data/chat_format.py), so
the model reads exactly the tokens it was trained on. Replies appear token by token and stop at EOS.
Greedy by default (--temperature 0), like evaluate's generations: `--prompt` gives the reply evaluate
records for the same prompt.

Type /reset to start a new conversation (the --system text stays), /exit or Ctrl-D to leave; Ctrl-C stops a
reply midway (that turn is dropped). A turn that would not fit the model's context is refused with the
sizes; when only part of --max-new-tokens fits, the reply is capped and you are told. With stdin not a
terminal (a pipe, a script), each input line is one turn and stdout holds only the replies, each ended by a
newline; notices go to stderr.

With `--tools FILE` (a JSON list of OpenAI-shape function definitions; v3 models, Mixtral 8x22B) the tools are
in every prompt where v3 puts them. A reply that is a tool call is shown as `[TOOL_CALLS][{"name": ...}]`,
and the next input lines are the calls' results, one line per call, in order (`tool>` on a terminal); the
model then goes on from them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

import torch
from transformers.generation.streamers import BaseStreamer

from finetune.cli import check_number, invoked_as
from finetune.data.tool_rows import ToolConversation, check_tools, parse_json_content, v3_call_id
from finetune.errors import InputError
from finetune.evaluation.loading import LoadedModel, check_loadable, encoder_of, load_for_eval
from finetune.evaluation.scoring import PAD_ID, until_eos


class ContextFull(InputError):
    """A turn whose prompt alone would not fit the model's context."""


class ReplyStreamer(BaseStreamer):
    """Writes a reply as `generate()` produces it. Decodes all reply ids so far with the training encoder and
    writes what is new: SentencePiece places spaces and joins byte pieces only in context, so decoding one
    token at a time would misplace spaces and split accented letters."""

    def __init__(self, encoder, out: TextIO):
        self.encoder, self.out = encoder, out
        self.ids: list[int] = []
        self.shown = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.ids += [t for t in value.reshape(-1).tolist() if t != self.encoder.eos_id]
        self._show(final=False)

    def end(self) -> None:
        self._show(final=True)

    def _show(self, final: bool) -> None:
        text = self.encoder.decode(self.ids)
        if not final and (text.endswith("\ufffd") or not text.startswith(self.shown)):
            return  # a character whose bytes are still arriving, or a rewrite: wait for more
        new = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.out.write(new)
        self.out.flush()
        self.shown += new


class ChatSession:
    """One conversation with a loaded model: the history, and replies generated from all of it."""

    def __init__(self, loaded: LoadedModel, system: str | None = None, max_new_tokens: int = 512,
                 temperature: float = 0.0, tools: list[dict] | None = None):
        self.loaded = loaded
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.tools = tools
        self.turns: list[dict] = []
        self.pending: list[dict] = []  # tool calls of the last reply still waiting for their result
        self.context = loaded.model.config.max_position_embeddings

    def messages(self, user_text: str | None = None) -> list[dict]:
        """The conversation so far (system first), with `user_text` as the next user turn."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        user = [{"role": "user", "content": user_text}] if user_text is not None else []
        return system + self.turns + user

    def reset(self) -> None:
        self.turns, self.pending = [], []

    def reply(self, user_text: str, out: TextIO, notices: TextIO) -> str:
        """Generate (and stream to `out`) the reply to `user_text` after the history; add both to it."""
        return self._respond([{"role": "user", "content": user_text}], out, notices)

    def tool_result(self, text: str, out: TextIO, notices: TextIO) -> str | None:
        """Record `text` as the result of the first call still waiting; once every call has its result, the
        model's next turn (generated, streamed and recorded), else None."""
        call = self.pending.pop(0)
        self.turns.append({"role": "tool", "content": parse_json_content(text), "call_id": call["id"]})
        if self.pending:
            return None
        try:
            return self._respond([], out, notices)
        except BaseException:
            self.turns.pop()  # the turn is dropped, as a user turn would be: its call waits again
            self.pending.insert(0, call)
            raise

    def _respond(self, new: list[dict], out: TextIO, notices: TextIO) -> str:
        encoder = self.loaded.encoder
        messages = self.messages() + new
        prompt = ToolConversation(messages, self.tools) if self.tools else messages
        ids = encoder.encode_prompt(prompt)
        room = self.context - len(ids)
        if room < 1:
            raise ContextFull(f"this turn does not fit: the conversation with it is {len(ids)} tokens and the model "
                              f"reads at most {self.context} (max_position_embeddings); /reset starts a new "
                              "conversation, or send a shorter message")
        budget = min(self.max_new_tokens, room)
        if budget < self.max_new_tokens:
            print(f"(only {room} tokens of the model's {self.context}-token context are left: the reply stops at "
                  f"{budget} tokens; /reset starts a new conversation)", file=notices)
        device = next(self.loaded.model.parameters()).device
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        streamer = ReplyStreamer(encoder, out)
        with torch.no_grad():
            output = self.loaded.model.generate(
                input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), device=device),
                max_new_tokens=budget, pad_token_id=PAD_ID, eos_token_id=encoder.eos_id, streamer=streamer, **sampling)
        reply_ids, ended = until_eos(output[0, len(ids):].tolist(), encoder.eos_id)
        reply = encoder.decode(reply_ids)
        out.write("\n")
        out.flush()
        if not ended:
            limit = "--max-new-tokens sets the limit" if budget == self.max_new_tokens else "the context is full"
            print(f"(reply cut at {budget} tokens, before the model ended it; {limit})", file=notices)
        calls = self._tool_calls(reply_ids) if self.tools else None
        if calls:
            self.turns += [*new, {"role": "assistant", "tool_calls": calls}]
            self.pending = list(calls)
            names = ", ".join(f"{c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})" for c in calls)
            print(f"(tool call: {names}; give each result on its own line)", file=notices)
        else:
            self.turns += [*new, {"role": "assistant", "content": reply}]
        return reply

    def _tool_calls(self, reply_ids: list[int]) -> list[dict] | None:
        """The calls of a v3 tool-calling reply, with ids (made up when the model wrote none); None for text."""
        encoder = self.loaded.encoder
        if not reply_ids or reply_ids[0] != encoder.tool_calls:
            return None
        calls = parse_json_content(encoder.sp.decode(reply_ids[1:]))
        if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                                  and isinstance(c.get("arguments"), dict) for c in calls):
            return None  # not a well-formed call: kept as the text it is
        return [{"name": c["name"], "arguments": c["arguments"],
                 "id": v3_call_id(c.get("id"), f"{len(self.turns)}.{k}")} for k, c in enumerate(calls)]


def read_turn(stdin: TextIO, tty: bool, prompt: str = "you> ") -> str | None:
    """The next input line (with `prompt` on a terminal); None at the end of input or on Ctrl-C."""
    if tty and stdin is sys.stdin:
        try:
            return input(prompt)
        except (EOFError, KeyboardInterrupt):
            print()
            return None
    try:
        line = stdin.readline()
    except KeyboardInterrupt:  # Ctrl-C while waiting for piped input: the end of the session
        return None
    return line or None


def not_utf8(text: str) -> bool:
    """Whether text read with `surrogateescape` held bytes that are not UTF-8."""
    return any("\udc80" <= c <= "\udcff" for c in text)


def interactive(session: ChatSession, stdin: TextIO, out: TextIO, notices: TextIO) -> None:
    """Read turns and commands from `stdin` until /exit or the end of input."""
    tty = stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and recall for input())
        except ImportError:
            pass
    while (line := read_turn(stdin, tty, "tool> " if session.pending else "you> ")) is not None:
        text = line.strip()
        if not text:
            continue
        if not_utf8(text):
            print("(that line is not valid UTF-8 text; it is left out)", file=notices)
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            print("(new conversation)", file=notices)
            continue
        if text.startswith("/"):
            print(f"(unknown command {text.split()[0]}; commands: /reset, /exit)", file=notices)
            continue
        if tty:
            out.write("assistant> ")
            out.flush()
        try:
            if session.pending:
                session.tool_result(text, out, notices)
            else:
                session.reply(text, out, notices)
        except ContextFull as err:
            print(f"({err})", file=notices)
        except KeyboardInterrupt:
            out.write("\n")
            print("(stopped; that turn is left out of the conversation)", file=notices)


def read_tools(path: str) -> list[dict]:
    """The --tools file, checked as training checks a row's `tools`."""
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"--tools {path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"--tools {path}: not JSON ({err}); give a JSON list of function definitions") from None
    tools, reason = check_tools(tools)
    if reason or not tools:
        raise InputError(f"--tools {path}: {reason or 'no tools in the list'}")
    return tools


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=invoked_as("chat"), description=__doc__.split("\n")[0])
    parser.add_argument("model", help="merged model folder, Hub id, or adapter folder")
    parser.add_argument("--base", help="base model for an adapter (default: the one the adapter records)")
    parser.add_argument("--system", help="system message, folded into the first user turn as in training")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="longest reply in tokens (default 512)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampling")
    parser.add_argument("--prompt", help="answer this one message and exit (for scripts and pipes)")
    parser.add_argument("--tools", metavar="FILE",
                        help="JSON list of function definitions (OpenAI shape) the model may call (v3 models)")
    args = parser.parse_args(argv)
    tools = read_tools(args.tools) if args.tools else None
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {args.max_new_tokens}: give at least 1")
    check_number("--temperature", args.temperature, minimum=0)  # 0: greedy
    if args.prompt is not None and not args.prompt.strip():
        raise InputError("--prompt is empty: give the message to answer")
    for option, value in (("--prompt", args.prompt), ("--system", args.system)):
        if value is not None and not_utf8(value):
            raise InputError(f"{option} is not valid UTF-8 text: give it in UTF-8")
    check_loadable(args.model, args.base)

    notices = sys.stderr
    if tools and encoder_of(args.model, args.base).format != "v3":
        raise InputError(f"--tools: {args.model} speaks the v1 chat format (Mixtral 8x7B's tokenizer), which has no "
                         "tool calls; function calling needs a v3 model (Mixtral 8x22B)")
    loaded = load_for_eval(args.model, args.base)
    session = ChatSession(loaded, args.system, args.max_new_tokens, args.temperature, tools)
    if args.prompt is not None:
        session.reply(args.prompt, sys.stdout, notices)
        return 0
    on = f" (adapter on {loaded.base})" if loaded.base else ""
    print(f"chatting with {args.model}{on}: Mixtral-Instruct format, {session.context}-token context. "
          "/reset starts a new conversation, /exit leaves.", file=notices)
    if hasattr(sys.stdin, "reconfigure"):  # a real stream: a line that is not UTF-8 is skipped, not a traceback
        sys.stdin.reconfigure(errors="surrogateescape")
    interactive(session, sys.stdin, sys.stdout, notices)
    return 0


if __name__ == "__main__":
    from finetune.cli import run_guarded

    sys.exit(run_guarded(main))
