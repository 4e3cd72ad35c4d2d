"""gallery.html: one self-contained page (thumbnails embedded as base64 JPEG, a little inline JS) of
images with their reference and generated captions, per-sample scores and findings (which fields
the prediction got right or wrong); sortable by any score or the share of findings right,
filterable by domain, source, minimum score, a field right/wrong and text. Opens in any browser,
no network."""
from __future__ import annotations

import base64
import html
import io
from typing import Optional, Sequence

GALLERY_METRICS = ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L", "SPICE")
THUMB_SIZE = 128


def thumbnail_b64(image, size: int = THUMB_SIZE, quality: int = 80) -> str:
    """PIL image -> base64 JPEG no larger than size x size."""
    im = image.convert("RGB")
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode("ascii")


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1em;background:#fafafa;color:#222}
#controls{position:sticky;top:0;background:#fafafa;padding:.5em 0;border-bottom:1px solid #ccc}
#controls label{margin-right:1em}
table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #ddd;padding:.4em;vertical-align:top;text-align:left}
th.score,td.score{text-align:right;font-variant-numeric:tabular-nums}
img{width:128px;image-rendering:pixelated;background:#000}
.pred{font-weight:600}.ref{color:#555}.meta{color:#888;font-size:.85em}
.f{display:inline-block;margin:.15em .3em 0 0;padding:0 .35em;border-radius:.3em;font-size:.85em}
.f.ok{background:#d7f0d7;color:#185c18}.f.bad{background:#f6d5d5;color:#8a1c1c}
#findings td,#findings th{text-align:right;padding:.2em .6em}#findings{width:auto;margin-bottom:1em}
"""

_SCRIPT = """
const rows=[...document.querySelectorAll('#samples tbody tr')];
const body=document.querySelector('#samples tbody');
function apply(){
  const metric=document.getElementById('sort').value, dir=document.getElementById('dir').value;
  const dom=document.getElementById('domain').value, src=document.getElementById('source').value;
  const min=parseFloat(document.getElementById('min').value), text=document.getElementById('text').value.toLowerCase();
  const fsel=document.getElementById('field').value, [fkind,fname]=fsel.split(':');
  const has=(r,k,f)=>(r.dataset[k]||'').split(' ').includes(f);
  const fok=r=>!fsel||(fkind==='anywrong'?!!r.dataset.wrong:fkind==='allright'?(!r.dataset.wrong&&!!r.dataset.right)
    :has(r,fkind,fname));
  const val=r=>{const v=parseFloat(r.dataset[metric]);return isNaN(v)?-Infinity:v};
  rows.sort((a,b)=>metric==='key'?a.dataset.key.localeCompare(b.dataset.key):(val(a)-val(b)));
  if(dir==='desc')rows.reverse();
  let shown=0;
  for(const r of rows){
    const ok=(!dom||r.dataset.domain===dom)&&(!src||r.dataset.source===src)
      &&(isNaN(min)||metric==='key'||val(r)>=min)&&(!text||r.textContent.toLowerCase().includes(text))&&fok(r);
    r.style.display=ok?'':'none'; if(ok)shown++; body.appendChild(r);
  }
  document.getElementById('count').textContent=shown+' / '+rows.length+' shown';
}
document.querySelectorAll('#controls select,#controls input').forEach(e=>e.addEventListener('input',apply));
apply();
"""


def _options(values: Sequence[str], all_label: str) -> str:
    opts = [f'<option value="">{all_label}</option>']
    opts += [f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in values]
    return "".join(opts)


def _chips(judged: Optional[dict]) -> str:
    """One sample's findings as marks: field right (green) or wrong (red); for the lexicon, the terms
    of reference and prediction per category."""
    from msmedcap.eval.findings import field_header, sample_verdicts

    if not judged:
        return ""
    esc = html.escape
    verdicts = sample_verdicts(judged)
    if judged.get("parser") == "lexicon":
        parts = []
        for cat, terms in judged["lexicon"].items():
            if cat in verdicts:
                ref, pred = ", ".join(terms["reference"]) or "none", ", ".join(terms["prediction"]) or "none"
                parts.append(f'<span class="f {"ok" if verdicts[cat] else "bad"}">{esc(cat)}: ref {esc(ref)} · '
                             f'pred {esc(pred)}</span>')
        return f'<div class="findings">{"".join(parts)}</div>' if parts else ""
    pred = judged.get("prediction") or {}
    parts = []
    for f, ok in verdicts.items():
        said = pred.get(f)
        said = "not stated" if said is None else (" and ".join(" ".join(map(str, g)) for g in said)
                                                  if isinstance(said, list) else str(said))
        mark = "\u2713" if ok else "\u2717"
        parts.append(f'<span class="f {"ok" if ok else "bad"}" title="prediction: {esc(said)}">{mark} '
                     f'{esc(field_header(f))}</span>')
    if not judged.get("reference_parsed", True):
        parts.append('<span class="f bad">reference does not parse</span>')
    return f'<div class="findings">{"".join(parts)}</div>' if parts else ""


def _findings_summary(scores: Optional[dict]) -> str:
    """The findings table (overall, per domain) at the top of the page."""
    from msmedcap.eval.report import findings_columns, fmt_share

    if not scores or not (scores.get("overall") or {}).get("findings"):
        return ""
    rows = [("overall", scores["overall"]["findings"])]
    rows += [(f"domain: {d}", s["findings"]) for d, s in (scores.get("domain") or {}).items() if s.get("findings")]
    cols = findings_columns((b for _, b in rows), lexicon="prf")
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for _, h, _ in cols)
    body = "".join(f"<tr><th>{esc(label)}</th><td>{b['n']}</td>" + "".join(f"<td>{fmt_share(get(b))}</td>" for _, _, get in cols)
                   + "</tr>" for label, b in rows)
    return (f'<table id="findings"><thead><tr><th>findings accuracy</th><th>n</th>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def render_gallery(records: Sequence[dict], title: str = "msmedcap gallery", summary: Optional[str] = None,
                   scores: Optional[dict] = None) -> str:
    """records: dicts with key, source, domain, references, prediction, scores ({metric: value}),
    optionally findings (msmedcap.eval.findings.judge_record's verdicts) and thumbnail (base64 JPEG).
    ``scores``: the run's scores (as in scores.json) for the findings table at the top.
    Returns the HTML page as a string."""
    from msmedcap.eval.findings import field_header, sample_verdicts

    run_scores = scores
    metrics = [m for m in GALLERY_METRICS if any((r.get("scores") or {}).get(m) is not None for r in records)]
    verdicts = {str(r["key"]): sample_verdicts(r["findings"]) for r in records if r.get("findings")}
    fields = []
    for v in verdicts.values():
        fields += [f for f in v if f not in fields]
    esc = html.escape
    rows = []
    for r in records:
        scores = r.get("scores") or {}
        data = "".join(f' data-{m.lower()}="{scores[m]:.6f}"' for m in metrics if scores.get(m) is not None)
        v = verdicts.get(str(r["key"]), {})
        if v:
            data += (f' data-findings="{sum(v.values()) / len(v):.6f}" data-right="{" ".join(f for f, ok in v.items() if ok)}"'
                     f' data-wrong="{" ".join(f for f, ok in v.items() if not ok)}"')
        img = (f'<img alt="{esc(str(r["key"]))}" src="data:image/jpeg;base64,{r["thumbnail"]}">'
               if r.get("thumbnail") else "")
        refs = "".join(f'<div class="ref">{esc(c)}</div>' for c in r.get("references", []))
        cells = "".join(f'<td class="score">{scores[m]:.3f}</td>' if scores.get(m) is not None else '<td class="score">-</td>'
                        for m in metrics)
        findings_cell = ""
        if fields:
            findings_cell = (f'<td class="score">{sum(v.values())}/{len(v)}</td>' if v else '<td class="score">-</td>')
        rows.append(
            f'<tr data-key="{esc(str(r["key"]))}" data-domain="{esc(str(r.get("domain", "")))}" '
            f'data-source="{esc(str(r.get("source", "")))}"{data}>'
            f'<td>{img}</td><td><div class="pred">{esc(r.get("prediction", ""))}</div>{refs}'
            f'{_chips(r.get("findings"))}'
            f'<div class="meta">{esc(str(r["key"]))} · {esc(str(r.get("source", "")))} · '
            f'{esc(str(r.get("domain", "")))}</div></td>{cells}{findings_cell}</tr>')
    domains = sorted({str(r.get("domain", "")) for r in records})
    sources = sorted({str(r.get("source", "")) for r in records})
    sort_opts = "".join(f'<option value="{m.lower()}">{m}</option>' for m in metrics)
    if fields:
        sort_opts += '<option value="findings">findings right (share)</option>'
    sort_opts += '<option value="key">key</option>'
    head = "".join(f'<th class="score">{m}</th>' for m in metrics) + ('<th class="score">findings right</th>' if fields else "")
    field_opts = '<option value="">all</option>'
    if fields:
        field_opts += '<option value="anywrong:">any field wrong</option><option value="allright:">all fields right</option>'
        for f in fields:
            field_opts += (f'<option value="wrong:{esc(f)}">{esc(field_header(f))} wrong</option>'
                           f'<option value="right:{esc(f)}">{esc(field_header(f))} right</option>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{_STYLE}</style></head>
<body><h1>{esc(title)}</h1>{f'<p>{esc(summary)}</p>' if summary else ''}{_findings_summary(run_scores)}
<div id="controls">
<label>sort by <select id="sort">{sort_opts}</select></label>
<label><select id="dir"><option value="asc">ascending</option><option value="desc">descending</option></select></label>
<label>domain <select id="domain">{_options(domains, 'all')}</select></label>
<label>source <select id="source">{_options(sources, 'all')}</select></label>
<label>min score <input id="min" type="number" step="0.05" style="width:5em"></label>
<label>findings <select id="field">{field_opts}</select></label>
<label>text <input id="text" type="search"></label>
<span id="count"></span></div>
<table id="samples"><thead><tr><th>image</th><th>generated (bold) / reference captions</th>{head}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_gallery(path, records: Sequence[dict], **kwargs) -> None:
    from msmedcap.atomic_files import atomic_write_text

    atomic_write_text(path, render_gallery(records, **kwargs))
