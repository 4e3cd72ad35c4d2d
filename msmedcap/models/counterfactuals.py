"""Counterfactual captions: the positive caption with exactly one finding changed.

Stage 1 uses them as ITM's hard negatives (``model.stage1.counterfactuals``): a negative that differs
from the positive in one finding only ("irregular" for "smooth", "left" for "right", "two" for
"three") makes the queries keep that finding, where negatives drawn from other images' captions almost
always differ in many.

A *term set* names one kind of finding and holds groups of interchangeable terms: a match of a term
is replaced by another term of its group. A term is words separated by spaces, matched whole and
case-insensitively; ``*`` stands for one word carried over (``"one * lesion"`` -> ``"two * lesions"``
keeps the size word between and the number agreement). A caption's *sites* are its matches, the
longest first where matches of one set overlap; a counterfactual changes one site of one set, the set
drawn first (so a caption's frequent finding does not crowd out its rare one), then the site, then the
replacement, all from the torch generator given (seeded, resumed with the run).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # torch is imported where it is used: config validation builds a generator, and needs none
    import torch

# Findings of English radiology captions (ROCO, MedICaT, MIMIC-CXR reports): each group's terms name
# different findings, never synonyms.
RADIOLOGY_SETS = {
    "side": [["left", "right"], ["left-sided", "right-sided"], ["unilateral", "bilateral"]],
    "negation": [["no evidence of", "evidence of"], ["without", "with"], ["negative for", "positive for"],
                 ["absent", "present"], ["normal", "abnormal"], ["there is no", "there is"],
                 ["there are no", "there are"]],
    "number": [["two", "three", "four", "five", "six"]],
    "size": [["small", "large"], ["smaller", "larger"], ["increased", "decreased"], ["mild", "severe"],
             ["enlarged", "shrunken"]],
    "descriptor": [["smooth", "irregular"], ["well-defined", "ill-defined"], ["hyperdense", "hypodense"],
                   ["hyperintense", "hypointense"], ["hyperechoic", "hypoechoic"], ["solid", "cystic"],
                   ["benign", "malignant"], ["anterior", "posterior"], ["superior", "inferior"],
                   ["upper", "lower"], ["medial", "lateral"], ["proximal", "distal"]],
}
SLOT = "*"


def term_pattern(term: str) -> str:
    """A term's regex: its words whole (no word character either side), ``*`` a captured word."""
    words = [r"(\S+?)" if w == SLOT else re.escape(w) for w in term.split()]
    return r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)"


def normalise_sets(sets, key: str = "model.stage1.counterfactuals.sets") -> dict:
    """``{name: [[term, ...], ...]}`` from a config's sets (a set may be one flat group); a
    :class:`ValueError` naming the set and term for what cannot work: a group of fewer than two distinct
    terms, a term of slots only, terms of one group with different numbers of slots."""
    if not isinstance(sets, dict) or not sets:
        raise ValueError(f"{key}: expected a mapping of set name -> terms (or groups of terms), got {sets!r}")
    out = {}
    for name, groups in sets.items():
        if isinstance(groups, list) and groups and all(isinstance(t, str) for t in groups):
            groups = [groups]
        if not (isinstance(groups, list) and groups and all(isinstance(g, list) for g in groups)):
            raise ValueError(f"{key}.{name}: expected a list of terms or a list of groups of terms, got {groups!r}")
        for group in groups:
            terms = [" ".join(str(t).split()) for t in group]
            if len({t.lower() for t in terms}) != len(terms) or len(terms) < 2:
                raise ValueError(f"{key}.{name}: each group must be two or more distinct terms, got {group!r}")
            for t in terms:
                if not t or all(w == SLOT for w in t.split()):
                    raise ValueError(f"{key}.{name}: term {t!r} must be more than {SLOT!r} (a word of its own)")
            if len({t.split().count(SLOT) for t in terms}) != 1:
                raise ValueError(f"{key}.{name}: the terms of {group!r} must be alike in their number of {SLOT!r}")
        out[str(name)] = [[" ".join(str(t).split()) for t in g] for g in groups]
    return out


@dataclass(frozen=True)
class Site:
    """One match in a caption: characters ``start:end``, term ``term`` of ``group``, the slot words."""
    start: int
    end: int
    group: tuple
    term: int
    slots: tuple


