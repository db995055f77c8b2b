"""Synthetic multi-document question answering corpus (seeded, repeatable).

Each document tells 3-5 facts about one invented entity, every fact naming
the entity ("Zorblat lives in Quenmar ."). A question asks for one fact of
one entity; exactly one document answers it; the others are distractors.
Entity names and values are single tokens of a closed invented vocabulary.
"""
import random

SYLLABLES = ["ka", "zor", "mi", "bel", "tun", "ra", "vex", "lo", "pim", "dra", "sul", "ne", "gor", "fa",
             "quen", "ti", "bro", "mak", "yel", "os", "wu", "den", "ish", "hal", "cor", "ub", "zan", "pel"]

COLORS = ["red", "blue", "green", "teal", "pink", "gold", "gray", "black", "white", "orange", "purple", "brown"]
JOBS = ["baker", "farmer", "doctor", "singer", "pilot", "teacher", "painter", "driver", "sailor", "miner",
        "tailor", "cook", "guard", "poet", "smith"]
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december"]

PREFIX = "You answer questions about the documents below ."


def _names(rng, n, syllables, lo, hi, taken):
    out = []
    while len(out) < n:
        w = "".join(rng.choice(syllables) for _ in range(rng.randint(lo, hi)))
        if w not in taken and 4 <= len(w) <= 9:
            taken.add(w)
            out.append(w)
    return out


class World:
    """The closed vocabulary: entities, cities and animals are invented."""

    def __init__(self, seed=1234, n_entities=160, n_cities=24, n_animals=20, style="varied"):
        rng = random.Random(seed)
        taken = set(COLORS + JOBS + MONTHS)
        self.entities = [w.capitalize() for w in _names(rng, n_entities, SYLLABLES, 2, 3, taken)]
        self.cities = [w.capitalize() for w in _names(rng, n_cities, SYLLABLES, 2, 3, taken)]
        self.animals = _names(rng, n_animals, SYLLABLES, 2, 2, taken)
        # relation: (fact template, question, values). "short" (the shipped
        # model) puts the entity two tokens before the value; "varied" (the
        # first model) phrases each relation its own way; "uniform" ("the
        # city of E is V .") was slower to learn even with one document
        # (models/README.md).
        self.extra_words = []
        if style == "fixed3":
            # Every fact is "E <cue> <cue> V .": the entity always three tokens
            # before the value, the relation's cue words right before it.
            self.relations = {
                "city": ("{e} lives in {v} .", "where does {e} live ?", self.cities),
                "animal": ("{e} owns a {v} .", "what animal does {e} own ?", self.animals),
                "color": ("{e} paints with {v} .", "what color does {e} paint with ?", COLORS),
                "job": ("{e} is a {v} .", "what is the job of {e} ?", JOBS),
                "month": ("{e} arrived in {v} .", "when did {e} arrive ?", MONTHS),
            }
        elif style in ("short", "pairs"):
            # Every fact is "E <cue> V .": the entity two tokens before the
            # value, right before the relation's one-word cue.
            self.relations = {
                "city": ("{e} visits {v} .", "what city does {e} visit ?", self.cities),
                "animal": ("{e} owns {v} .", "what animal does {e} own ?", self.animals),
                "color": ("{e} likes {v} .", "what color does {e} like ?", COLORS),
                "job": ("{e} became {v} .", "what did {e} become ?", JOBS),
                "month": ("{e} arrived {v} .", "when did {e} arrive ?", MONTHS),
            }
            if style == "pairs":
                # Diagnostic, not English: "E V ." (the entity right before the
                # value), keeping the "short" vocabulary (its cue words) so a
                # checkpoint of one can continue on the other.
                self.extra_words = [f.split()[1] for f, _, _ in self.relations.values()]
                self.relations = {r: ("{e} {v} .", q, vals) for r, (_, q, vals) in self.relations.items()}
        elif style == "uniform":
            self.relations = {
                "city": ("the city of {e} is {v} .", "what is the city of {e} ?", self.cities),
                "animal": ("the animal of {e} is {v} .", "what is the animal of {e} ?", self.animals),
                "color": ("the color of {e} is {v} .", "what is the color of {e} ?", COLORS),
                "job": ("the job of {e} is {v} .", "what is the job of {e} ?", JOBS),
                "month": ("the month of {e} is {v} .", "what is the month of {e} ?", MONTHS),
            }
        else:
            self.relations = {
                "city": ("{e} lives in {v} .", "where does {e} live ?", self.cities),
                "animal": ("{e} owns a {v} .", "what animal does {e} own ?", self.animals),
                "color": ("{e} likes {v} .", "what color does {e} like ?", COLORS),
                "job": ("{e} works as a {v} .", "what is the job of {e} ?", JOBS),
                "month": ("{e} was born in {v} .", "when was {e} born ?", MONTHS),
            }

    def words(self):
        """Every word the corpus can contain."""
        ws = set(PREFIX.split()) | {"question", ":", "answer"} | set(self.extra_words)
        ws |= set(self.entities) | set(self.cities) | set(self.animals) | set(COLORS) | set(JOBS) | set(MONTHS)
        for fact, q, _ in self.relations.values():
            ws |= set(fact.replace("{e}", "").replace("{v}", "").split())
            ws |= set(q.replace("{e}", "").split())
        return sorted(ws)


def make_document(world, rng, entity, n_facts=(3, 5)):
    rels = rng.sample(sorted(world.relations), rng.randint(*n_facts))
    facts = {}
    for r in rels:
        facts[r] = rng.choice(world.relations[r][2])
    text = " ".join(world.relations[r][0].format(e=entity, v=facts[r]) for r in rels)
    return text, facts


def make_example(world, rng, n_docs, n_questions=1, entity_pool=None, n_facts=(3, 5)):
    """n_docs documents about distinct entities; questions about some of them.
    Returns {"docs": [text], "qa": [(question, answer, value, doc_index)]}:
    the answer restates the fact ("Zorblat lives in Quenmar ."), so it is a
    few tokens long; `value` is the fact's object ("Quenmar")."""
    pool = entity_pool if entity_pool is not None else world.entities
    ents = rng.sample(pool, n_docs)
    docs, facts = [], []
    for e in ents:
        t, f = make_document(world, rng, e, n_facts)
        docs.append(t)
        facts.append(f)
    qa = []
    for _ in range(n_questions):
        i = rng.randrange(n_docs)
        r = rng.choice(sorted(facts[i]))
        fact, question, _ = world.relations[r]
        qa.append((question.format(e=ents[i]), fact.format(e=ents[i], v=facts[i][r]), facts[i][r], i))
    return {"docs": docs, "qa": qa}


def query_text(question):
    return f"question : {question} answer :"
