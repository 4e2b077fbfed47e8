"""llama.cpp itself runs what `finetune export --gguf` writes: same tokens, same logits, same greedy replies.

    pip install llama-cpp-python   # builds llama.cpp (about 20 minutes on 2 cores; PyPI has no CPU wheel)
    python benchmarks/gguf_in_llama_cpp.py [--pretrain-steps 300] [--types f16 q8_0 q4_0]

Builds a pretrained tiny Mixtral for each chat format (v1: Mixtral 8x7B's tokenizer; v3: Mixtral 8x22B's),
writes its GGUF of each type with `python -m finetune.export MODEL --gguf TYPE --out OUT` as a user runs it,
and loads that file in llama.cpp (through llama-cpp-python). For five chat prompts in five languages it
compares llama.cpp's tokens of the prompt text (BOS added, control tokens parsed) with our encoder's,
llama.cpp's logits with transformers' on the safetensors folder (max |difference| / max |logit|), and the
greedy replies (16 tokens). And for 200 multi-turn conversations of `data/chat/eval.jsonl` (system prompts
included), the prompt that the GGUF's own chat template renders (llama-cpp-python's Jinja formatter, what
its chat completions use), tokenized by llama.cpp, against our encoder's ids.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = ("What is the capital of France?", "Écris « pomme » à l'envers.", "Wie viel ist 12 plus 30?",
           "¿Cuál es la capital de Italia?", "Scrivi la parola «drago» al contrario.")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_0"])
    args = parser.parse_args()
    import numpy as np
    import torch
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoModelForCausalLM

    from finetune.data.chat_format import find_sentencepiece
    from finetune.data.encoders import chat_encoder
    from finetune.model.tiny import make_tiny_mixtral

    rows = [json.loads(line) for line in Path("data/chat/eval.jsonl").read_text().splitlines()]
    conversations = [row["messages"][:-1] for row in rows]  # each ends with a user turn
    print("| format | type | prompt tokens equal | logits: max diff / max | greedy replies equal "
          "| chat-template prompts equal |")
    print("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for chat_format in ("v1", "v3"):
            base = make_tiny_mixtral(Path(tmp) / chat_format, seed=0, chat_format=chat_format,
                                     pretrain_steps=args.pretrain_steps)
            encoder = chat_encoder(find_sentencepiece(str(base)))
            reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
            prompts = [encoder.encode_prompt([{"role": "user", "content": text}]) for text in PROMPTS]
            for kind in args.types:
                out = Path(tmp) / f"{chat_format}-{kind}"
                run = subprocess.run([sys.executable, "-m", "finetune.export", str(base), "--gguf", kind, "--out",
                                      str(out)], capture_output=True, text=True)
                if run.returncode:
                    raise SystemExit(f"export --gguf {kind} failed:\n{run.stderr[-2000:]}")
                llm = Llama(model_path=str(next(out.glob("*.gguf"))), n_ctx=256, logits_all=True, verbose=False,
                            n_threads=2)
                same_tokens = same_replies = 0
                worst = 0.0
                for question, ids in zip(PROMPTS, prompts):
                    # The prompt as the text a server renders: [INST] is text in v1 and a control token in v3,
                    # where llama.cpp puts a space before the text that follows a control token, as v3 does.
                    text = f"[INST] {question} [/INST]" if chat_format == "v1" else f"[INST]{question}[/INST]"
                    tokens = llm.tokenize(text.encode(), add_bos=True, special=True)
                    same_tokens += tokens == ids
                    llm.reset()
                    llm.eval(ids)
                    theirs = np.array(llm.scores[: len(ids)])
                    with torch.no_grad():
                        ours = reference(torch.tensor([ids])).logits[0].numpy()
                    worst = max(worst, float(np.abs(theirs - ours).max() / np.abs(ours).max()))
                    with torch.no_grad():
                        greedy = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                                    eos_token_id=None, pad_token_id=encoder.pad_id)[0, len(ids):]
                    llm.reset()
                    generated = []
                    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                        generated.append(token)
                        if len(generated) == 16:
                            break
                    same_replies += generated == greedy.tolist()
                template = llm.metadata["tokenizer.chat_template"]
                formatter = Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>")
                same_chats = sum(
                    llm.tokenize(formatter(messages=messages).prompt.encode(), add_bos=False, special=True)
                    == encoder.encode_prompt(messages) for messages in conversations)
                print(f"| {chat_format} | {kind} | {same_tokens}/{len(prompts)} | {worst:.2e} | "
                      f"{same_replies}/{len(prompts)} | {same_chats}/{len(conversations)} |", flush=True)
                del llm


if __name__ == "__main__":
    main()