class Counterfactuals:
    """Makes counterfactual captions from ``sets`` (``{name: [[term, ...], ...]}``, see
    :func:`normalise_sets`); ``use`` keeps only the sets named (all when empty)."""

    def __init__(self, sets: dict, use=()):
        sets = normalise_sets(sets)
        unknown = [u for u in use if u not in sets]
        if unknown:
            raise ValueError(f"model.stage1.counterfactuals.use: unknown set {unknown[0]!r} (sets: {', '.join(sets)})")
        self.names = tuple(n for n in sets if not use or n in use)
        self._patterns = {n: [(tuple(g), i, re.compile(term_pattern(t), re.IGNORECASE))
                              for g in sets[n] for i, t in enumerate(g)] for n in self.names}

    def sites(self, caption: str) -> dict:
        """``{set name: [Site, ...]}`` of the sets that match ``caption`` (non-overlapping within a set)."""
        out = {}
        for name, patterns in self._patterns.items():
            found = [Site(m.start(), m.end(), group, i, m.groups())
                     for group, i, p in patterns for m in p.finditer(caption)]
            found.sort(key=lambda s: (s.start, s.start - s.end))
            kept, end = [], -1
            for s in found:
                if s.start >= end:
                    kept.append(s)
                    end = s.end
            if kept:
                out[name] = kept
        return out

    @staticmethod
    def apply(caption: str, site: Site, term: int) -> str:
        """``caption`` with ``site`` replaced by term ``term`` of its group (slots filled in order, the
        first letter's case kept)."""
        slots = iter(site.slots)
        words = [next(slots) if w == SLOT else w for w in site.group[term].split()]
        text = " ".join(words)
        if caption[site.start].isupper():
            text = text[0].upper() + text[1:]
        return caption[:site.start] + text + caption[site.end:]

    def make(self, caption: str, generator: Optional[torch.Generator] = None) -> tuple:
        """``(counterfactual, set name)``: one finding of ``caption`` changed; ``(None, None)`` when no
        set matches it."""
        found = self.sites(caption)
        if not found:
            return None, None
        names = list(found)
        name = names[_draw(len(names), generator)]
        site = found[name][_draw(len(found[name]), generator)]
        others = [i for i in range(len(site.group)) if i != site.term]
        return self.apply(caption, site, others[_draw(len(others), generator)]), name


def _draw(n: int, generator: Optional["torch.Generator"]) -> int:
    import torch

    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(n, (1,), generator=generator, device=device)) if n > 1 else 0


@dataclass
class CounterfactualTexts:
    """A batch's counterfactual captions as Q-Former text, a row per sample: ``ids``/``mask`` (a sample
    without one: its own caption, ``valid`` False), ``set_index`` (into ``names``; -1: none)."""
    ids: torch.Tensor
    mask: torch.Tensor
    valid: torch.Tensor
    set_index: torch.Tensor
    names: tuple
    itm_share: float
    itc: bool

    def rows(self, index: torch.Tensor) -> "CounterfactualTexts":
        return replace(self, ids=self.ids[index], mask=self.mask[index], valid=self.valid[index],
                       set_index=self.set_index[index])

    def counts(self, used: torch.Tensor) -> dict:
        """``n_cf`` (counterfactual negatives used) and ``n_cf/SET`` per set, as float tensors (no host sync)."""
        import torch

        chosen = self.set_index[used] if used.numel() else self.set_index[:0]
        per_set = (chosen[:, None] == torch.arange(len(self.names), device=chosen.device)).sum(0).float()
        return {"n_cf": per_set.sum(), **{f"n_cf/{name}": per_set[i] for i, name in enumerate(self.names)}}


def counterfactual_texts(maker: Counterfactuals, captions: list, encode, generator=None, itm_share: float = 0.5,
                         itc: bool = False) -> CounterfactualTexts:
    """Each caption's counterfactual (:meth:`Counterfactuals.make`), tokenised by ``encode`` (texts ->
    ``input_ids``/``attention_mask``: the loader's Q-Former text encoding)."""
    import torch

    made = [maker.make(c, generator) for c in captions]
    enc = encode([text if text is not None else c for (text, _), c in zip(made, captions)])
    index = {name: i for i, name in enumerate(maker.names)}
    return CounterfactualTexts(
        ids=enc["input_ids"], mask=enc["attention_mask"],
        valid=torch.tensor([text is not None for text, _ in made], dtype=torch.bool),
        set_index=torch.tensor([index.get(name, -1) for _, name in made], dtype=torch.long),
        names=maker.names, itm_share=itm_share, itc=itc)
