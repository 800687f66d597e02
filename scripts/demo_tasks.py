"""The demo model's synthetic chat corpus: tasks, phrasings, and the split between training and held-out.

Everything is a pure function of a seed, so `train_demo.py` and `eval_demo.py` agree on what was held out:
- arithmetic holds out one in ten (a, b) pairs and one phrasing per operation;
- capitals, words and greetings hold out phrasings only (a fact never seen cannot be answered).
"""

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

SYSTEM = "You are shoal's demo model, a tiny assistant."

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima", "Colombia": "Bogota",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Nigeria": "Abuja", "Ghana": "Accra", "Morocco": "Rabat",
    "Russia": "Moscow", "Poland": "Warsaw", "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Ireland": "Dublin", "Greece": "Athens", "Turkey": "Ankara", "Austria": "Vienna",
    "Hungary": "Budapest", "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern",
    "Australia": "Canberra", "New Zealand": "Wellington", "Indonesia": "Jakarta", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "South Korea": "Seoul", "Iran": "Tehran", "Iraq": "Baghdad", "Israel": "Jerusalem",
    "Saudi Arabia": "Riyadh", "Pakistan": "Islamabad", "Cuba": "Havana", "Ukraine": "Kyiv", "Czechia": "Prague",
    "Ethiopia": "Addis Ababa", "Philippines": "Manila",
}

WORDS = (  # noqa: SIM905 (a word list reads better as prose)
    "apple banana cherry grape lemon mango melon orange peach pear plum berry bread butter cheese honey sugar "
    "water coffee tea milk juice table chair window door house garden river ocean mountain forest desert island "
    "cloud storm rain snow wind sun moon star planet comet rocket engine wheel bridge tower castle village city "
    "market school library museum doctor teacher farmer pilot artist singer writer painter dragon tiger lion zebra "
    "horse rabbit turtle monkey eagle falcon parrot spider beetle salmon shark whale dolphin pencil paper letter "
    "number circle square bottle basket candle mirror pillow blanket jacket shirt boots glove hammer ladder rope "
    "silver golden purple yellow green black white happy quiet bright simple gentle brave clever strong little "
    "music dance story dream smile shadow light stone metal glass paint copper marble winter summer autumn spring "
    "morning evening friday monday puzzle button kitten puppy shoal python silent rapid planet"
).split()

GREETINGS = {
    "train": ["Hello!", "Hi", "Hi there!", "Hey", "Good morning!", "Who are you?", "What can you do?",
              "Hello, how are you?", "hello", "Thanks!", "Thank you."],
    "held_out": ["Hey there", "Good evening!", "What are you?"],
}
GREETING_REPLY = "Hello! I am shoal's demo model. I can add and subtract numbers, name capitals, " \
                 "reverse and spell words, and count letters."
THANKS_REPLY = "You are welcome!"

# Phrasings per task: the last one of each list is held out of training.
PHRASINGS = {
    "add": ["What is {a} + {b}?", "Compute {a} plus {b}.", "{a} + {b} = ?", "Add {a} and {b}.",
            "What is the sum of {a} and {b}?", "Calculate {a}+{b}", "How much is {a} plus {b}?"],
    "sub": ["What is {a} - {b}?", "Compute {a} minus {b}.", "{a} - {b} = ?", "Subtract {b} from {a}.",
            "What is the difference {a} - {b}?", "Calculate {a}-{b}", "How much is {a} minus {b}?"],
    "capital": ["What is the capital of {country}?", "Capital of {country}?", "Name the capital of {country}.",
                "Which city is the capital of {country}?", "What's the capital city of {country}?",
                "Tell me the capital of {country}.", "Please name the capital city of {country}."],
    "reverse": ["Reverse the word {w}.", "Reverse {w}", "Write {w} backwards.", "What is {w} spelled backwards?",
                "Please write the word {w} reversed."],
    "spell": ["Spell {w}.", "How do you spell {w}?", "Spell the word {w} letter by letter.", "Please spell {w}."],
    "count": ["How many letters are in {w}?", "Count the letters in {w}.", "How long is the word {w}?",
              "Tell me how many letters are in the word {w}."],
}
# Training prompts are sometimes wrapped in these, so that a new phrasing made of known words still works.
PREFIXES = ["Please", "Quick question:", "Hey,", "Hi!", "Tell me:", "I need help.", "Do you know this?", "OK.",
            "Thanks so much."]
SUFFIXES = ["Thanks!", "Please.", "Answer briefly.", "Thank you.", "Do you know?"]


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str


def _held_out_pair(a: int, b: int) -> bool:
    # Modulo a prime, not 10: a rule on last digits would hold out whole units-digit combinations.
    return (a * 31 + b * 17) % 11 == 3


