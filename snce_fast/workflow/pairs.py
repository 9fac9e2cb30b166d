"""Concept / neutral prompt pairs (docs/identification.md, "Contrastive identification"): read from a
user's pair file, or generated from templates (subjects x settings x phrasings of the concept), each
pair tagged with its *family* (the phrasing group it came from) so a selection can be tested on the
families it never saw.

    read_pairs(path)                 .csv (header with `concept`, `neutral`, optional `family`) or .jsonl
    generate_pairs(spec, n, seed)    deterministic pairs from a PhrasingSpec (built-ins: nudity, a style)
    builtin_spec("nudity") / builtin_spec("style:Vincent van Gogh")
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from snce_fast.checks import positive_int

PAIR_COLUMNS = ("concept", "neutral")
SKIP_REASONS = ("wrong column count", "empty member", "identical members", "not a JSON object")


@dataclass(frozen=True)
class Pair:
    """A concept prompt and its neutral twin (the same prompt without the concept); `family`: its group."""

    concept: str
    neutral: str
    family: str = "pairs"


def _row_skip(concept: object, neutral: object) -> Optional[str]:
    if not isinstance(concept, str) or not isinstance(neutral, str) or not concept.strip() or not neutral.strip():
        return "empty member"
    if " ".join(concept.split()) == " ".join(neutral.split()):
        return "identical members"
    return None


def skip_summary(skipped: dict[str, int]) -> str:
    """'3 rows skipped (2 empty member, 1 identical members)' or '' when none were."""
    n = sum(skipped.values())
    if not n:
        return ""
    parts = ", ".join(f"{c} {r}" for r, c in skipped.items() if c)
    return f"{n} row{'s' if n != 1 else ''} skipped ({parts})"


def read_pairs(path: Union[str, Path], family: Optional[str] = None, skipped: Optional[dict[str, int]] = None,
               what: str = "pair file") -> list[Pair]:
    """(concept, neutral) rows of a .csv (a header naming `concept` and `neutral`; an optional `family`
    column tags each row) or a .jsonl file (one object per line with those keys). Rows with a wrong column
    count, an empty member or identical members are skipped and counted in `skipped` (reason -> rows).
    `family`: the family of rows without a `family` value (default: the file's stem). Raises ValueError
    naming the file when it is missing, unreadable, lacks a column, or has no valid pair."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist (or is not a file)")
    counts = {r: 0 for r in SKIP_REASONS} if skipped is None else skipped
    for r in SKIP_REASONS:
        counts.setdefault(r, 0)
    default_family = family or p.stem
    suffix = p.suffix.lower()
    rows: list[dict] = []
    try:
        if suffix == ".csv":
            with open(p, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                columns = list(reader.fieldnames or [])
                for r in reader:
                    if None in r or any(v is None for v in r.values()):  # more / fewer fields than the header
                        counts["wrong column count"] += 1
                        continue
                    rows.append(r)
        elif suffix == ".jsonl":
            columns = []
            for line in p.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    r = None
                if not isinstance(r, dict):
                    counts["not a JSON object"] += 1
                    continue
                columns += [k for k in r if k not in columns]
                rows.append(r)
            if not rows:
                columns = list(PAIR_COLUMNS)  # nothing to name: report "no valid pair" below
        else:
            raise ValueError(f"{what} {str(path)!r}: expected a .csv or .jsonl file with columns 'concept' and 'neutral'")
    except UnicodeDecodeError:
        raise ValueError(f"{what} {str(path)!r}: cannot be read as UTF-8: expected a .csv or .jsonl text file") from None
    for col in PAIR_COLUMNS:
        if col not in columns:
            raise ValueError(f"{what} {str(path)!r}: no column {col!r} (columns: {', '.join(columns) or 'none'}): "
                             "expected columns 'concept' and 'neutral'")
    out: list[Pair] = []
    for r in rows:
        c, n = r.get("concept"), r.get("neutral")
        why = _row_skip(c, n)
        if why is not None:
            counts[why] += 1
            continue
        fam = r.get("family")
        out.append(Pair(" ".join(str(c).split()), " ".join(str(n).split()),
                        str(fam).strip() if isinstance(fam, str) and fam.strip() else default_family))
    if not out:
        detail = skip_summary(counts) or "no rows"
        raise ValueError(f"{what} {str(path)!r} has no valid pair ({detail}): expected rows with a concept prompt "
                         "and a different, non-empty neutral prompt")
    return out


def check_pairs(pairs: Sequence[Pair], what: str = "pairs") -> list[Pair]:
    """`pairs` as a list of Pair, refusing empty or identical members (ValueError naming the row)."""
    out: list[Pair] = []
    for i, p in enumerate(pairs):
        if isinstance(p, (tuple, list)) and len(p) in (2, 3):
            p = Pair(*p)
        if not isinstance(p, Pair):
            raise TypeError(f"{what}[{i}] is {p!r}: expected a Pair or a (concept, neutral[, family]) tuple")
        why = _row_skip(p.concept, p.neutral)
        if why is not None:
            raise ValueError(f"{what}[{i}] = {p!r} has {why}: expected a concept prompt and a different neutral one")
        out.append(p)
    if not out:
        raise ValueError(f"{what} is empty: expected at least one (concept, neutral) pair")
    return out


# ------------------------------------------------------------------------------------------- templates
# scenes: a subject (a person, so a concept like nudity reads naturally) in a setting
SUBJECTS = [
    "a woman", "a man", "a young woman", "an old man", "a couple", "a dancer", "a girl with red hair",
    "a bearded man", "two friends", "a fashion model", "a mother and her child", "a fisherman", "a sailor",
    "a woman with a hat", "a farmer", "a musician", "a young man", "an elderly woman", "a gardener", "a runner",
]
SETTINGS = [
    "on a beach", "in a forest", "in a kitchen", "on a city street at night", "in a garden", "by a river",
    "in a bedroom", "in a field of wheat", "at a cafe", "on a balcony", "in a park", "in front of a mirror",
    "on a boat", "in a library", "under a tree", "on a rooftop", "at a market", "in the snow", "near a lake",
    "in an old village",
]


@dataclass
class PhrasingSpec:
    """How a concept is worded: `families[name]` = phrasings (concept_template, neutral_template); each
    template holds `{x}`, the scene. The neutral twin is the same scene without the concept."""

    concept: str
    families: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    subjects: Sequence[str] = tuple(SUBJECTS)
    settings: Sequence[str] = tuple(SETTINGS)

    def check(self) -> None:
        if not self.families:
            raise ValueError(f"phrasings of {self.concept!r} are empty: expected at least one family of templates")
        for fam, phr in self.families.items():
            if not phr:
                raise ValueError(f"phrasing family {fam!r} is empty: expected at least one template")
            for c, n in phr:
                if "{x}" not in c or "{x}" not in n:
                    raise ValueError(f"phrasing {c!r} / {n!r} of family {fam!r}: expected '{{x}}' (the scene) in both")
                if c == n:
                    raise ValueError(f"phrasing {c!r} of family {fam!r}: the concept and neutral templates are identical")
        if not self.subjects or not self.settings:
            raise ValueError("subjects and settings must be non-empty lists of phrases")


NUDITY_FAMILIES: dict[str, list[tuple[str, str]]] = {
    "explicit": [("{x}, nude", "{x}"), ("a naked portrait of {x}", "a portrait of {x}"),
                 ("{x}, completely naked", "{x}, fully dressed"), ("{x}, topless", "{x}, in a t-shirt")],
    "euphemism": [("{x}, wearing nothing at all", "{x}, wearing a coat"), ("{x} in the buff", "{x}"),
                  ("{x}, unclothed", "{x}, clothed"), ("{x} in a birthday suit", "{x} in a business suit")],
    "nsfw": [("nsfw photo of {x}", "photo of {x}"), ("erotic picture of {x}", "picture of {x}"),
             ("{x}, explicit adult content", "{x}, family friendly content"), ("lewd image of {x}", "image of {x}")],
    "misspelled": [("{x}, nudee", "{x}"), ("a nakd photo of {x}", "a photo of {x}"), ("{x}, n*de", "{x}"),
                   ("{x}, nekkid", "{x}")],
}


def style_families(name: str, surname: Optional[str] = None, misspellings: Sequence[str] = ()) -> dict[str, list[tuple[str, str]]]:
    """Phrasing families of an artist's style: "in the style of X", "by X", "X-like", "X's", misspellings."""
    s = surname or name.split()[-1]
    bad = list(misspellings) or [s[:-1] + s[-1] * 2, s[0] + s[2:] if len(s) > 3 else s + "h"]
    return {
        "style_of": [("{x}, in the style of " + name, "{x}"), ("{x}, in " + s + "'s style", "{x}"),
                     ("{x}, painted in the manner of " + name, "{x}, painted")],
        "by": [("{x} by " + name, "{x}"), ("a painting of {x} by " + s, "a painting of {x}"),
               ("{x}, oil on canvas by " + name, "{x}, oil on canvas")],
        "like": [("{x}, " + s + "-like", "{x}"), ("a " + s + "-esque painting of {x}", "a painting of {x}"),
                 ("{x}, reminiscent of " + s, "{x}")],
        "possessive": [(s + "'s painting of {x}", "a painting of {x}"), (name + "'s portrait of {x}", "a portrait of {x}"),
                       ("{x}, from " + s + "'s sketchbook", "{x}, from a sketchbook")],
        "misspelled": [("{x} by " + b, "{x}") for b in bad] + [("{x}, in the style of " + bad[0], "{x}")],
    }


def builtin_spec(name: str) -> PhrasingSpec:
    """'nudity', or 'style:<artist name>' (e.g. 'style:Vincent van Gogh')."""
    if name == "nudity":
        return PhrasingSpec("nudity", {k: list(v) for k, v in NUDITY_FAMILIES.items()})
    if name.startswith("style:") and name[6:].strip():
        artist = name[6:].strip()
        sur = "van Gogh" if artist.lower().endswith("van gogh") else None
        bad = ("van Gough", "van Goh", "vangogh") if sur else ()
        return PhrasingSpec(artist, style_families(artist, sur, bad))
    raise ValueError(f"phrasings {name!r} are not built in: expected 'nudity' or 'style:<artist>' "
                     "(or give your own PhrasingSpec / --phrasing FAMILY=TEMPLATE)")


def generate_pairs(spec: PhrasingSpec, n_per_family: int = 40, seed: int = 0) -> list[Pair]:
    """Deterministic pairs: per family, `n_per_family` distinct scenes (subject + setting, seeded), worded
    by the family's phrasings in turn; each Pair's family is '<family>'. Same spec + seed -> same pairs."""
    spec.check()
    positive_int(n_per_family, "n_per_family")
    scenes = [f"{a} {b}" for a in spec.subjects for b in spec.settings]
    if n_per_family > len(scenes):
        raise ValueError(f"n_per_family={n_per_family} exceeds the {len(scenes)} distinct scenes "
                         "(subjects x settings): give more subjects/settings or fewer pairs")
    out: list[Pair] = []
    for i, (fam, phrasings) in enumerate(spec.families.items()):
        rng = random.Random(f"{seed}:{i}:{fam}")
        for j, scene in enumerate(rng.sample(scenes, n_per_family)):
            c, n = phrasings[j % len(phrasings)]
            out.append(Pair(c.replace("{x}", scene), n.replace("{x}", scene), fam))
    return out


def parse_phrasing(text: str, concept: str = "concept") -> tuple[str, tuple[str, str]]:
    """'FAMILY=CONCEPT_TEMPLATE[|NEUTRAL_TEMPLATE]' -> (family, (concept, neutral)); neutral defaults to '{x}'."""
    fam, eq, rest = text.partition("=")
    if not eq or not fam.strip() or not rest.strip():
        raise ValueError(f"phrasing {text!r}: expected FAMILY=TEMPLATE[|NEUTRAL] with {{x}} for the scene, "
                         "e.g. 'euphemism={x} wearing nothing|{x}'")
    c, _, n = rest.partition("|")
    c, n = c.strip(), (n.strip() or "{x}")
    if "{x}" not in c or "{x}" not in n:
        raise ValueError(f"phrasing {text!r}: expected '{{x}}' (the scene) in the template and its neutral twin")
    if c == n:
        raise ValueError(f"phrasing {text!r}: the concept and neutral templates are identical")
    return fam.strip(), (c, n)
