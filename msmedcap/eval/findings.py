"""Findings accuracy: references and predictions parsed into findings (is there a lesion, which side,
how many, ...; which shapes and background), scored per field next to the n-gram scores, which
reward a template that gets the frequent words right whatever the image shows.

An extension point: a *parser* turns a caption into ``{field: value}``; parsers are registered per
source (:func:`register_parser`, or with a predicate on the record for sources that share a
grammar), by installed packages through the ``msmedcap.findings_parsers`` entry point: the demo's
grammar (msmedcap.demo.findings) is one. Records whose source has no parser (ROCO, MedICaT, any
free text) get the lexicon scorer: modality and laterality terms mentioned in the prediction vs the
references, as micro precision/recall/F1 over samples.

Rules:
- a reference must match its grammar exactly; one that does not is counted
  (``unparsed_references``) and left out of every field's denominator;
- a prediction is read leniently: each field it states unambiguously (one value, not two
  conflicting ones) is compared with the reference; a field it does not state is wrong. Empty,
  truncated, garbage or wrong-grammar predictions are therefore wrong on what they fail to say, and
  are counted (``unparsed_predictions``); nothing here raises on any string;
- with several references, the grammar fields are judged against the first that parses, the
  lexicon against the union of the references' terms.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, Optional, Sequence


# The entry-point group through which installed packages register parsers (msmedcap.demo does).
PARSER_ENTRY_POINTS = "msmedcap.findings_parsers"


def normalize(text) -> str:
    """Lower case, whitespace runs to one space; anything that is not a string becomes ''."""
    return " ".join(text.lower().split()) if isinstance(text, str) else ""


def single_value(values: Iterable):
    """The value a caption states: exactly one distinct value, else None (absent or conflicting)."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


