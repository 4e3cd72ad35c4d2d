"""gallery.html: one self-contained page (thumbnails embedded as base64 JPEG, a little inline JS) of
images with their reference and generated captions and per-sample scores; sortable by any score,
filterable by domain, source, minimum score and text. Opens in any browser, no network."""
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
"""

_SCRIPT = """
const rows=[...document.querySelectorAll('#samples tbody tr')];
const body=document.querySelector('#samples tbody');
function apply(){
  const metric=document.getElementById('sort').value, dir=document.getElementById('dir').value;
  const dom=document.getElementById('domain').value, src=document.getElementById('source').value;
  const min=parseFloat(document.getElementById('min').value), text=document.getElementById('text').value.toLowerCase();
  const val=r=>{const v=parseFloat(r.dataset[metric]);return isNaN(v)?-Infinity:v};
  rows.sort((a,b)=>metric==='key'?a.dataset.key.localeCompare(b.dataset.key):(val(a)-val(b)));
  if(dir==='desc')rows.reverse();
  let shown=0;
  for(const r of rows){
    const ok=(!dom||r.dataset.domain===dom)&&(!src||r.dataset.source===src)
      &&(isNaN(min)||metric==='key'||val(r)>=min)&&(!text||r.textContent.toLowerCase().includes(text));
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


def render_gallery(records: Sequence[dict], title: str = "msmedcap gallery", summary: Optional[str] = None) -> str:
    """records: dicts with key, source, domain, references, prediction, scores ({metric: value}) and
    optionally thumbnail (base64 JPEG). Returns the HTML page as a string."""
    metrics = [m for m in GALLERY_METRICS if any((r.get("scores") or {}).get(m) is not None for r in records)]
    esc = html.escape
    rows = []
    for r in records:
        scores = r.get("scores") or {}
        data = "".join(f' data-{m.lower()}="{scores[m]:.6f}"' for m in metrics if scores.get(m) is not None)
        img = (f'<img alt="{esc(str(r["key"]))}" src="data:image/jpeg;base64,{r["thumbnail"]}">'
               if r.get("thumbnail") else "")
        refs = "".join(f'<div class="ref">{esc(c)}</div>' for c in r.get("references", []))
        cells = "".join(f'<td class="score">{scores[m]:.3f}</td>' if scores.get(m) is not None else '<td class="score">-</td>'
                        for m in metrics)
        rows.append(
            f'<tr data-key="{esc(str(r["key"]))}" data-domain="{esc(str(r.get("domain", "")))}" '
            f'data-source="{esc(str(r.get("source", "")))}"{data}>'
            f'<td>{img}</td><td><div class="pred">{esc(r.get("prediction", ""))}</div>{refs}'
            f'<div class="meta">{esc(str(r["key"]))} · {esc(str(r.get("source", "")))} · '
            f'{esc(str(r.get("domain", "")))}</div></td>{cells}</tr>')
    domains = sorted({str(r.get("domain", "")) for r in records})
    sources = sorted({str(r.get("source", "")) for r in records})
    sort_opts = "".join(f'<option value="{m.lower()}">{m}</option>' for m in metrics) + '<option value="key">key</option>'
    head = "".join(f'<th class="score">{m}</th>' for m in metrics)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{_STYLE}</style></head>
<body><h1>{esc(title)}</h1>{f'<p>{esc(summary)}</p>' if summary else ''}
<div id="controls">
<label>sort by <select id="sort">{sort_opts}</select></label>
<label><select id="dir"><option value="asc">ascending</option><option value="desc">descending</option></select></label>
<label>domain <select id="domain">{_options(domains, 'all')}</select></label>
<label>source <select id="source">{_options(sources, 'all')}</select></label>
<label>min score <input id="min" type="number" step="0.05" style="width:5em"></label>
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
