"""Extraction prompts with known answers, for structured outputs (bench/structured.py and
the integration tests): a sentence about a person; the answer is their name, age and city
as JSON under ``SCHEMA``. Built deterministically from small lists, so every field has a
ground truth and no data is downloaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

NAMES = [
    "Ada Lovelace", "Grace Hopper", "Alan Turing", "Marie Curie", "Nikola Tesla",
    "Rosalind Franklin", "Carl Sagan", "Emmy Noether", "Linus Pauling", "Barbara McClintock",
    "Niels Bohr", "Lise Meitner", "Srinivasa Ramanujan", "Katherine Johnson", "Enrico Fermi",
    "Dorothy Hodgkin", "Max Planck", "Hedy Lamarr", "Paul Dirac", "Rachel Carson",
    "Tim Berners-Lee", "Jane Goodall", "Richard Feynman", "Chien-Shiung Wu", "Edwin Hubble",
]  # fmt: skip
CITIES = [
    "London", "New York", "Paris", "Berlin", "Tokyo", "Madrid", "Rome", "Vienna", "Oslo",
    "Lisbon", "Dublin", "Prague", "Warsaw", "Boston", "Chicago", "Toronto", "Sydney",
    "Cairo", "Lima", "Seoul", "Zurich", "Athens", "Helsinki", "Denver", "Montreal",
]  # fmt: skip
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "{name} ({age}) moved to {city} last spring.",
    "Born {age} years ago, {name} now calls {city} home.",
    "Our new neighbour in {city} is {name}, who turned {age} this year.",
]
INSTRUCTION = "Extract the person's name, age and city from this text as JSON.\n\nText: "


class Person(BaseModel):
    """The answer's shape: the SDK's ``parse`` sends its JSON schema."""

    name: str
    age: int
    city: str


# as the SDK's parse sends it (strict): no properties beyond the three
SCHEMA: dict[str, Any] = {**Person.model_json_schema(), "additionalProperties": False}


@dataclass(frozen=True)
class Example:
    text: str
    truth: Person

    @property
    def prompt(self) -> str:
        return INSTRUCTION + self.text


def examples(n: int) -> list[Example]:
    """The first ``n`` examples (at most 125): every name, city and template recur."""
    out = []
    for i in range(n):
        name, city = NAMES[i % len(NAMES)], CITIES[(i * 7) % len(CITIES)]
        age = 18 + (i * 13) % 70
        text = TEMPLATES[i % len(TEMPLATES)].format(name=name, age=age, city=city)
        out.append(Example(text, Person(name=name, age=age, city=city)))
    return out


def field_accuracy(answer: Person | None, truth: Person) -> float:
    """The share of the three fields right (names and cities ignoring case and spaces)."""
    if answer is None:
        return 0.0

    def norm(s: str) -> str:
        return " ".join(s.split()).casefold()

    hits = [
        norm(answer.name) == norm(truth.name),
        answer.age == truth.age,
        norm(answer.city) == norm(truth.city),
    ]
    return sum(hits) / 3
