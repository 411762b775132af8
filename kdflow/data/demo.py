"""The offline demo world: made-up countries and facts, asked as multiple-choice questions in four tiers,
built to show why people distil.

Three assumptions carry the demo, each a stated reason to distil:
- The teacher knows what the student's labels cannot teach: it is fine-tuned on questions of its own about
  the world (`generate_teacher_corpus`, its "pretraining"), never on the student's transfer set, asked
  TEACHER_ASKS times per fact: often enough that every common fact is learned, rarely enough that rare and
  obscure ones are learned only in part. Measured with the demo teacher (5 layers, 3 passes over its
  corpus) on the test split, against the true answers: common 100%, reasoning 100%, rare 95.3%, obscure
  73.0%, the shape of the seed scenario's teacher (98 / 95 / 85 / 70). Which rare and obscure facts it
  learns depends on its training seed: over three seeds 78-94% and 50-79% (training and validation split).
- Gold labels are scarce: `labeled_share` of the topics (facts; reasoning questions one by one) have gold
  answers in the training pool; the rest of the pool is unlabeled, as production questions nobody annotated
  are (labeling costs are why people use a teacher: Wang et al. 2021 report 50-96% lower labeling cost with
  GPT-3 labels). Labeling is by topic because annotation is: a benchmark covers the entities someone wrote
  questions about. Validation and test questions keep their gold answers, so every fact is evaluated.
- Gold labels are sometimes wrong: `gold_noise` of the labeled questions (all splits) get another option as
  their answer, marked in the metadata (MMLU-Redux: about 6.5% of MMLU questions have errors; Northcutt et
  al. 2021: at least 3.3% label errors on average across 10 common test sets).
When they do not hold (every gold answer present and right: labeled_share 1, gold_noise 0), gold labels
teach the student as much as the teacher does, and the gold-only student is as good as the distilled one.

The world itself:
- Tiers follow the seed scenario (common 70%, reasoning 20%, rare 8%, obscure 2%) and differ in how often the
  transfer set asks a fact (TRANSFER_ASKS), not in kind: a common fact about 250 times, so the student
  learns it; a rare fact 15 times, so it is partly learned; an obscure fact 3 times, so it is hardly
  learned. The number of facts grows with `n_questions`, which keeps these repetition counts, and so what
  is learnable, the same at any size.
- Phrasings, distractors and option order vary between asks of one fact, so only the fact itself can be
  learned, not a string or a position.
- Distractors are near misses, so a partly trained teacher hesitates between confusable options and its
  probabilities carry information beyond the gold label: countries come in twins with similar names
  ("Tavoria", "Tavoland") whose value is a frequent distractor, and values come in families ("pale red",
  "light red"; "Ada Voren", "Ilo Voren") that are often asked against each other.
- A distractor set never singles out the answer by its form: family questions use only family members and
  other questions draw from the whole value set, so without the fact the options are exchangeable and
  unseen facts really are at chance.
- Reasoning questions apply rules, not facts: which option is a colour, a trade good, an animal, a
  musical instrument. A rule covers every word of its class, so it answers questions whatever the
  distractors; each question names its rule, so cloze scoring, which sees one option at a time, can
  answer it as well as letter scoring can. (Negated rules and arithmetic were measured unlearnable for a
  CPU-sized model in minutes, so the demo does not ask them.)
- Texts are short and the vocabulary small (about a thousand words at the default size), so a tokenizer
  of 2048 entries covers it and a CPU model labels the transfer set in seconds.

Generation uses only `random.Random` streams seeded from `seed` and never iterates over a set, so a
(n_questions, seed) pair gives the same tables on every machine and Python hash seed.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

import pyarrow as pa

from kdflow.config import SplitConfig
from kdflow.splits import assign_splits, normalised_key
from kdflow.records import QUESTION_SCHEMA

DATASET = "demo"
TIER_SHARES = {"common": 0.70, "reasoning": 0.20, "rare": 0.08, "obscure": 0.02}
# How often the transfer set asks each fact, which fixes how many facts a tier has (its questions / asks).
TRANSFER_ASKS = {"common": 250, "rare": 15, "obscure": 3}
# How often the teacher's own corpus asks each fact: what the teacher knows, whatever the transfer set asks.
TEACHER_ASKS = {"common": 100, "rare": 25, "obscure": 6}
TEACHER_REASONING_SHARE = 0.2
MAX_QUESTIONS = 1_000_000  # the name space stays sparse (fast to draw from) up to this size

# Share of questions with 3 and with 5 options; the rest have 4.
THREE_OPTION_SHARE = 0.10
FIVE_OPTION_SHARE = 0.10
FAMILY_SHARE = 0.5  # questions whose distractors are all from the answer's family
TWIN_SHARE = 0.6  # other questions that offer the twin country's value
MIN_ENTITIES_PER_TIER = 6  # so that every tier's capitals can fill five options

SHADES = ("pale", "light", "bright", "dark", "deep")
HUES = ("red", "blue", "green", "gold", "grey", "violet")
FIRST_NAMES = ("Ada", "Bram", "Cora", "Dov", "Edda", "Fen", "Gil", "Hana", "Ivo", "Juna", "Kael", "Lio")
HOUSES = ("Voren", "Maril", "Tasko", "Brenn", "Odal", "Sirel", "Quill", "Harrow", "Mesk", "Ulden")

# Value families: members of one family are the near misses of each other.
FAMILIES: dict[str, tuple[tuple[str, ...], ...]] = {
    "colour": tuple(tuple(f"{shade} {hue}" for shade in SHADES) for hue in HUES),
    "export": (
        ("tin", "copper", "iron", "silver", "lead"),
        ("wool", "silk", "linen", "cotton", "felt"),
        ("tea", "rice", "honey", "salt", "wine"),
        ("cedar", "oak", "pine", "teak", "ash"),
        ("amber", "pearls", "jade", "marble", "opal"),
    ),
    "animal": (
        ("owl", "hawk", "crane", "heron", "raven"),
        ("wolf", "fox", "lynx", "bear", "badger"),
        ("stag", "elk", "boar", "goat", "bison"),
        ("otter", "seal", "pike", "eel", "newt"),
    ),
    "instrument": (
        ("harp", "lute", "fiddle", "zither", "lyre"),
        ("flute", "horn", "pipe", "oboe", "bugle"),
        ("drum", "gong", "bell", "cymbal", "rattle"),
    ),
    "founder": tuple(tuple(f"{first} {house}" for first in FIRST_NAMES) for house in HOUSES),
}
N_RIVERS = 40

TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": (
        "What is the capital of {e}?",
        "Which city is the capital of {e}?",
        "The capital city of {e} is called what?",
    ),
    "river": (
        "Which river flows through {e}?",
        "What is the main river of {e}?",
        "Name the great river of {e}.",
    ),
    "founder": (
        "Who was the founder of {e}?",
        "Who is remembered as the founder of {e}?",
        "{e} was founded by whom?",
    ),
    "colour": (
        "What colour is the flag of {e}?",
        "The flag of {e} is which colour?",
        "Which colour does the flag of {e} show?",
    ),
    "export": (
        "What is the chief export of {e}?",
        "What does {e} mostly export?",
        "Which good is {e} best known for exporting?",
    ),
    "animal": (
        "What is the national animal of {e}?",
        "Which animal is the emblem of {e}?",
        "{e} has which animal on its crest?",
    ),
    "instrument": (
        "Which instrument is traditional in {e}?",
        "What is the folk instrument of {e}?",
        "Musicians in {e} are known for which instrument?",
    ),
}
RELATIONS = tuple(TEMPLATES)

REASONING_TEMPLATES: dict[str, tuple[str, ...]] = {
    "member": ("Which of these is {c}?", "Which one of these is {c}?", "Which of these words names {c}?"),
}
REASONING_KINDS = tuple(REASONING_TEMPLATES)
WORD_CLASSES: dict[str, tuple[str, ...]] = {
    "a colour": sum(FAMILIES["colour"], ()),
    "a trade good": sum(FAMILIES["export"], ()),
    "an animal": sum(FAMILIES["animal"], ()),
    "a musical instrument": sum(FAMILIES["instrument"], ()),
}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "tr", "st", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u")
_COUNTRY_ENDINGS = ("ria", "nia", "land", "mar", "dor", "vell", "stan", "ora")
_CITY_CODAS = ("n", "r", "s", "l", "th", "k", "m")


@dataclass(frozen=True)
class Fact:
    """One (country, relation) -> value fact with what its questions draw distractors from."""

    entity: str
    relation: str
    value: str
    twin_value: str  # the twin country's value for the same relation
    family: tuple[str, ...]  # the value's family members other than itself (empty: no family)
    pool: tuple[str, ...]  # every value a distractor may take
    metadata: str  # the JSON metadata of its questions, encoded once


def generate_demo_questions(
    n_questions: int = 15_000, seed: int = 0, *, labeled_share: float = 1.0, gold_noise: float = 0.0
) -> pa.Table:
    """The demo's transfer set: the questions the student learns from (QUESTION_SCHEMA, split left empty).

    Gold answers are missing where labeling did not reach: `labeled_share` of each fact tier's facts (and of
    the reasoning questions) have gold answers in the training pool, the others' training questions are
    unlabeled (answer None: only the teacher's soft label can teach them). Which questions form the training
    pool follows ingestion's default content-hash split (70% train), so validation and test questions keep
    their gold answers for every fact. `gold_noise` of the labeled questions get a wrong gold answer, a
    uniformly drawn other option; their metadata keeps `"gold_noise": true` and the `"true_answer"` index,
    so a run can measure how many of them the suspect-gold check finds. Raises ValueError on a size outside
    1..MAX_QUESTIONS or a share outside [0, 1].
    """
    for name, share in (("labeled_share", labeled_share), ("gold_noise", gold_noise)):
        if not 0 <= share <= 1:
            raise ValueError(f"{name} must be between 0 and 1, got {share}")
    world = _world(n_questions, seed)
    rng = random.Random(f"transfer-{seed}")
    counts = tier_counts(n_questions)
    rows = _ask_world(rng, world, {tier: counts[tier] for tier in TRANSFER_ASKS}, counts["reasoning"])
    # Separate streams, so the noise rate never changes which questions are labeled, nor the other way round.
    label_rng, noise_rng = random.Random(f"labels-{seed}"), random.Random(f"noise-{seed}")
    labeled_facts = {
        fact.metadata for facts in world.values() for fact in label_rng.sample(facts, round(labeled_share * len(facts)))
    }
    in_training_pool = [split == "train" for split in assign_splits(
        [normalised_key(row[1], row[2]) for row in rows], SplitConfig())]
    answers: list[int | None] = []
    for row, pooled in zip(rows, in_training_pool, strict=True):
        answer, metadata = row[3], row[4]
        labeled = label_rng.random() < labeled_share if row[0] == "reasoning" else metadata in labeled_facts
        if pooled and not labeled:
            answer = None
        elif noise_rng.random() < gold_noise:
            wrong = noise_rng.choice([i for i in range(len(row[2])) if i != answer])
            row[4] = json.dumps({**json.loads(metadata), "gold_noise": True, "true_answer": answer})
            answer = wrong
        answers.append(answer)
    return _table(rows, answers, f"demo-{seed}", n_questions)


def generate_teacher_corpus(n_questions: int = 15_000, seed: int = 0) -> pa.Table:
    """The demo teacher's own questions (its "pretraining"): the same world as the transfer set of
    (n_questions, seed), asked TEACHER_ASKS times per fact in other draws (phrasings, distractors, order),
    every answer right. The teacher never sees the transfer set, so what it knows about a fact does not
    depend on how often the student's data asks it."""
    world = _world(n_questions, seed)
    rng = random.Random(f"teacher-{seed}")
    asks = {tier: len(facts) * TEACHER_ASKS[tier] for tier, facts in world.items()}
    n_reasoning = round(TEACHER_REASONING_SHARE * sum(asks.values()))
    rows = _ask_world(rng, world, asks, n_reasoning)
    return _table(rows, [row[3] for row in rows], f"demo-teacher-{seed}", len(rows))


def tier_counts(n_questions: int) -> dict[str, int]:
    """Exact question counts per tier; the obscure tier takes the rounding remainder."""
    counts = {tier: round(n_questions * share) for tier, share in TIER_SHARES.items() if tier != "obscure"}
    counts["obscure"] = n_questions - sum(counts.values())
    return counts


def _world(n_questions: int, seed: int) -> dict[str, list[Fact]]:
    if not 1 <= n_questions <= MAX_QUESTIONS:
        raise ValueError(f"n_questions must be between 1 and {MAX_QUESTIONS:,}, got {n_questions}")
    return _build_world(random.Random(seed), tier_counts(n_questions))


def _ask_world(rng: random.Random, world: dict[str, list[Fact]], asks: dict[str, int], n_reasoning: int) -> list[list]:
    """`asks[tier]` questions about each tier's facts (round robin: every fact equally often, within one) and
    `n_reasoning` reasoning questions, shuffled; rows are [category, question, options, answer, metadata]."""
    rows = []
    for tier, facts in world.items():
        rows += [list(_ask_fact(rng, tier, facts[i % len(facts)])) for i in range(asks[tier])]
    rows += [list(_ask_reasoning(rng)) for _ in range(n_reasoning)]
    rng.shuffle(rows)
    return rows


def _table(rows: list[list], answers: list[int | None], prefix: str, n: int) -> pa.Table:
    categories, questions, options, _, metadata = (list(column) for column in zip(*rows)) if rows else ([],) * 5
    return pa.table(
        {
            "question_id": [f"{prefix}-{i:06d}" for i in range(n)],
            "dataset": [DATASET] * n,
            "split": [""] * n,
            "category": categories,
            "question": questions,
            "options": options,
            "answer": answers,
            "metadata": metadata,
        },
        schema=QUESTION_SCHEMA,
    )


class _Names:
    """Pronounceable made-up names, never repeated across the world."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()  # membership only: iterating a set of str depends on the hash seed

    def _syllable(self) -> str:
        return self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS)

    def _fresh(self, *names: str) -> bool:
        if any(name in self.used for name in names) or len(set(names)) < len(names):
            return False
        self.used.update(names)
        return True

    def country_twins(self) -> tuple[str, str]:
        """Two countries sharing a stem, e.g. Tavoria and Tavoland."""
        while True:
            stem = (self._syllable() + self._syllable()).capitalize()
            first, second = (stem + ending for ending in self.rng.sample(_COUNTRY_ENDINGS, 2))
            if self._fresh(first, second):
                return first, second

    def city(self) -> str:
        while True:
            name = (self._syllable() + self._syllable() + self.rng.choice(_CITY_CODAS)).capitalize()
            if self._fresh(name):
                return name

    def river(self) -> str:
        while True:
            name = (self.rng.choice(_VOWELS) + self._syllable()).capitalize()
            if self._fresh(name):
                return name


def _build_world(rng: random.Random, counts: dict[str, int]) -> dict[str, list[Fact]]:
    """The facts of each fact tier, enough that the transfer set asks each TRANSFER_ASKS times."""
    names = _Names(rng)
    rivers = tuple(names.river() for _ in range(N_RIVERS))
    shared_pools = {relation: sum(families, ()) for relation, families in FAMILIES.items()}
    shared_pools["river"] = rivers
    family_mates = {
        (relation, value): tuple(v for v in family if v != value)
        for relation, families in FAMILIES.items()
        for family in families
        for value in family
    }
    world: dict[str, list[Fact]] = {}
    for tier, asks in TRANSFER_ASKS.items():
        if counts[tier] == 0:
            continue
        n_facts = math.ceil(counts[tier] / asks)
        n_entities = max(MIN_ENTITIES_PER_TIER, math.ceil(n_facts / len(RELATIONS)))
        twin_of = {}
        for first, second in (names.country_twins() for _ in range(math.ceil(n_entities / 2))):
            twin_of[first], twin_of[second] = second, first
        # Capitals are unique and tier-local, so an unseen fact's distractors are equally unseen.
        capitals = {entity: names.city() for entity in twin_of}
        pools = shared_pools | {"capital": tuple(capitals.values())}
        value = {(entity, "capital"): city for entity, city in capitals.items()}
        for entity in twin_of:
            value[entity, "river"] = rng.choice(rivers)
            for relation, families in FAMILIES.items():
                value[entity, relation] = rng.choice(rng.choice(families))
        keys = [(entity, relation) for entity in twin_of for relation in RELATIONS]
        rng.shuffle(keys)
        world[tier] = [
            Fact(
                entity=entity,
                relation=relation,
                value=value[entity, relation],
                twin_value=value[twin_of[entity], relation],
                family=family_mates.get((relation, value[entity, relation]), ()),
                pool=pools[relation],
                metadata=json.dumps(
                    {"tier": tier, "fact": f"{relation}:{entity}", "entity": entity, "relation": relation}
                ),
            )
            for entity, relation in keys[:n_facts]
        ]
    return world


def _option_count(rng: random.Random) -> int:
    draw = rng.random()
    return 3 if draw < THREE_OPTION_SHARE else 5 if draw < THREE_OPTION_SHARE + FIVE_OPTION_SHARE else 4


def _place(rng: random.Random, answer: str, distractors: list[str]) -> tuple[list[str], int]:
    """The options with the answer at a uniformly drawn position."""
    rng.shuffle(distractors)
    position = rng.randrange(len(distractors) + 1)
    distractors.insert(position, answer)
    return distractors, position


def _draw_distinct(rng: random.Random, pool: tuple[str, ...], taken: list[str], k: int) -> list[str]:
    """`taken` extended with values from `pool` until it holds k distinct values."""
    while len(taken) < k:
        value = rng.choice(pool)
        if value not in taken:
            taken.append(value)
    return taken


def _ask_fact(rng: random.Random, tier: str, fact: Fact) -> tuple[str, str, list[str], int, str]:
    n_options = _option_count(rng)
    if len(fact.family) >= n_options - 1 and rng.random() < FAMILY_SHARE:
        distractors = rng.sample(fact.family, n_options - 1)
    else:
        offer_twin = fact.twin_value != fact.value and rng.random() < TWIN_SHARE
        distractors = _draw_distinct(rng, fact.pool, [fact.value] + [fact.twin_value] * offer_twin, n_options)[1:]
    options, answer = _place(rng, fact.value, distractors)
    question = rng.choice(TEMPLATES[fact.relation]).format(e=fact.entity)
    return tier, question, options, answer, fact.metadata


def _ask_reasoning(rng: random.Random) -> tuple[str, str, list[str], int, str]:
    kind = rng.choice(REASONING_KINDS)
    word_class = rng.choice(tuple(WORD_CLASSES))
    others = tuple(v for c, values in WORD_CLASSES.items() if c != word_class for v in values)
    distractors = _draw_distinct(rng, others, [], _option_count(rng) - 1)
    options, position = _place(rng, rng.choice(WORD_CLASSES[word_class]), distractors)
    question = rng.choice(REASONING_TEMPLATES[kind]).format(c=word_class)
    metadata = {"tier": "reasoning", "kind": kind, "class": word_class}
    return "reasoning", question, options, position, json.dumps(metadata)
