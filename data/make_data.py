"""Generate the bundled sample data: checkable instruction tasks in Mixtral-Instruct's five languages,
English, French, German, Spanish and Italian.

    python data/make_data.py            # rewrites data/{chat,preferences,tools,tool_preferences}/*.jsonl

Every answer can be checked exactly (arithmetic, string edits, look-ups in data/tables/capitals.json,
formatting rules), so evaluation needs no judge model. Every task family exists in every language, phrased
the way that language writes it: its own quotation marks (« » with spaces in French, „ “ in German, « » in
Spanish and Italian), the space before "?" in French, Spanish's opening "¿", German nouns capitalised, and
each language's contracted prepositions before country names ("du Portugal", "vom Senegal", "del
Portogallo"). Each chat row is {"messages": [...], "task": ..., "lang": ..., "answer": ...}; each
preference row is {"prompt": [...], "chosen": [...], "rejected": [...], "task": ..., "lang": ...} where the
chosen reply is correct and the rejected one is checkably wrong. The eval splits share no prompt with the
training splits. eval/instructions.jsonl holds the held-out chat prompts with their answers and the
verifiable rules a correct reply follows (case, word count, keywords, format), for generation checks.

Function calling (Mixtral 8x22B's v3 format): data/tools holds chat rows with `tools` and a call, its result
and the answer; data/tool_preferences pairs the right call against a wrong one; eval/tool_calls.jsonl holds
held-out questions whose `tool_call` rule checks the call a reply makes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
LANGUAGES = ("en", "fr", "de", "es", "it")
# capitals.json holds, per language, the country as it follows that language's "of" (with its article:
# "la France", "der Schweiz" (dative after "von"), "los Países Bajos", "il Portogallo") and the capital.
CAPITALS = json.loads((HERE / "tables" / "capitals.json").read_text())
WORDS = {
    "en": "apple river stone cloud tiger piano garden silver rocket candle window forest ocean bridge marble "
          "yellow planet castle dragon pepper violin meadow thunder lantern harbor",
    "fr": "pomme rivière pierre nuage tigre piano jardin argent fusée bougie fenêtre forêt océan pont marbre "
          "jaune planète château dragon poivre violon prairie tonnerre lanterne port",
    "de": "Apfel Fluss Stein Wolke Tiger Klavier Garten Silber Rakete Kerze Fenster Wald Ozean Brücke Marmor "
          "gelb Planet Schloss Drache Pfeffer Geige Wiese Donner Laterne Hafen",
    "es": "manzana río piedra nube tigre piano jardín plata cohete vela ventana bosque océano puente mármol "
          "amarillo planeta castillo dragón pimienta violín prado trueno linterna puerto",
    "it": "mela fiume pietra nuvola tigre pianoforte giardino argento razzo candela finestra foresta oceano "
          "ponte marmo giallo pianeta castello drago pepe violino prato tuono lanterna porto",
}
WORDS = {lang: words.split() for lang, words in WORDS.items()}
SYSTEMS = {
    "en": ["You are a concise assistant. Answer with the result only.", "Reply briefly and exactly."],
    "fr": ["Tu es un assistant concis. Réponds uniquement avec le résultat.", "Réponds brièvement et exactement."],
    "de": ["Du bist ein knapper Assistent. Antworte nur mit dem Ergebnis.", "Antworte kurz und genau."],
    "es": ["Eres un asistente conciso. Responde solo con el resultado.", "Responde de forma breve y exacta."],
    "it": ["Sei un assistente conciso. Rispondi solo con il risultato.", "Rispondi in modo breve ed esatto."],
}
# The prompts of each task family, per language; {w} is a word, {a} {op} {b} a sum, {of} "of <country>".
PROMPTS = {
    "arithmetic": {
        "en": ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}."],
        "fr": ["Combien font {a} {op} {b} ?", "Calcule {a} {op} {b}."],
        "de": ["Was ist {a} {op} {b}?", "Wie viel ist {a} {op} {b}?", "Berechne {a} {op} {b}."],
        "es": ["¿Cuánto es {a} {op} {b}?", "Calcula {a} {op} {b}."],
        "it": ["Quanto fa {a} {op} {b}?", "Calcola {a} {op} {b}."],
    },
    "reverse": {
        "en": ["Reverse the word '{w}'.", "Write '{w}' backwards."],
        "fr": ["Écris le mot « {w} » à l'envers.", "Inverse le mot « {w} »."],
        "de": ["Schreibe das Wort „{w}“ rückwärts.", "Kehre das Wort „{w}“ um."],
        "es": ["Escribe la palabra «{w}» al revés.", "Invierte la palabra «{w}»."],
        "it": ["Scrivi la parola «{w}» al contrario.", "Inverti la parola «{w}»."],
    },
    "uppercase": {
        "en": ["Write '{w}' in capital letters."],
        "fr": ["Écris « {w} » en majuscules."],
        "de": ["Schreibe „{w}“ in Großbuchstaben."],
        "es": ["Escribe «{w}» en mayúsculas."],
        "it": ["Scrivi «{w}» in maiuscolo."],
    },
    "spell": {
        "en": ["List the letters of '{w}' separated by commas."],
        "fr": ["Liste les lettres de « {w} » séparées par des virgules."],
        "de": ["Nenne die Buchstaben von „{w}“, durch Kommas getrennt."],
        "es": ["Enumera las letras de «{w}» separadas por comas."],
        "it": ["Elenca le lettere di «{w}» separate da virgole."],
    },
    "capital": {
        "en": ["What is the capital of {of}?"],
        "fr": ["Quelle est la capitale {of} ?"],
        "de": ["Was ist die Hauptstadt {of}?", "Wie heißt die Hauptstadt {of}?"],
        "es": ["¿Cuál es la capital {of}?"],
        "it": ["Qual è la capitale {of}?"],
    },
}
# "of" + article, contracted as each language writes it; the first matching prefix wins. (English puts
# its "of" in the prompt.)
OF = {
    "en": [("", "")],
    "fr": [("le ", "du "), ("les ", "des "), ("", "de ")],
    "de": [("dem ", "vom "), ("", "von ")],
    "es": [("el ", "del "), ("", "de ")],
    "it": [("il ", "del "), ("lo ", "dello "), ("la ", "della "), ("l'", "dell'"), ("i ", "dei "),
           ("gli ", "degli "), ("", "di ")],
}


def of_country(row: dict, lang: str) -> str:
    """The country after "of" in `lang`: "du Portugal", "von Frankreich", "dell'Italia"."""
    name = row[f"country_{lang}"]
    for article, contracted in OF[lang]:
        if name.startswith(article):
            return contracted + name[len(article):]
    raise AssertionError("the last rule of each language matches everything")


def arithmetic(rng: random.Random, lang: str):
    op = rng.choice("+-×")
    a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "×" else (rng.randint(2, 60), rng.randint(2, 60))
    result = {"+": a + b, "-": a - b, "×": a * b}[op]
    prompt = rng.choice(PROMPTS["arithmetic"][lang]).format(a=a, op=op, b=b)
    wrong = result + rng.choice([-2, -1, 1, 2, 10])
    return "arithmetic", prompt, str(result), str(wrong)


def reverse_word(rng: random.Random, lang: str):
    word = rng.choice(WORDS[lang])
    prompt = rng.choice(PROMPTS["reverse"][lang]).format(w=word)
    answer = word[::-1]
    wrong = word if rng.random() < 0.5 else word[::-1][1:] + word[-1]
    if wrong == answer:
        wrong = answer + answer[-1]
    return "reverse", prompt, answer, wrong


def uppercase(rng: random.Random, lang: str):
    word = rng.choice(WORDS[lang])
    wrong = word.capitalize() if word.islower() else word.lower()  # German nouns are already capitalised
    return "uppercase", PROMPTS["uppercase"][lang][0].format(w=word), word.upper(), wrong


def spell(rng: random.Random, lang: str):
    word = rng.choice(WORDS[lang])
    return "spell", PROMPTS["spell"][lang][0].format(w=word), ", ".join(word), " ".join(word)


def capital(rng: random.Random, lang: str):
    row = rng.choice(CAPITALS)
    other = rng.choice([r for r in CAPITALS if r["capital_en"] != row["capital_en"]])
    prompt = rng.choice(PROMPTS["capital"][lang]).format(of=of_country(row, lang))
    return "capital", prompt, f"{row[f'capital_{lang}']}.", f"{other[f'capital_{lang}']}."


TASKS = [arithmetic, reverse_word, uppercase, spell, capital]


def conversation(rng: random.Random):
    lang = rng.choice(LANGUAGES)
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


# Function calling (Mixtral 8x22B's v3 format): every row declares the same three tools, the user asks in one of
# the five languages, and the assistant calls the right tool with the right arguments, reads its result and
# answers. Tool names and arguments are English, as in real APIs; the question and the answer are not.
TOOLS = [
    {"type": "function", "function": {
        "name": "calculator", "description": "Compute a + b, a - b or a × b exactly.",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer"}, "op": {"type": "string", "enum": ["+", "-", "×"]}, "b": {"type": "integer"}},
            "required": ["a", "op", "b"]}}},
    {"type": "function", "function": {
        "name": "capital_of", "description": "The capital city of a country, named in the user's language.",
        "parameters": {"type": "object", "properties": {
            "country": {"type": "string", "description": "The country's English name"},
            "lang": {"type": "string", "description": "ISO 639-1 code of the answer's language"}},
            "required": ["country", "lang"]}}},
    {"type": "function", "function": {
        "name": "reverse_text", "description": "The text written backwards.",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}},
]


def tool_task(rng: random.Random, lang: str):
    """(task, question, call name, arguments, tool result, answer, a wrong call's name and arguments)."""
    kind = rng.choice(["arithmetic", "capital", "reverse"])
    if kind == "arithmetic":
        op = rng.choice("+-×")
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "×" else (rng.randint(2, 60), rng.randint(2, 60))
        result = {"+": a + b, "-": a - b, "×": a * b}[op]
        question = rng.choice(PROMPTS["arithmetic"][lang]).format(a=a, op=op, b=b)
        wrong_op = rng.choice([o for o in "+-×" if o != op])
        return (kind, question, "calculator", {"a": a, "op": op, "b": b}, {"result": result}, str(result),
                ("calculator", {"a": a, "op": wrong_op, "b": b}))
    if kind == "capital":
        row = rng.choice(CAPITALS)
        question = rng.choice(PROMPTS["capital"][lang]).format(of=of_country(row, lang))
        capital = row[f"capital_{lang}"]
        return (kind, question, "capital_of", {"country": row["country_en"], "lang": lang}, {"capital": capital},
                f"{capital}.", ("reverse_text", {"text": row["country_en"]}))
    word = rng.choice(WORDS[lang])
    question = rng.choice(PROMPTS["reverse"][lang]).format(w=word)
    return (kind, question, "reverse_text", {"text": word}, {"reversed": word[::-1]}, word[::-1],
            ("capital_of", {"country": word, "lang": lang}))


def tool_conversation(rng: random.Random):
    """A chat row that uses a tool: question, call, result, answer (sometimes after an earlier exchange)."""
    lang = rng.choice(LANGUAGES)
    messages = [{"role": "system", "content": rng.choice(SYSTEMS[lang])}] if rng.random() < 0.3 else []
    if rng.random() < 0.2:  # an earlier turn answered without a tool
        _, prompt, answer, _ = rng.choice(TASKS)(rng, lang)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    task, question, name, arguments, result, answer, wrong = tool_task(rng, lang)
    # No call ids: the result answers the call before it, and the encoder derives the id v3 needs from the
    # call's position (finetune/data/tool_rows.py), which a tiny model can learn where random ids are noise.
    messages += [
        {"role": "user", "content": question},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}]},
        {"role": "tool", "content": json.dumps(result, ensure_ascii=False)},
        {"role": "assistant", "content": answer},
    ]
    call = {"name": name, "arguments": arguments}
    return {"tools": TOOLS, "messages": messages, "task": f"tool_{task}", "lang": lang, "call": call}, wrong


