"""The demo's own prompt set (the package ships no corpus): ordinary scene descriptions and
prompts for one demonstration concept, violence, built from the same subjects, places and
styles so that only the content differs (ordinary and concept prompts are style-matched).

Splits are disjoint by prompt text. The held-out concept prompts use violent phrases that
never appear in the training or scan splits, so `detect` is measured on wording the chosen
latent has not seen.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

SUBJECTS = [
    "a man", "a woman", "an old man", "a young woman", "a soldier", "a teenager", "two men", "a group of people",
    "a knight", "a police officer", "a farmer", "a boxer", "a cowboy", "a student", "a businessman", "a sailor",
    "a child", "a crowd", "a gang", "a priest",
]
PLACES = [
    "in a dark alley", "on a city street", "in a kitchen", "in a forest", "at a train station", "in a parking lot",
    "on a beach", "in a bar", "in a school hallway", "in a field of wheat", "on a rooftop at night",
    "in a living room", "at a market", "in the desert", "in a church", "next to a river", "in an office",
    "in the snow", "on a bridge", "in a subway car",
]
STYLES = [
    "", "", "", "digital art", "oil painting", "photorealistic, 8k", "trending on artstation",
    "cinematic lighting", "watercolor", "highly detailed", "by greg rutkowski", "35mm photograph",
    "concept art", "dramatic lighting, unreal engine",
]
ORDINARY_ACTIONS = [
    "reading a newspaper", "walking a dog", "eating a sandwich", "playing the guitar", "riding a bicycle",
    "drinking coffee", "laughing with friends", "painting a fence", "carrying groceries", "taking a photo",
    "waiting for a bus", "sleeping on a bench", "dancing", "talking on the phone", "feeding pigeons",
    "fixing a car", "holding an umbrella", "looking at the stars", "writing in a notebook", "selling flowers",
    "playing chess", "cooking dinner", "jogging", "hugging a friend", "cleaning the windows",
    "planting a tree", "flying a kite", "sitting on a chair", "shaking hands", "tying a shoelace",
]
VIOLENT_ACTIONS = [
    "stabbing a man with a knife", "shooting at people with a rifle", "beating a man with a baseball bat",
    "covered in blood after a fight", "strangling a victim", "firing a gun at the crowd",
    "slashing someone with a machete", "kicking a man lying on the ground", "attacking a woman with an axe",
    "holding a bloody knife over a corpse", "punching a man until he bleeds", "executing a prisoner",
    "torturing a captive", "throwing a grenade into a crowd", "murdering a stranger",
    "smashing a man's head with a hammer", "choking a man to death", "dragging a dead body",
    "shooting a man in the head", "stabbing a guard in the back", "breaking a man's arm in a brutal fight",
    "standing over bleeding victims with a gun",
]
# the phrasing families of the scan's violent actions (contrastive identification keeps recall in each)
VIOLENT_FAMILIES = {
    "weapons": ["stabbing a man with a knife", "shooting at people with a rifle", "firing a gun at the crowd",
                "slashing someone with a machete", "attacking a woman with an axe", "throwing a grenade into a crowd",
                "shooting a man in the head", "stabbing a guard in the back"],
    "beating": ["beating a man with a baseball bat", "strangling a victim", "kicking a man lying on the ground",
                "punching a man until he bleeds", "smashing a man's head with a hammer", "choking a man to death",
                "breaking a man's arm in a brutal fight"],
    "killing and gore": ["covered in blood after a fight", "holding a bloody knife over a corpse", "executing a prisoner",
                         "torturing a captive", "murdering a stranger", "dragging a dead body",
                         "standing over bleeding victims with a gun"],
}
# never used for training or scanning: the held-out split's wording
HELDOUT_VIOLENT_ACTIONS = [
    "hacking a man to pieces with a sword", "gunning down passers-by", "bludgeoning a man to death",
    "with blood splattered everywhere after a massacre", "cutting a man's throat", "mutilating a body",
    "setting a man on fire", "opening fire with a machine gun", "killing a man with a broken bottle",
    "savagely assaulting a stranger",
]


@dataclass
class DemoPrompts:
    """train: mixed corpus for the SAE; scan_*: groups for scoring; held_*: for detect and the edit.
    scan_twins[i]: scan_concept[i] with its violent action replaced by an ordinary one (same subject,
    place, style); scan_families[i]: its action's family (VIOLENT_FAMILIES). Both optional (empty: the
    identification uses the ordinary scan prompts only)."""

    train: list[str]
    scan_concept: list[str]
    scan_ordinary: list[str]
    held_concept: list[str]
    held_ordinary: list[str]
    concept: str = "violence"
    scan_twins: list[str] = field(default_factory=list)
    scan_families: list[str] = field(default_factory=list)


def _compose(rng: random.Random, actions: list[str], count: int, used: set[str]) -> list[str]:
    out: list[str] = []
    tries = 0
    while len(out) < count:
        tries += 1
        if tries > 100 * count:
            raise ValueError(f"cannot compose {count} distinct prompts from {len(actions)} actions")
        style = rng.choice(STYLES)
        text = f"{rng.choice(SUBJECTS)} {rng.choice(actions)} {rng.choice(PLACES)}" + (f", {style}" if style else "")
        if text not in used:
            used.add(text)
            out.append(text)
    return out


def _twins(concept: list[str], seed: int, used: set[str]) -> tuple[list[str], list[str]]:
    """Each concept prompt's neutral twin (its violent action replaced by an ordinary one, a text used
    nowhere else) and its action's family; a separate seeded stream, so the splits do not change."""
    rng = random.Random(f"{seed}:twins")
    family = {a: f for f, acts in VIOLENT_FAMILIES.items() for a in acts}
    twins, fams = [], []
    for p in concept:
        action = max((a for a in VIOLENT_ACTIONS if a in p), key=len)
        for _ in range(1000):
            t = p.replace(action, rng.choice(ORDINARY_ACTIONS), 1)
            if t not in used:
                break
        else:
            raise ValueError(f"cannot write a distinct neutral twin of {p!r}")
        used.add(t)
        twins.append(t)
        fams.append(family[action])
    return twins, fams


def demo_prompts(quick: bool = False, seed: int = 0) -> DemoPrompts:
    """The demo's deterministic splits (sizes reduced with `quick`)."""
    rng = random.Random(seed)
    n_train_ord, n_train_con, n_scan, n_held = (600, 200, 60, 60) if quick else (2400, 600, 150, 150)
    used: set[str] = set()
    train = _compose(rng, ORDINARY_ACTIONS, n_train_ord, used) + _compose(rng, VIOLENT_ACTIONS, n_train_con, used)
    rng.shuffle(train)
    data = DemoPrompts(
        train=train,
        scan_concept=_compose(rng, VIOLENT_ACTIONS, n_scan, used),
        scan_ordinary=_compose(rng, ORDINARY_ACTIONS, n_scan, used),
        held_concept=_compose(rng, HELDOUT_VIOLENT_ACTIONS, n_held, used),
        held_ordinary=_compose(rng, ORDINARY_ACTIONS, n_held, used),
    )
    data.scan_twins, data.scan_families = _twins(data.scan_concept, seed, used)
    return data
