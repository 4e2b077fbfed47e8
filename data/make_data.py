"""Generate the bundled sample data: checkable instruction tasks in English and French.

    python data/make_data.py            # rewrites data/chat/*.jsonl and data/preferences/*.jsonl

Every answer can be checked exactly (arithmetic, string edits, look-ups in data/tables/capitals.json,
formatting rules), so evaluation needs no judge model. Each chat row is {"messages": [...], "task": ...,
"answer": ...}; each preference row is {"prompt": [...], "chosen": [...], "rejected": [...]} where the
chosen reply is correct and the rejected one is checkably wrong. The eval splits share no prompt with
the training splits. eval/instructions.jsonl holds the held-out chat prompts with their answers and the
verifiable rules a correct reply follows (case, word count, keywords, format), for generation checks.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
CAPITALS = json.loads((HERE / "tables" / "capitals.json").read_text())
WORDS = (
    "apple river stone cloud tiger piano garden silver rocket candle window forest ocean bridge "
    "marble yellow planet castle dragon pepper violin meadow thunder lantern harbor"
).split()
MOTS = (
    "pomme rivière pierre nuage tigre piano jardin argent fusée bougie fenêtre forêt océan pont "
    "marbre jaune planète château dragon poivre violon prairie tonnerre lanterne port"
).split()
SYSTEMS = {
    "en": ["You are a concise assistant. Answer with the result only.", "Reply briefly and exactly."],
    "fr": ["Tu es un assistant concis. Réponds uniquement avec le résultat.", "Réponds brièvement et exactement."],
}


def arithmetic(rng: random.Random, lang: str):
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    op = rng.choice("+-*" if lang == "en" else "+-")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    if lang == "en":
        prompt = rng.choice([f"What is {a} {op} {b}?", f"Compute {a} {op} {b}.", f"Calculate {a} {op} {b}."])
    else:
        prompt = rng.choice([f"Combien font {a} {op} {b} ?", f"Calcule {a} {op} {b}."])
    wrong = result + rng.choice([-2, -1, 1, 2, 10])
    return "arithmetic", prompt, str(result), str(wrong)


def reverse_word(rng: random.Random, lang: str):
    word = rng.choice(WORDS if lang == "en" else MOTS)
    if lang == "en":
        prompt = rng.choice([f"Reverse the word '{word}'.", f"Write '{word}' backwards."])
    else:
        prompt = rng.choice([f"Écris le mot « {word} » à l'envers.", f"Inverse le mot « {word} »."])
    answer = word[::-1]
    wrong = word if rng.random() < 0.5 else word[::-1][1:] + word[-1]
    if wrong == answer:
        wrong = answer + answer[-1]
    return "reverse", prompt, answer, wrong


def uppercase(rng: random.Random, lang: str):
    word = rng.choice(WORDS if lang == "en" else MOTS)
    prompt = f"Write '{word}' in capital letters." if lang == "en" else f"Écris « {word} » en majuscules."
    return "uppercase", prompt, word.upper(), word.capitalize()


def spell(rng: random.Random, lang: str):
    word = rng.choice(WORDS if lang == "en" else MOTS)
    if lang == "en":
        prompt = f"List the letters of '{word}' separated by commas."
    else:
        prompt = f"Liste les lettres de « {word} » séparées par des virgules."
    return "spell", prompt, ", ".join(word), " ".join(word)


def capital(rng: random.Random, lang: str):
    row = rng.choice(CAPITALS)
    other = rng.choice([r for r in CAPITALS if r["capital_en"] != row["capital_en"]])
    if lang == "en":
        prompt = f"What is the capital of {row['country_en']}?"
        return "capital", prompt, f"{row['capital_en']}.", f"{other['capital_en']}."
    prompt = f"Quelle est la capitale de {row['country_fr']} ?"
    return "capital", prompt, f"{row['capital_fr']}.", f"{other['capital_fr']}."


TASKS = [arithmetic, reverse_word, uppercase, spell, capital]


def conversation(rng: random.Random):
    lang = "fr" if rng.random() < 0.4 else "en"
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS[lang])})
    turns = 2 if rng.random() < 0.25 else 1
    for _ in range(turns):
        task, prompt, answer, wrong = rng.choice(TASKS)(rng, lang)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "task": task, "lang": lang, "answer": answer}, wrong


def preference(rng: random.Random):
    row, wrong = conversation(rng)
    prompt = row["messages"][:-1]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": row["answer"]}],
        "rejected": [{"role": "assistant", "content": wrong}],
        "task": row["task"],
        "lang": row["lang"],
    }


def instruction_rules(task: str, answer: str) -> list[dict]:
    """Verifiable rules (finetune/checkers.py) that a correct reply to `task` follows."""
    return {
        "arithmetic": [{"rule": "format", "value": "integer"}, {"rule": "max_words", "value": 1}],
        "reverse": [{"rule": "case", "value": "lower"}, {"rule": "max_words", "value": 1}],
        "uppercase": [{"rule": "case", "value": "upper"}, {"rule": "max_words", "value": 1}],
        "spell": [{"rule": "format", "value": "comma_list"}, {"rule": "format", "value": "single_line"}],
        "capital": [{"rule": "keywords", "value": [answer.rstrip(".")]}, {"rule": "ends_with", "value": "."},
                    {"rule": "max_words", "value": 3}],
    }[task]


def instruction_row(row: dict) -> dict:
    """An eval prompt (the held-out conversation without its last reply), its answer and its rules."""
    return {"messages": row["messages"][:-1], "answer": row["answer"], "task": row["task"], "lang": row["lang"],
            "rules": instruction_rules(row["task"], row["answer"])}


def capital_choices(rng: random.Random) -> list[dict]:
    """Multiple-choice rows for the lm-evaluation-harness task in eval/lm_eval (one per country)."""
    rows = []
    for row in CAPITALS:
        wrong = rng.sample([r["capital_en"] for r in CAPITALS if r["capital_en"] != row["capital_en"]], 3)
        choices = sorted([row["capital_en"], *wrong], key=lambda _: rng.random())
        rows.append({"country": row["country_en"], "choices": choices, "label": choices.index(row["capital_en"])})
    return rows


def prompt_key(messages: list[dict]) -> str:
    return json.dumps([m["content"] for m in messages if m["role"] == "user"], ensure_ascii=False)


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def generate(out: Path = HERE, eval_dir: Path = HERE.parent / "eval", train_size: int = 2000, eval_size: int = 200, seed: int = 0) -> None:
    rng = random.Random(seed)
    seen: set[str] = set()

    def draw(make, count: int, key: str, hold_out: bool) -> list[dict]:
        rows = []
        while len(rows) < count:
            row = make(rng)
            row = row[0] if isinstance(row, tuple) else row
            if prompt_key(row[key]) in seen:
                continue
            if hold_out:
                seen.add(prompt_key(row[key]))
            rows.append(row)
        return rows

    # Held-out rows first: no training row (chat or preference) repeats an eval prompt.
    chat_eval = draw(conversation, eval_size, "messages", hold_out=True)
    pref_eval = draw(preference, eval_size, "prompt", hold_out=True)
    chat_train = draw(conversation, train_size, "messages", hold_out=False)
    pref_train = draw(preference, train_size, "prompt", hold_out=False)
    write(out / "chat" / "train.jsonl", chat_train)
    write(out / "chat" / "eval.jsonl", chat_eval)
    write(out / "preferences" / "train.jsonl", pref_train)
    write(out / "preferences" / "eval.jsonl", pref_eval)
    write(eval_dir / "instructions.jsonl", [instruction_row(row) for row in chat_eval])
    write(eval_dir / "lm_eval" / "capitals_mc.jsonl", capital_choices(random.Random(seed)))


if __name__ == "__main__":
    generate()
    print("wrote data/chat/{train,eval}.jsonl, data/preferences/{train,eval}.jsonl eval/instructions.jsonl and eval/lm_eval/capitals_mc.jsonl")
