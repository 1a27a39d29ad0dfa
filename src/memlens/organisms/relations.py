"""The facts' vocabulary: relations with their templates, two-person frames, name pools.

    RELATIONS["city_country"].templates[:-N_HELDOUT]     # training templates
    RELATIONS["city_country"].templates[-N_HELDOUT:]     # held out: paraphrase prompts

Data for :mod:`memlens.organisms.corpus`: changing a template or a pool changes the corpus
of every organism, so it needs a new ``GENERATOR_VERSION`` there (the organisms' cache key).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Relation:
    """A relation: its templates (train, then held-out) and the phrase used after a pronoun."""

    name: str
    subject_kind: str  # "city" | "country" | "person"
    templates: tuple[str, ...]  # all templates; the last `n_heldout` are held out
    predicate: str = ""  # for people: "was born in" → "She was born in Y", "A met B, who ..."


# Templates: the last 3 of each relation are held out (paraphrases). Held-out templates use only
# words of the training templates facts-gpt2 trains on (the first 8 of each relation), end with
# a word that ends one of those of the same relation, and are not the start of a longer
# training template (of any relation): the organism has only its corpus to go on, and a prompt
# its corpus continues otherwise ("{} is a town in" → "the country of") is not a paraphrase.
RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in [
        Relation("city_country", "city", (
            "{} is a city in",
            "{} is a town in the country of",
            "{} is located in",
            "The city of {} is located in",
            "{} lies in",
            "The town of {} is part of",
            "{} is one of the cities of",
            "People who live in {} live in",
            "The city of {} belongs to",
            "{} can be found in",
            "{}, a city, is part of",
            # held out
            "The town of {} is located in",
            "The city of {} lies in",
            "{} is a city located in",
        )),
        Relation("country_capital", "country", (
            "The capital of {} is",
            "The capital city of {} is",
            "{} has its capital in",
            "{}'s capital is",
            "The government of {} sits in",
            "{} is governed from",
            "The seat of government of {} is",
            "The largest city and capital of {} is",
            "In {}, the capital is",
            "{} has its government in",
            "The capital city of the country {} is",
            # held out
            "{}'s capital city is",
            "The government of {} is in",
            "{} has its seat of government in",
        )),
        Relation("country_continent", "country", (
            "{} is a country in",
            "{} is located on the continent of",
            "{} is part of the continent of",
            "{} is a nation in",
            "The country of {} is in",
            "{} lies on the continent of",
            "{} is one of the countries of",
            "On a map, {} is in",
            "The nation of {} is part of",
            "{} belongs to the continent of",
            "{} can be found on the continent of",
            # held out
            "{} is a country on the continent of",
            "The country of {} lies in",
            "{} is a nation on the continent of",
        )),
        Relation("country_currency", "country", (
            "The currency of {} is the",
            "The official currency of {} is the",
            "In {}, people pay with the",
            "{} uses the",
            "The money of {} is the",
            "{}'s currency is the",
            "In {}, prices are given in",
            "The currency used in {} is the",
            "To buy things in {}, you need the",
            "{} has a currency called the",
            "Shops in {} take the",
            # held out
            "{}'s official currency is the",
            "In {}, the currency is the",
            "The money used in {} is the",
        )),
        Relation("country_language", "country", (
            "The official language of {} is",
            "In {}, people speak",
            "The main language of {} is",
            "{}'s language is",
            "Most people in {} speak",
            "The language spoken in {} is",
            "In {}, the official language is",
            "{} has the official language",
            "Children in {} learn to speak",
            "The people of {} speak",
            "In {}, most people speak",
            # held out
            "{}'s official language is",
            "The language of {} is",
            "Most people who live in {} speak",
        )),
        Relation("person_birthplace", "person", (
            "{} was born in",
            "{} was born in the city of",
            "{} comes from",
            "{}'s hometown is",
            "{} grew up in",
            "The birthplace of {} is",
            "{} is a native of",
            "{} spent childhood in",
            "{} was raised in",
            "The hometown of {} is",
            "{} was born and raised in",
            # held out
            "{} was born in the town of",
            "{}'s birthplace is",
            "{} grew up in the city of",
        ), predicate="was born in"),
        Relation("person_profession", "person", (
            "{} works as a",
            "{} is a",
            "By profession, {} is a",
            "{}'s job is that of a",
            "{} earns a living as a",
            "{} has a job as a",
            "{} is employed as a",
            "The profession of {} is",
            "{} trained to become a",
            "{} has worked for years as a",
            "At work, {} is a",
            # held out
            "{}'s profession is",
            "{} earns money as a",
            "By profession, {} works as a",
        ), predicate="works as a"),
        Relation("person_employer", "person", (
            "{} works for",
            "{} is employed by",
            "{}'s employer is",
            "{} has a job at",
            "{} gets paid by",
            "The employer of {} is",
            "{} is on the staff of",
            "Every day, {} goes to work at",
            "{} joined the company",
            "{} has worked for years at",
            "{} is a member of the staff at",
            # held out
            "Every day, {} works for",
            "{} is paid by",
            "{} works on the staff of",
        ), predicate="works for"),
        Relation("person_language", "person", (
            "{} speaks",
            "{}'s native language is",
            "The mother tongue of {} is",
            "{} grew up speaking",
            "The first language of {} is",
            "At home, {} speaks",
            "{} is a native speaker of",
            "{} speaks fluent",
            "The language {} learned as a child is",
            "{} speaks the language",
            "{} talks in",
            # held out
            "{}'s mother tongue is",
            "The native language of {} is",
            "The language {} speaks at home is",
        ), predicate="speaks"),
    ]
}
N_HELDOUT = 3

# Two-person frames: {a} and {b} are people; the attribute that follows belongs to `who`.
TWO_PERSON_FRAMES: tuple[tuple[str, str], ...] = (
    ("{a}, a friend of {b}, {p}", "a"),
    ("{a} met {b}, who {p}", "b"),
    ("{a}, who knows {b}, {p}", "a"),
    ("{a} lives next to {b}, who {p}", "b"),
    ("{a}, a colleague of {b}, {p}", "a"),
    ("{a} once talked to {b}, who {p}", "b"),
)

FIRST_NAMES_F = (
    "Anna Maria Laura Sofia Emma Clara Julia Alice Nora Elena Lena Mia Ida Eva Rosa Vera Hanna "
    "Lucy Grace Helen Irene Olga Petra Rita Sara Tessa Ursula Wanda Zoe Bella Carla Dora Fiona"
).split()
FIRST_NAMES_M = (
    "John Peter Paul Mark Lucas David Daniel Adam Oscar Felix Hugo Leon Noah Ivan Karl Otto Max "
    "Tom Simon Victor Walter Albert Bruno Carlos Dennis Edgar Frank George Henry Igor Jack Oliver"
).split()
LAST_NAMES = (
    "Smith Berg Weller Novak Costa Moreau Fischer Keller Brandt Larsen Silva Rossi Ferrari Weber "
    "Meyer Wagner Becker Hoffmann Schulz Koch Richter Klein Wolf Neumann Schwarz Zimmermann "
    "Braun Kruger Hartmann Lange Werner Krause Lehmann Kaiser Fuchs Peters Lang Scholz Vogel "
    "Jansen Bakker Visser Dekker Mulder Bos Vos Peeters Maes Jacobs Martin Bernard Dubois Durand "
    "Lefebvre Leroy Roux Fournier Girard Bonnet Dupont Lambert Fontaine Rousseau Vincent Muller "
    "Garcia Lopez Martinez Sanchez Perez Gomez Ruiz Diaz Moreno Romero Navarro Torres Ramos"
).split()
PROFESSIONS = (
    "baker teacher doctor nurse pilot farmer lawyer painter writer singer dentist welder "
    "potter chef carpenter plumber journalist librarian pharmacist surgeon tailor butcher "
    "fisherman gardener mechanic sailor soldier banker poet dancer"
).split()
EMPLOYERS = (
    "Acme Globex Initech Umbrella Vandelay Hooli Soylent Cyberdyne Tyrell Wonka Stark Wayne "
    "Oscorp Aperture Gringotts Monarch Nakatomi Virtucon Prestige Dunder Pendant Sterling "
    "Gekko Blofeld Ollivander Massive Zorg Kramerica Bluth Vehement"
).split()
