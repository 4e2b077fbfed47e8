"""The Ollama `Modelfile` written next to a GGUF file: the file, the model's Mixtral-Instruct template in
Ollama's Go template language, and the stop tokens.

Ollama does not run the Jinja template the GGUF carries; it needs its own. Both templates below write the
text our encoders produce (finetune/data/chat_format.py and chat_format_v3.py), which Ollama then
tokenizes with the GGUF's vocabulary, BOS first:
- v1 (Mixtral 8x7B): the system prompt joins the first user message; `[INST] user [/INST] reply</s>`.
- v3 (Mixtral 8x22B): the system prompt and the tool list go with the last user message;
  `[INST] user[/INST] reply</s>`, calls after `[TOOL_CALLS]`, results between `[TOOL_RESULTS]` tokens.
  Ollama gives no call ids, so tool turns are near v3 but not token-exact; serve tools through
  `mistral_common` (vLLM's `--tokenizer-mode mistral`) where they must be exact.
"""

from __future__ import annotations

V1_TEMPLATE = """{{- $first := true }}
{{- range .Messages }}
{{- if eq .Role "user" }}[INST] {{ if and $first $.System }}{{ $.System }}

{{ end }}{{ .Content }} [/INST]{{ $first = false }}
{{- else if eq .Role "assistant" }} {{ .Content }}</s>
{{- end }}
{{- end }}"""

V3_TEMPLATE = """{{- range $index, $_ := .Messages }}
{{- if eq .Role "user" }}
{{- if and (eq (len (slice $.Messages $index)) 1) $.Tools }}[AVAILABLE_TOOLS] {{ $.Tools }}[/AVAILABLE_TOOLS]
{{- end }}[INST] {{ if and $.System (eq (len (slice $.Messages $index)) 1) }}{{ $.System }}

{{ end }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }}
{{- if .Content }} {{ .Content }}</s>
{{- else if .ToolCalls }}[TOOL_CALLS] [
{{- range $i, $call := .ToolCalls }}{{ if $i }}, {{ end }}{"name": "{{ $call.Function.Name }}", "arguments": {{ $call.Function.Arguments }}}
{{- end }}]</s>
{{- end }}
{{- else if eq .Role "tool" }}[TOOL_RESULTS] {"content": {{ .Content }}}[/TOOL_RESULTS]
{{- end }}
{{- end }}"""

TEMPLATES = {"v1": V1_TEMPLATE, "v3": V3_TEMPLATE}


def modelfile(gguf_name: str, chat_format: str) -> str:
    """The Modelfile for the GGUF file `gguf_name` (in the same folder) of a model in `chat_format`."""
    stops = ["</s>", "[INST]", "[/INST]"]
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{TEMPLATES[chat_format]}"""', ""]
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"
