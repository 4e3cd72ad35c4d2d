"""The gallery's HTML as the tests read it: rows, images, options, scripts (an html.parser walk)."""
from __future__ import annotations

from html.parser import HTMLParser


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.imgs, self.options, self.scripts, self.stack, self.text = [], [], [], 0, [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in ("img", "input", "meta"):
            self.stack.append(tag)
        if tag == "tr" and "data-key" in a:
            self.rows.append(a)
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "option":
            self.options.append(a.get("value"))
        self.scripts += tag == "script"

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> (open: {self.stack[-3:]})"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)
