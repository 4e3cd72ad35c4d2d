"""The demo's caption grammar as findings parsers (msmedcap.eval.findings): ``demo-medical``
(modality, lesion_present; count, size, side, margin and lesion_all_four where the reference has a
lesion) and ``demo-general`` (background, objects). Registered through the
``msmedcap.findings_parsers`` entry point, so scoring finds them without importing the demo."""
from __future__ import annotations

import re
from typing import Mapping, Optional

from msmedcap.demo.world import BACKGROUNDS, COLOURS, MODALITIES, NUMBERS, SHAPES
from msmedcap.eval.findings import FindingsParser, normalize, regex_alternation, single_value, register_parser


class DemoMedicalParser(FindingsParser):
    """"axial ct of the abdomen showing two small lesions in the left kidney with irregular margins.",
    "chest x-ray with no focal lesion." (msmedcap.demo.world.medical_sample)."""

    name = "demo-medical"
    fields = ("modality", "lesion_present", "count", "size", "side", "margin", "lesion_all_four")
    headers = {"lesion_present": "lesion", "lesion_all_four": "all four"}
    LESION_FIELDS = ("count", "size", "side", "margin")
    SIZES, SIDES, MARGINS = ("small", "large"), ("left", "right"), ("smooth", "irregular")
    NOUNS = ("lesion", "nodule")
    # how a prediction names each modality when it strays from the exact prefix
    MODALITY_WORDS = {"ct": r"\bct\b", "xray": r"\bx-?rays?\b", "mr": r"\bmri?\b"}

    def __init__(self):
        self.numbers = {w: i for i, w in enumerate(NUMBERS) if i > 0}
        num, size, noun = regex_alternation(self.numbers), regex_alternation(self.SIZES), regex_alternation(self.NOUNS)
        organs = {organ for _, _, organ in MODALITIES.values()}
        prefixes = {prefix: m for m, (_, prefix, _) in MODALITIES.items()}
        self.prefixes = prefixes
        self._strict = re.compile(
            rf"^(?P<prefix>{regex_alternation(prefixes)}) (?:(?P<none>with no focal lesion)|showing (?P<count>{num}) "
            rf"(?P<size>{size}) (?:{noun})s? in the (?P<side>{regex_alternation(self.SIDES)}) (?:{regex_alternation(organs)}) "
            rf"with (?P<margin>{regex_alternation(self.MARGINS)}) margins)\.$")
        self._modality = {m: re.compile(self.MODALITY_WORDS.get(m, re.escape(p))) for p, m in prefixes.items()}
        self._negative = re.compile(rf"\bno (?:focal )?(?:{noun})s?\b")
        self._noun = re.compile(rf"\b(?:{noun})s?\b")
        self._count = re.compile(rf"\b(?P<v>{num}) (?:(?:{size}) )?(?:{noun})s?\b|\bshowing (?P<w>{num})\b")
        self._size = re.compile(rf"\b(?P<v>{size}) (?:{noun})s?\b|\bshowing (?:{num}) (?P<w>{size})\b")
        self._side = re.compile(rf"\b({regex_alternation(self.SIDES)})\b")
        self._margin = re.compile(rf"\b(?P<v>{regex_alternation(self.MARGINS)}) margins?\b|\bwith (?P<w>{regex_alternation(self.MARGINS)})\b")

    def strict(self, text: str) -> Optional[dict]:
        m = self._strict.match(normalize(text))
        if not m:
            return None
        out = {"modality": self.prefixes[m["prefix"]], "lesion_present": m["none"] is None}
        if out["lesion_present"]:
            out.update(count=self.numbers[m["count"]], size=m["size"], side=m["side"], margin=m["margin"])
        return out

    @staticmethod
    def _groups(pattern: re.Pattern, text: str) -> list:
        return [m["v"] or m["w"] for m in pattern.finditer(text)]

    def parse(self, text: str) -> dict:
        t = normalize(text)
        out = {}
        modality = single_value(m for m, rx in self._modality.items() if rx.search(t))
        negative = bool(self._negative.search(t))
        # a lesion noun outside "no (focal) lesion", or a number after "showing" (a truncated caption)
        positive = bool(self._noun.search(self._negative.sub(" ", t)) or self._groups(self._count, t))
        if modality is not None:
            out["modality"] = modality
        if negative != positive:
            out["lesion_present"] = positive
        if out.get("lesion_present", True):  # a caption that says "no lesion" states no lesion details
            count = single_value(self.numbers[w] for w in self._groups(self._count, t))
            values = {"count": count, "size": single_value(self._groups(self._size, t)),
                      "side": single_value(self._side.findall(t)), "margin": single_value(self._groups(self._margin, t))}
            out.update({k: v for k, v in values.items() if v is not None})
        return out

    def applies(self, field: str, ref: Mapping) -> bool:
        if field in self.LESION_FIELDS or field == "lesion_all_four":
            return bool(ref.get("lesion_present"))
        return True

    def judge(self, ref: Mapping, pred: Mapping) -> dict:
        out = super().judge(ref, pred)
        if out["lesion_all_four"] is not None:
            out["lesion_all_four"] = all(out[f] for f in self.LESION_FIELDS)
        return out


class DemoGeneralParser(FindingsParser):
    """"two red circles and a blue square on a white background." (msmedcap.demo.world.general_sample):
    background, and objects = the multiset of (count, colour, shape) groups, right only when equal."""

    name = "demo-general"
    fields = ("background", "objects")

    def __init__(self):
        self.numbers = {w: i for i, w in enumerate(NUMBERS) if i > 0}
        group = rf"(?:{regex_alternation(self.numbers)}) (?:{regex_alternation(COLOURS)}) (?:{regex_alternation(SHAPES)})s?"
        self._strict = re.compile(rf"^(?P<groups>{group}(?: and {group})*) on a (?P<bg>{regex_alternation(BACKGROUNDS)}) background\.$")
        self._group = re.compile(rf"\b({regex_alternation(self.numbers)}) ({regex_alternation(COLOURS)}) ({regex_alternation(SHAPES)})s?\b")
        self._background = re.compile(rf"\b({regex_alternation(BACKGROUNDS)}) background\b")

    def _objects(self, text: str) -> list:
        return sorted([self.numbers[n], c, s] for n, c, s in self._group.findall(text))

    def strict(self, text: str) -> Optional[dict]:
        t = normalize(text)
        m = self._strict.match(t)
        if not m:
            return None
        return {"background": m["bg"], "objects": self._objects(m["groups"])}

    def parse(self, text: str) -> dict:
        t = normalize(text)
        out = {}
        background = single_value(self._background.findall(t))
        if background is not None:
            out["background"] = background
        objects = self._objects(t)
        if objects:
            out["objects"] = objects
        return out


def register() -> None:
    """The entry point: general scenes by their source, medical scans by their modality's source."""
    register_parser(DemoGeneralParser(), sources=("demo-general",))
    register_parser(DemoMedicalParser(), sources=tuple(source for source, _, _ in MODALITIES.values()))
