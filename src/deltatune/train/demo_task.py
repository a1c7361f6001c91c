"""The bundled demo task: turn a sentence about a person into a fixed JSON record.

Chosen because a small instruct model is poor at it out of the box (it answers in prose, renames keys, reorders
them or changes the formatting — exact match near 0 %) while a LoRA learns the schema in a few dozen steps.
The data is generated from a fixed seed; `demo_data/{train,eval}.jsonl` are the committed output of
`write_demo_data` (a test checks they still match), in the chat format (`{"messages": [...]}`).
Eval rows use people, and a share of sentence templates, that never occur in training.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).parent / "demo_data"
INSTRUCTION = "Extract the person's name, age, city and job from the sentence as JSON."

FIRST = ["Maria", "Tom", "Aisha", "Kenji", "Lena", "Omar", "Sofia", "Lucas", "Priya", "Jonas", "Chloe", "Mateo",
         "Amara", "Felix", "Yara", "Daniel", "Ingrid", "Tariq", "Elena", "Hugo", "Nadia", "Pavel", "Rosa", "Samuel",
         "Mei", "Victor", "Zanele", "Oliver", "Leila", "Marco", "Anya", "Kwame", "Clara", "Diego", "Hana", "Ivan"]
LAST = ["Lopez", "Becker", "Khan", "Tanaka", "Novak", "Haddad", "Rossi", "Silva", "Patel", "Berg", "Martin",
        "Garcia", "Okafor", "Wagner", "Nasser", "Cohen", "Larsen", "Aziz", "Petrova", "Dubois", "Sato", "Kowalski",
        "Moreau", "Mensah", "Weber", "Fischer", "Ibrahim", "Costa", "Jensen", "Kim", "Nguyen", "Schmidt"]
CITIES = ["Lisbon", "Berlin", "Nairobi", "Osaka", "Prague", "Beirut", "Milan", "Porto", "Mumbai", "Oslo", "Lyon",
          "Seville", "Lagos", "Vienna", "Cairo", "Haifa", "Bergen", "Dubai", "Sofia", "Quebec", "Kyoto", "Krakow",
          "Toulouse", "Accra", "Munich", "Hamburg", "Tunis", "Recife", "Aarhus", "Busan", "Hanoi", "Leipzig"]
JOBS = ["nurse", "engineer", "teacher", "baker", "pilot", "architect", "chemist", "lawyer", "plumber", "journalist",
        "farmer", "dentist", "librarian", "carpenter", "translator", "accountant", "photographer", "electrician",
        "pharmacist", "gardener", "mechanic", "designer", "surgeon", "economist"]
TEMPLATES = [
    "{name}, a {age}-year-old {job} from {city}, just adopted a cat.",
    "After years in {city}, the {job} {name} ({age}) opened a small studio.",
    "{name} is {age}, works as a {job}, and lives in {city}.",
    "Born {age} years ago, {name} now works as a {job} in {city}.",
    "In {city}, {age}-year-old {job} {name} won a local award last week.",
    "Our new neighbour {name} ({age}) is a {job} who moved here from {city}.",
    "The {job} {name}, aged {age}, commutes every day through {city}.",
    "{name} has been a {job} in {city} since turning {start}; today {pronoun} is {age}.",
    "Meet {name}: {age} years old, {job} by trade, {city} by choice.",
    "At {age}, {name} left a desk job to become a {job} in {city}.",
]
HELD_OUT_TEMPLATES = [
    "Yesterday a {job} called {name} celebrated turning {age} in {city}.",
    "{city} welcomed {name}, the {age}-year-old {job}, to its council.",
]


def _record(rng: random.Random, people: list[tuple[str, str]], templates: list[str]) -> dict:
    first, last = rng.choice(people)
    fields = {"name": f"{first} {last}", "age": rng.randint(21, 78), "city": rng.choice(CITIES),
              "job": rng.choice(JOBS)}
    sentence = rng.choice(templates).format(
        name=fields["name"], age=fields["age"], city=fields["city"], job=fields["job"], start=fields["age"] - 10,
        pronoun=rng.choice(["she", "he", "they"])).replace("they is", "they are")
    answer = json.dumps(fields)
    return {"messages": [{"role": "user", "content": f"{INSTRUCTION}\nSentence: {sentence}"},
                         {"role": "assistant", "content": answer}]}


def make_demo_data(seed: int = 0, n_train: int = 400, n_eval: int = 50) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    people = [(f, s) for f in FIRST for s in LAST]
    rng.shuffle(people)
    eval_people, train_people = people[:150], people[150:]
    train = [_record(rng, train_people, TEMPLATES) for _ in range(n_train)]
    evals = [_record(rng, eval_people, TEMPLATES + HELD_OUT_TEMPLATES) for _ in range(n_eval)]
    return train, evals


def write_demo_data(directory: Path = DATA_DIR) -> None:
    train, evals = make_demo_data()
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("eval", evals)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    write_demo_data()