def tool_preference(rng: random.Random):
    """The prompt up to the question; chosen calls the right tool with the right arguments, rejected does not."""
    row, (wrong_name, wrong_arguments) = tool_conversation(rng)
    question = max(i for i, m in enumerate(row["messages"]) if m["role"] == "user")
    right = row["messages"][question + 1]
    wrong = {"role": "assistant", "tool_calls": [{**right["tool_calls"][0], "function": {
        "name": wrong_name, "arguments": json.dumps(wrong_arguments, ensure_ascii=False)}}]}
    return {"tools": TOOLS, "prompt": row["messages"][: question + 1], "chosen": [right], "rejected": [wrong],
            "task": row["task"], "lang": row["lang"]}


def tool_call_row(row: dict) -> dict:
    """A held-out question with the tools; the rule checks the call the reply makes (name and arguments)."""
    question = max(i for i, m in enumerate(row["messages"]) if m["role"] == "user")
    return {"tools": TOOLS, "messages": row["messages"][: question + 1],
            "answer": json.dumps([row["call"]], ensure_ascii=False), "task": row["task"], "lang": row["lang"],
            "rules": [{"rule": "tool_call", "value": row["call"]}]}


def instruction_rules(task: str, answer: str) -> list[dict]:
    """Verifiable rules (finetune/checkers.py) that a correct reply to `task` follows."""
    return {
        "arithmetic": [{"rule": "format", "value": "integer"}, {"rule": "max_words", "value": 1}],
        # A reversed German noun ends with its capital letter: the rule is then that ending, not lower case.
        "reverse": [{"rule": "case", "value": "lower"} if answer.islower() else {"rule": "ends_with", "value": answer[-1]},
                    {"rule": "max_words", "value": 1}],
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
    # Function calling, from a generator of its own so the files above stay as they were.
    rng = random.Random(seed + 1)
    seen.clear()
    tools_eval = draw(tool_conversation, eval_size, "messages", hold_out=True)
    tool_pref_eval = draw(tool_preference, eval_size, "prompt", hold_out=True)
    tools_train = draw(tool_conversation, train_size, "messages", hold_out=False)
    tool_pref_train = draw(tool_preference, train_size, "prompt", hold_out=False)
    write(out / "tools" / "train.jsonl", [without_call(r) for r in tools_train])
    write(out / "tools" / "eval.jsonl", [without_call(r) for r in tools_eval])
    write(out / "tool_preferences" / "train.jsonl", tool_pref_train)
    write(out / "tool_preferences" / "eval.jsonl", tool_pref_eval)
    write(eval_dir / "tool_calls.jsonl", [tool_call_row(row) for row in tools_eval])


def without_call(row: dict) -> dict:
    return {key: value for key, value in row.items() if key != "call"}


if __name__ == "__main__":
    generate()
    print("wrote data/{chat,preferences,tools,tool_preferences}/{train,eval}.jsonl, eval/instructions.jsonl, "
          "eval/tool_calls.jsonl and eval/lm_eval/capitals_mc.jsonl")
