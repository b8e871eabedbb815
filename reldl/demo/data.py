"""A deterministic synthetic corpus of product reviews, and the prompt/answer format of the demo model.

Each review is rendered from sentence templates (a seeded `random.Random`, so the same `(n, seed, split)` always gives
the same reviews) and states its product, its star rating and at most one complaint; the JSON answer is fully
determined by the text, but finding it takes more than string matching: the rating hides among other numbers
("arrived 4 days late ... 2 stars", "★★☆☆☆"), praise of one aspect sits next to the complaint about another, and
sentence order, phrasing, adjectives and filler vary.

    >>> r = reviews(1, seed=0)[0]
    >>> prompt(r.text)        # the model input
    >>> answer(r)             # ' {"product": ..., "rating": ..., "sentiment": ..., "issue": ...}\\n'
    >>> parse(answer(r)) == r.fields()

Held-out data: `reviews(n, seed, split="heldout")` draws from a different random stream than `split="train"` and uses
only (product, product-sentence template) pairs that the training split never uses.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import asdict, dataclass

__all__ = [
    "PRODUCTS",
    "ISSUES",
    "SENTIMENTS",
    "TRAIN_SEED",
    "HELDOUT_SEED",
    "Review",
    "reviews",
    "prompt",
    "answer",
    "parse",
    "sentiment_of",
    "heldout_pair",
]

TRAIN_SEED = 0
HELDOUT_SEED = 20_240_601  # never a training seed; held-out reviews also use their own template/product pairs

# name -> tags: p = plural ("these headphones are"), b = runs on a battery, e = electric (can overheat),
# w = worn or carried (no noise, no setup)
_PRODUCTS: dict[str, str] = {
    "headphones": "pb",
    "earbuds": "pb",
    "running shoes": "pw",
    "sunglasses": "pw",
    "coffee maker": "e",
    "blender": "e",
    "toaster": "e",
    "air fryer": "e",
    "electric kettle": "e",
    "vacuum cleaner": "e",
    "rice cooker": "e",
    "stand mixer": "e",
    "space heater": "e",
    "hair dryer": "e",
    "microwave": "e",
    "printer": "e",
    "monitor": "e",
    "router": "e",
    "desk lamp": "e",
    "smartwatch": "be",
    "fitness tracker": "be",
    "bluetooth speaker": "be",
    "wireless mouse": "b",
    "keyboard": "",
    "tablet": "be",
    "e-reader": "be",
    "power bank": "be",
    "toothbrush": "be",
    "webcam": "",
    "phone case": "w",
    "office chair": "",
    "backpack": "w",
    "suitcase": "w",
    "water bottle": "w",
    "yoga mat": "",
    "tent": "",
}
PRODUCTS: tuple[str, ...] = tuple(_PRODUCTS)
ISSUES: tuple[str, ...] = (
    "battery",
    "noise",
    "shipping",
    "price",
    "durability",
    "size",
    "setup",
    "support",
    "overheating",
    "none",
)
SENTIMENTS: tuple[str, ...] = ("negative", "neutral", "positive")


def sentiment_of(rating: int) -> str:
    """1-2 stars: negative, 3: neutral, 4-5: positive."""
    return "negative" if rating <= 2 else "neutral" if rating == 3 else "positive"


@dataclass(frozen=True)
class Review:
    id: int
    text: str
    product: str
    rating: int
    sentiment: str
    issue: str

    def fields(self) -> dict:
        """The four extracted fields, as `parse(answer(r))` returns them."""
        d = asdict(self)
        return {k: d[k] for k in ("product", "rating", "sentiment", "issue")}


# ---------------------------------------------------------------------------------------------- prompt / answer


def prompt(review_text: str) -> str:
    """The model input for one review; the model continues it with `answer(...)`."""
    return f"Review: {review_text}\nJSON:"


def answer(r: Review) -> str:
    """The exact completion: a space, one JSON object on one line, then a newline."""
    return " " + json.dumps(r.fields()) + "\n"


def parse(text: str | None) -> dict | None:
    """A completion (with or without the leading space / trailing newline) -> the four fields, or None."""
    if not text:
        return None
    s = text.strip()
    start, end = s.find("{"), s.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        obj = json.loads(s[start : end + 1])
    except ValueError:
        return None
    if not isinstance(obj, dict) or set(obj) != {"product", "rating", "sentiment", "issue"}:
        return None
    if not all(isinstance(obj[k], str) for k in ("product", "sentiment", "issue")):
        return None
    if not isinstance(obj["rating"], int) or isinstance(obj["rating"], bool):
        return None
    return obj


# ---------------------------------------------------------------------------------------------- templates
# Placeholders: {P} product phrase ("these new headphones"), {the_P} ("the headphones"), {it}/{It}/{obj} (it/them),
# {is}/{was}/{does},
# {s} (verb ending: "s" or ""), {n}/{N}/{Nc} rating as digit / word / capitalised word, {stars} star(s),
# {h} hours, {d} days, {w} weeks, {m} minutes, {usd} dollars, {whom}, {day}.

_PRODUCT_SENTENCES = (  # the sentence that names the product; (product, index) pairs are split train/held-out
    "I bought {P} {ago}.",
    "Got {P} as a gift.",
    "I ordered {P} for my {whom}.",
    "Been using {P} for {w} weeks.",
    "{Pc} arrived last {day}.",
    "Finally replaced my old one with {P}.",
    "My {whom} recommended {P}.",
    "Picked up {P} on sale.",
    "This is a review of {P}.",
    "Review of {P} after {w} weeks of use.",
    "I have had {P} since {day}.",
    "We use {P} every day.",
    "Bought {P} to replace a broken one.",
    "Ordered {P} online {ago}.",
    "Here are my thoughts on {P}.",
    "So I tried {P}.",
    "{Pc} came in a plain box.",
    "I was looking for a good {product} and chose this one.",
    "Needed a {product} for my {whom}, so I got this.",
    "We switched to {P} {ago}.",
    "About {P}:",
    "I got {P} for my birthday.",
)

_TONED_PRODUCT_SENTENCES = {  # product sentences that also set the tone
    "positive": (
        "I love {P}!",
        "{Pc} exceeded my expectations.",
        "Really happy with {P}.",
        "Best {product} I have owned.",
        "Would buy {P} again.",
        "{Pc} {is} fantastic.",
        "Very pleased with {P}.",
    ),
    "neutral": (
        "{Pc} {is} okay.",
        "{the_Pc} {is} fine, nothing special.",
        "Mixed feelings about {P}.",
        "{Pc} {does} the job, I guess.",
        "A decent {product}, not amazing.",
        "{Pc} {is} average at best.",
    ),
    "negative": (
        "I regret buying {P}.",
        "{Pc} {is} a big disappointment.",
        "Do not buy {P}.",
        "Worst {product} I have ever owned.",
        "Returning {P} tomorrow.",
        "{Pc} {was} a waste of money.",
    ),
}

_TONE = {  # tone sentences without the product
    "positive": (
        "Love {obj}!",
        "Highly recommended.",
        "Very happy overall.",
        "Exactly what I needed.",
        "Works like a charm.",
        "No regrets.",
        "Great purchase.",
        "{It} {is} excellent.",
    ),
    "neutral": (
        "{It} {is} okay.",
        "Nothing special.",
        "Does the job.",
        "Not bad, not great.",
        "{It} {is} fine for the price.",
        "Could be better.",
        "Meh.",
    ),
    "negative": (
        "Pretty disappointing.",
        "Would not recommend.",
        "Avoid.",
        "Total letdown.",
        "I want my money back.",
        "Not happy at all.",
        "{It} {is} terrible.",
    ),
}

_NEGATIVE_NO_ISSUE = (  # dislike without naming a problem (issue "none")
    "Just not for me.",
    "I simply don't like {obj}.",
    "Not what I expected.",
)

_NO_ISSUE = (
    "No complaints so far.",
    "Nothing to complain about.",
    "Zero issues.",
    "No problems at all.",
    "Not a single problem yet.",
)

_COMPLAINTS = {
    "battery": (
        "The battery dies after {h} hours.",
        "Battery life is a joke.",
        "{It} won't hold a charge for more than a day.",
        "I have to recharge {obj} constantly.",
        "The battery drains way too fast.",
        "The battery barely lasts an afternoon.",
    ),
    "noise": (
        "{It} {is} way too loud.",
        "There is an annoying buzzing noise.",
        "{It} make{s} a high-pitched whine.",
        "The noise is unbearable.",
        "{It} rattle{s} every time I use {obj}.",
    ),
    "shipping": (
        "{It} arrived {d} days late.",
        "The box was crushed in shipping.",
        "Delivery took almost {w} weeks.",
        "Shipping was painfully slow.",
        "The package showed up damaged.",
        "{It} got lost in the mail and came {d} days late.",
    ),
    "price": (
        "{It} {is} way overpriced.",
        "Not worth the money at all.",
        "The price is too high for what you get.",
        "Way too expensive for what {it} {is}.",
        "I paid ${usd} and that was too much.",
    ),
    "durability": (
        "{It} broke after {w} weeks.",
        "{It} stopped working after a month.",
        "The plastic cracked on day {d}.",
        "{It} fell apart within {w} weeks.",
        "Cheap materials, already falling apart.",
    ),
    "size": (
        "{It} {is} much smaller than the pictures suggest.",
        "Way too big for my apartment.",
        "The size is completely wrong.",
        "{It} {does}n't fit where I wanted.",
        "Much bulkier than I expected.",
    ),
    "setup": (
        "The setup was a nightmare.",
        "The instructions make no sense.",
        "Took me {h} hours to set up.",
        "Assembly was confusing.",
        "The manual is useless.",
    ),
    "support": (
        "Customer service never answered my emails.",
        "Support was rude and unhelpful.",
        "The seller ignored my refund request.",
        "I contacted support {d} times with no reply.",
    ),
    "overheating": (
        "{It} get{s} dangerously hot.",
        "{It} overheat{s} after {m} minutes.",
        "The base gets too hot to touch.",
        "{It} shut{s} off from overheating.",
    ),
}

_COMPLAINT_LEADS = {  # how a complaint is introduced, by sentiment
    "positive": ("My only complaint: ", "One small downside: ", "Minor issue: ", "That said, ", "If I'm picky, "),
    "neutral": ("However, ", "The problem: ", "Main issue: ", "But ", "On the downside, "),
    "negative": ("", "", "Worst part: ", "Also, ", "Unfortunately, ", "Biggest problem: "),
}

_PRAISE = {  # positive remarks about an aspect that is not the issue
    "battery": ("Battery life is excellent.", "The battery lasts for days."),
    "noise": ("{It} {is} very quiet.", "{It} run{s} almost silently."),
    "shipping": ("Shipping was fast.", "{It} arrived {d} days early.", "Delivery was quick."),
    "price": ("Great value for the price.", "The price was fair.", "Got {obj} on sale for ${usd}."),
    "durability": ("{It} feel{s} solid and well built.", "Sturdy construction."),
    "size": ("The size is just right.", "Nice compact size."),
    "setup": ("Setup took {m} minutes.", "Easy to set up."),
    "support": ("Customer service was helpful.", "Support replied within a day."),
    "overheating": ("{It} stay{s} cool even after hours of use.",),
}
_PRAISE_LEADS = {"positive": ("", "", "Also, "), "neutral": ("", "On the plus side, "), "negative": ("", "At least ")}

_RATING_SENTENCES = (
    "{n} {stars}.",
    "{Nc} {stars}.",
    "Rating: {n}/5.",
    "I give {obj} {n} out of 5.",
    "{n} out of 5 stars.",
    "{Nc} out of five.",
    "I'd rate {obj} {n}/5.",
    "Giving {obj} {N} {stars}.",
    "My rating: {n} {stars}.",
    "{unicode}",
    "Score: {n}/5.",
    "{Nc}-star review.",
    "{Nc} {stars} from me.",
    "Verdict: {n}/5.",
)
_RATED_PRODUCT_SENTENCES = (  # product and rating in one sentence (also product templates for the split)
    "{Nc} {stars} for {P}.",
    "Giving {P} {n} {stars}.",
    "I rate {P} {n}/5.",
)

_FILLER = (
    "I use {obj} every day.",
    "My {whom} uses {obj} too.",
    "Ordered on a {day}.",
    "I compared several brands before buying.",
    "This is my second one.",
    "The color is nice.",
    "I mostly use {obj} at home.",
    "Took {obj} on a trip last month.",
    "Came with a {d}-year warranty.",
)
_OPENERS = ("Update: ", "Quick review. ", "Long story short: ", "Honest review: ", "Edit: ", "TL;DR: ")

_ADJECTIVES = ("new", "black", "white", "silver", "blue", "red", "grey", "refurbished", "basic", "fancy", "brand-new")
_DETERMINERS = {False: ("this", "the", "my", "our"), True: ("these", "the", "my", "our")}
_AGO = ("last week", "a month ago", "two weeks ago", "in January", "last year", "recently", "yesterday")
_WHOM = ("mom", "dad", "sister", "brother", "roommate", "kids", "office", "partner", "grandma")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_WORDS = ("zero", "one", "two", "three", "four", "five")

# product templates = plain, toned (by sentiment) and rated product sentences, numbered in one sequence
_TONED_OFFSET: dict[str, int] = {}
_RATED_OFFSET = len(_PRODUCT_SENTENCES)
for _s in SENTIMENTS:
    _TONED_OFFSET[_s] = _RATED_OFFSET
    _RATED_OFFSET += len(_TONED_PRODUCT_SENTENCES[_s])
N_PRODUCT_TEMPLATES = _RATED_OFFSET + len(_RATED_PRODUCT_SENTENCES)


def heldout_pair(product: str, template: int) -> bool:
    """Whether a (product, product-template) pair belongs to the held-out split (about one pair in five)."""
    return zlib.crc32(f"{product}|{template}".encode()) % 5 == 0


def _allowed(aspect: str, tags: str) -> bool:
    if aspect == "battery":
        return "b" in tags
    if aspect == "overheating":
        return "e" in tags
    if aspect in ("noise", "setup"):
        return "w" not in tags
    return True


# share of reviews without a complaint, by rating: equal within a sentiment, so whether there is a complaint says
# nothing about 1 vs 2 or 4 vs 5 stars (the model has to read the rating)
_NONE_SHARE = {1: 0.12, 2: 0.12, 3: 0.2, 4: 0.45, 5: 0.45}


def _issue_weights(rating: int, tags: str) -> list[float]:
    w = [1.0 if issue != "none" and _allowed(issue, tags) else 0.0 for issue in ISSUES]
    share = _NONE_SHARE[rating]
    w[ISSUES.index("none")] = sum(w) * share / (1 - share)
    return w


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _lower_first(s: str) -> str:
    return s if s.startswith("I ") or s.startswith("I'") else s[:1].lower() + s[1:]


class _Renderer:
    def __init__(self, rng: random.Random, product: str, rating: int):
        self.rng = rng
        plural = "p" in _PRODUCTS[product]
        adj = rng.choice(_ADJECTIVES) + " " if rng.random() < 0.35 else ""
        phrase = f"{rng.choice(_DETERMINERS[plural])} {adj}{product}"
        word = _WORDS[rating]
        self.values = {
            "product": product,
            "P": phrase,
            "Pc": _cap(phrase),
            "the_P": f"the {product}",
            "the_Pc": f"The {product}",
            "it": "they" if plural else "it",
            "obj": "them" if plural else "it",
            "It": "They" if plural else "It",
            "is": "are" if plural else "is",
            "was": "were" if plural else "was",
            "does": "do" if plural else "does",
            "s": "" if plural else "s",
            "n": str(rating),
            "N": word,
            "Nc": _cap(word),
            "stars": "star" if rating == 1 else "stars",
            "unicode": "★" * rating + "☆" * (5 - rating),
        }

    def __call__(self, template: str) -> str:
        rng = self.rng
        fresh = {  # new draws for every sentence: numbers here are distractors for the rating
            "h": rng.randint(2, 12),
            "d": rng.randint(2, 14),
            "w": rng.randint(2, 8),
            "m": rng.randint(5, 45),
            "usd": rng.choice((19, 25, 30, 45, 60, 80, 99, 120, 150, 200, 250)),
            "ago": rng.choice(_AGO),
            "whom": rng.choice(_WHOM),
            "day": rng.choice(_DAYS),
        }
        return template.format(**self.values, **fresh)


def _render(rng: random.Random, split: str) -> tuple[str, str, int, str]:
    product = rng.choice(PRODUCTS)
    rating = rng.choices((1, 2, 3, 4, 5), weights=(2, 2, 2, 2, 2))[0]
    sentiment = sentiment_of(rating)
    tags = _PRODUCTS[product]
    issue = rng.choices(ISSUES, weights=_issue_weights(rating, tags))[0]
    say = _Renderer(rng, product, rating)

    # the product sentence: plain, toned or carrying the rating; index into the combined numbering for the split
    toned = _TONED_PRODUCT_SENTENCES[sentiment]
    while True:
        kind = rng.choices(("plain", "toned", "rated"), weights=(5, 3, 1))[0]
        if kind == "plain":
            idx = rng.randrange(len(_PRODUCT_SENTENCES))
            tmpl = _PRODUCT_SENTENCES[idx]
        elif kind == "toned":
            j = rng.randrange(len(toned))
            idx, tmpl = _TONED_OFFSET[sentiment] + j, toned[j]
        else:
            j = rng.randrange(len(_RATED_PRODUCT_SENTENCES))
            idx, tmpl = _RATED_OFFSET + j, _RATED_PRODUCT_SENTENCES[j]
        if split == "all" or heldout_pair(product, idx) == (split == "heldout"):
            break
    head = say(tmpl)

    body: list[str] = []
    if kind != "toned" and rng.random() < 0.7:
        body.append(say(rng.choice(_TONE[sentiment])))
    if issue != "none":
        lead = rng.choice(_COMPLAINT_LEADS[sentiment])
        text = say(rng.choice(_COMPLAINTS[issue]))
        body.append(lead + _lower_first(text) if lead else text)
    elif sentiment == "negative" and rng.random() < 0.6:
        body.append(say(rng.choice(_NEGATIVE_NO_ISSUE)))
    elif rng.random() < 0.5:
        body.append(say(rng.choice(_NO_ISSUE)))
    if rng.random() < 0.45:
        aspects = [a for a in _PRAISE if a != issue and _allowed(a, tags)]
        lead = rng.choice(_PRAISE_LEADS[sentiment])
        text = say(rng.choice(_PRAISE[rng.choice(aspects)]))
        body.append(lead + _lower_first(text) if lead else text)
    if rng.random() < 0.3:
        body.append(say(rng.choice(_FILLER)))
    rng.shuffle(body)

    sentences = [head] + body
    if kind != "rated":
        rating_sentence = say(rng.choice(_RATING_SENTENCES))
        where = rng.random()
        if where < 0.2:
            sentences.insert(0, rating_sentence)
        elif where < 0.7:
            sentences.append(rating_sentence)
        else:
            sentences.insert(rng.randint(1, len(sentences)), rating_sentence)
    text = " ".join(sentences)
    if rng.random() < 0.1:
        text = rng.choice(_OPENERS) + text
    return text, product, rating, issue


def reviews(n: int, seed: int = TRAIN_SEED, split: str = "all") -> list[Review]:
    """`n` reviews with ids 1..n; the same (n, seed, split) always gives the same list (and a longer list for a
    larger n starts with the shorter one).

    split: "train" uses only (product, product-template) pairs outside the held-out set, "heldout" only pairs inside
    it (and a random stream of its own), "all" any pair.
    """
    if split not in ("all", "train", "heldout"):
        raise ValueError(f"split must be 'all', 'train' or 'heldout', not {split!r}")
    rng = random.Random(f"reldl-demo/{split}/{seed}")
    out = []
    for i in range(n):
        text, product, rating, issue = _render(rng, split)
        out.append(Review(i + 1, text, product, rating, sentiment_of(rating), issue))
    return out