def regex_alternation(words: Iterable[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


# --------------------------------------------------------------------------- parsers
class FindingsParser:
    """Base class: ``fields`` in table order, ``parse`` (lenient: what the caption states) and
    ``strict`` (does the caption follow the grammar exactly). ``judge`` compares a reference's
    values with a prediction's: ``{field: True | False | None}``, None where the field is not
    scored for this reference. Subclasses override ``applies`` for fields that depend on the
    reference (e.g. lesion details only where the reference has a lesion)."""

    name = "base"
    fields: tuple = ()
    headers: Mapping = {}  # table headers of fields whose name does not read well; scores.json keeps the names

    def parse(self, text: str) -> dict:
        raise NotImplementedError

    def strict(self, text: str) -> Optional[dict]:
        """The values of a caption that follows the grammar exactly, else None."""
        raise NotImplementedError

    def applies(self, field: str, ref: Mapping) -> bool:
        return True

    def judge(self, ref: Mapping, pred: Mapping) -> dict:
        return {f: (pred.get(f) is not None and pred.get(f) == ref.get(f)) if self.applies(f, ref) else None
                for f in self.fields}


# --------------------------------------------------------------------------- the registry
_BY_SOURCE: dict = {}
_BY_PREDICATE: list = []
_plugins_loaded = False


def load_parser_plugins() -> None:
    """Call, once, every ``msmedcap.findings_parsers`` entry point (a function that registers parsers);
    a plugin that fails to load is an error naming it, not a silent fall-back to the lexicon."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=PARSER_ENTRY_POINTS):
        try:
            register = ep.load()
        except Exception as e:
            raise ImportError(f"findings parser entry point {ep.name} = {ep.value} ({PARSER_ENTRY_POINTS}) "
                              f"failed to load: {e}") from e
        register()


def register_parser(parser: FindingsParser, sources: Sequence[str] = (),
                    predicate: Optional[Callable[[Mapping], bool]] = None) -> FindingsParser:
    """Use ``parser`` for records of these sources, and/or for records (dicts with key, source,
    domain, references, prediction) where ``predicate(record)`` is true. A source entry wins over
    predicates; later predicates are tried after earlier ones. Returns the parser."""
    for s in sources:
        _BY_SOURCE[str(s)] = parser
    if predicate is not None:
        _BY_PREDICATE.append((predicate, parser))
    return parser


def parser_for(record: Mapping) -> Optional[FindingsParser]:
    """The record's parser, or None (then the lexicon scorer judges it)."""
    load_parser_plugins()
    parser = _BY_SOURCE.get(str(record.get("source")))
    if parser is not None:
        return parser
    for predicate, p in _BY_PREDICATE:
        if predicate(record):
            return p
    return None


def registered_parsers() -> list:
    """Every registered parser (plugins loaded), in registration order: by source, then by predicate."""
    load_parser_plugins()
    return list(_BY_SOURCE.values()) + [p for _, p in _BY_PREDICATE]


def registered_fields() -> list:
    """Every registered parser's fields, in registration order (the tables' column order)."""
    seen: list = []
    for p in registered_parsers():
        seen += [f for f in p.fields if f not in seen]
    return seen




# --------------------------------------------------------------------------- the lexicon
# Terms per category: each name is matched by any of its patterns (whole words, lower case). A
# combined word (PET/CT, CT angiography, MRA) names each modality it combines.
LEXICON = {
    "modality": {
        "ct": (r"\bct\b", r"\bcta\b", r"\bhrct\b", r"\bcbct\b", r"computed tomograph", r"\bcat scan"),
        "mri": (r"\bmri?\b", r"\bmra\b", r"magnetic resonance", r"\bt[12][- ]?weighted\b", r"\bflair\b",
                r"\bdiffusion[- ]weighted\b"),
        "x-ray": (r"\bx-?rays?\b", r"\bradiograph", r"\broentgenogra", r"\bplain films?\b"),
        "ultrasound": (r"\bultrasound", r"\bsonogra", r"\bultrasonogra", r"\bdoppler\b", r"\bechocardiogra"),
        "pet": (r"\bpet\b", r"positron emission"),
        "angiography": (r"\bangiogra", r"\barteriogra", r"\bvenogra", r"\bcta\b", r"\bmra\b", r"\bdsa\b"),
        "mammography": (r"\bmammogra",),
        "scintigraphy": (r"\bscintigra", r"\bspect\b", r"\bbone scan"),
        "fluoroscopy": (r"\bfluoroscop",),
    },
    "laterality": {
        "left": (r"\bleft\b",),
        "right": (r"\bright\b",),
        "bilateral": (r"\bbilateral(?:ly)?\b", r"\bboth sides\b"),
    },
}
_LEXICON_RX = {cat: {term: re.compile("|".join(pats)) for term, pats in terms.items()} for cat, terms in LEXICON.items()}


def lexicon_terms(text) -> dict:
    """{category: sorted terms} the text mentions."""
    t = normalize(text)
    return {cat: sorted(term for term, rx in terms.items() if rx.search(t)) for cat, terms in _LEXICON_RX.items()}


# --------------------------------------------------------------------------- per sample
def judge_record(record: Mapping) -> dict:
    """One record's findings: the parser's fields right/wrong (None: not scored) with both sides'
    values, or the lexicon's terms of reference and prediction."""
    refs = record.get("references") or []
    if isinstance(refs, str):
        refs = [refs]
    pred = record.get("prediction")
    parser = parser_for(record)
    if parser is None:
        ref_terms: dict = {cat: set() for cat in LEXICON}
        for r in refs:
            for cat, terms in lexicon_terms(r).items():
                ref_terms[cat].update(terms)
        pred_terms = lexicon_terms(pred)
        return {"parser": "lexicon",
                "lexicon": {cat: {"reference": sorted(ref_terms[cat]), "prediction": pred_terms[cat]} for cat in LEXICON}}
    ref_values = next((v for v in (parser.strict(r) for r in refs) if v is not None), None)
    pred_values = parser.parse(pred) if isinstance(pred, str) else {}
    out = {"parser": parser.name, "reference_parsed": ref_values is not None,
           "prediction_parsed": isinstance(pred, str) and parser.strict(pred) is not None,
           "reference": ref_values, "prediction": pred_values}
    out["fields"] = ({f: None for f in parser.fields} if ref_values is None else parser.judge(ref_values, pred_values))
    return out


def sample_verdicts(judged: Mapping) -> dict:
    """{field: True/False} for one judged sample (what the gallery marks right and wrong); lexicon
    categories are right when the prediction names exactly the reference's terms (and there are some)."""
    if judged.get("parser") == "lexicon":
        out = {}
        for cat, terms in judged["lexicon"].items():
            if terms["reference"] or terms["prediction"]:
                out[cat] = terms["reference"] == terms["prediction"]
        return out
    return {f: v for f, v in (judged.get("fields") or {}).items() if v is not None}


# --------------------------------------------------------------------------- aggregation
def _ratio(a: int, b: int) -> Optional[float]:
    return a / b if b else None


def prf(tp: int, fp: int, fn: int) -> dict:
    p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = None if p is None or r is None else (2 * p * r / (p + r) if p + r else 0.0)
    return {"precision": p, "recall": r, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def summarize(judged: Sequence[Mapping], predictions: Sequence) -> dict:
    """The findings block of one subset (see :func:`score_findings`)."""
    n = len(judged)
    fields: dict = {}
    parsers: dict = {}
    unparsed_refs = unparsed_preds = 0
    lex = {cat: [0, 0, 0] for cat in LEXICON}
    lex_n = 0
    order = registered_fields()
    for j in judged:
        parsers[j["parser"]] = parsers.get(j["parser"], 0) + 1
        if j["parser"] == "lexicon":
            lex_n += 1
            for cat, terms in j["lexicon"].items():
                ref, pred = set(terms["reference"]), set(terms["prediction"])
                lex[cat][0] += len(ref & pred)
                lex[cat][1] += len(pred - ref)
                lex[cat][2] += len(ref - pred)
            continue
        unparsed_refs += not j["reference_parsed"]
        unparsed_preds += not j["prediction_parsed"]
        for f, v in j["fields"].items():
            c = fields.setdefault(f, [0, 0])
            if v is not None:
                c[0] += bool(v)
                c[1] += 1
    ordered = sorted(fields, key=lambda f: (order.index(f) if f in order else len(order), f))
    distinct = len({str(p) for p in predictions})
    return {
        "n": n,
        "distinct_predictions": {"count": distinct, "share": _ratio(distinct, n)},
        "fields": {f: {"accuracy": _ratio(*fields[f]), "correct": fields[f][0], "n": fields[f][1]} for f in ordered},
        "unparsed_references": unparsed_refs,
        "unparsed_predictions": unparsed_preds,
        "parsers": dict(sorted(parsers.items())),
        "lexicon": {"n": lex_n, **{cat: prf(*lex[cat]) for cat in LEXICON}},
    }


def score_findings(records: Sequence[Mapping], groups: Optional[Mapping[str, Mapping[str, Sequence[str]]]] = None) -> dict:
    """Findings of records (key, references, prediction, source[, domain]), overall and per group
    (as :func:`msmedcap.eval.scoring.group_keys` gives them).

    Returns ``{"overall": block, "domain": {name: block}, "source": {...}, "per_sample": {key: judged}}``,
    a block being ``{"n", "distinct_predictions": {"count", "share"}, "fields": {field: {"accuracy",
    "correct", "n"}}, "unparsed_references", "unparsed_predictions", "parsers": {name: samples},
    "lexicon": {"n", "modality": {"precision", "recall", "f1", "tp", "fp", "fn"}, "laterality": {...}}}``.
    A field's ``n`` counts the samples it was scored on; ``accuracy`` is None where that is 0, as are
    precision/recall/F1 without any term on the side they divide by.
    """
    judged = {str(r["key"]): judge_record(r) for r in records}
    preds = {str(r["key"]): r.get("prediction") for r in records}

    def block(keys):
        keys = [str(k) for k in keys]
        return summarize([judged[k] for k in keys], [preds[k] for k in keys])

    out = {"overall": block(list(judged))}
    for group, members in (groups or {}).items():
        out[group] = {name: block(keys) for name, keys in sorted(members.items())}
    out["per_sample"] = judged
    return out


# --------------------------------------------------------------------------- display helpers
def field_header(field: str) -> str:
    for p in registered_parsers():
        if field in p.headers:
            return p.headers[field]
    return field.replace("_", " ")


def table_fields(blocks: Iterable[Optional[Mapping]]) -> list:
    """Fields scored on at least one sample in any of these blocks, in table order."""
    order = registered_fields()
    found = {f for b in blocks if b for f, s in (b.get("fields") or {}).items() if s.get("n")}
    return sorted(found, key=lambda f: (order.index(f) if f in order else len(order), f))


def has_lexicon(blocks: Iterable[Optional[Mapping]]) -> bool:
    return any(b and (b.get("lexicon") or {}).get("n") for b in blocks)