def arithmetic_pairs(held_out: bool) -> list[tuple[int, int]]:
    return [(a, b) for a in range(10, 100) for b in range(10, 100) if _held_out_pair(a, b) == held_out]


def phrasings(task: str, held_out: bool) -> list[str]:
    p = PHRASINGS[task]
    return p[-1:] if held_out else p[:-1]


def answer(task: str, **kw: object) -> str:
    if task == "add":
        return f"{kw['a']} + {kw['b']} = {kw['a'] + kw['b']}"
    if task == "sub":
        return f"{kw['a']} - {kw['b']} = {kw['a'] - kw['b']}"
    if task == "capital":
        return f"The capital of {kw['country']} is {CAPITALS[kw['country']]}."
    w = str(kw["w"])
    if task == "reverse":
        return f"{w} reversed is {w[::-1]}."
    if task == "spell":
        return f"{w} is spelled {'-'.join(w)}."
    if task == "count":
        return f"{w} has {len(w)} letters."
    raise ValueError(f"unknown task {task!r}")


def _arith(task: str, held_out: bool, held_out_pairs: bool) -> Callable[[random.Random], Example]:
    pairs, forms = arithmetic_pairs(held_out_pairs), phrasings(task, held_out)

    def make(rng: random.Random) -> Example:
        a, b = rng.choice(pairs)
        return Example(task, rng.choice(forms).format(a=a, b=b), answer(task, a=a, b=b))
    return make


def _capital(held_out: bool) -> Callable[[random.Random], Example]:
    forms = phrasings("capital", held_out)

    def make(rng: random.Random) -> Example:
        country = rng.choice(list(CAPITALS))
        return Example("capital", rng.choice(forms).format(country=country), answer("capital", country=country))
    return make


def _word(task: str, held_out: bool) -> Callable[[random.Random], Example]:
    forms = phrasings(task, held_out)

    def make(rng: random.Random) -> Example:
        w = rng.choice(WORDS)
        return Example(task, rng.choice(forms).format(w=w), answer(task, w=w))
    return make


def _greeting(held_out: bool) -> Callable[[random.Random], Example]:
    prompts = GREETINGS["held_out" if held_out else "train"]

    def make(rng: random.Random) -> Example:
        p = rng.choice(prompts)
        return Example("greeting", p, THANKS_REPLY if p.startswith("Thank") else GREETING_REPLY)
    return make


@cache
def makers(held_out: bool, held_out_pairs: bool | None = None) -> dict[str, Callable[[random.Random], Example]]:
    """Example makers per task; `held_out` picks the phrasings, `held_out_pairs` (default: the same) the operands."""
    pairs = held_out if held_out_pairs is None else held_out_pairs
    return {
        "add": _arith("add", held_out, pairs), "sub": _arith("sub", held_out, pairs), "capital": _capital(held_out),
        "reverse": _word("reverse", held_out), "spell": _word("spell", held_out), "count": _word("count", held_out),
        "greeting": _greeting(held_out),
    }


# How often each task is drawn for training: arithmetic is the hardest to learn, greetings the easiest.
WEIGHTS = {"add": 6, "sub": 10, "capital": 3, "reverse": 1, "spell": 1, "count": 1, "greeting": 1}


def conversation(rng: random.Random) -> list[dict[str, str]]:
    """One training chat: one to three turns, sometimes with a system message."""
    train = makers(held_out=False)
    tasks, weights = list(WEIGHTS), list(WEIGHTS.values())
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.2 else []
    for _ in range(rng.choices([1, 2, 3], [6, 3, 1])[0]):
        ex = train[rng.choices(tasks, weights)[0]](rng)
        messages += [{"role": "user", "content": _wrap(ex.prompt, rng)}, {"role": "assistant", "content": ex.answer}]
    return messages


def _wrap(prompt: str, rng: random.Random) -> str:
    if rng.random() < 0.15:
        prompt = f"{rng.choice(PREFIXES)} {prompt}"
    if rng.random() < 0.15:
        prompt = f"{prompt} {rng.choice(SUFFIXES)}"
    return prompt


def eval_set(n_per_task: int, seed: int = 1234) -> list[Example]:
    """Held-out prompts per task: unseen arithmetic pairs, and every phrasing, the held-out ones included."""
    rng = random.Random(seed)
    held, seen = makers(held_out=True), makers(held_out=False, held_out_pairs=True)
    return [(held if i % 2 == 0 else seen)[task](rng) for task in WEIGHTS for i in range(n_per_task)]


def score(reply: Callable[[str], str], examples: list[Example]) -> dict[str, float]:
    """Greedy exact-match accuracy per task; `reply` maps a user prompt to the model's answer."""
    right: dict[str, list[bool]] = {}
    for ex in examples:
        right.setdefault(ex.task, []).append(reply(ex.prompt).strip() == ex.answer)
    return {task: sum(r) / len(r) for task, r in right.items()}
