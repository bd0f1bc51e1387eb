#!/usr/bin/env python3
"""A prompt set for `dejavu generate --prompts`: the lines of TinyStories (../shared/data/text/tinystories-sample.txt)
and then the first sentence of each WikiText-2 test paragraph (headings skipped), one prompt per line, N in all.
Usage: make_prompts.py [N] > prompts.txt   (N defaults to 200; DEJAVU_SHARED overrides ../shared)
"""
import os, re, sys

n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
shared = os.environ.get("DEJAVU_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
text = os.path.join(shared, "data", "text")
out = []
for line in open(os.path.join(text, "tinystories-sample.txt"), encoding="utf-8"):
    line = line.strip()
    if len(line) > 8 and "<|endoftext|>" not in line:
        out.append(line)
for line in open(os.path.join(text, "wikitext2-test.raw.txt"), encoding="utf-8"):
    line = line.strip()
    if len(line) <= 8 or line.startswith("="):
        continue
    # WikiText-2 writes a sentence end as " . "; keep the paragraph's first sentence.
    first = re.split(r"(?<= \.) ", line, maxsplit=1)[0]
    if len(first.split()) >= 4:
        out.append(first)
if len(out) < n:
    sys.exit(f"only {len(out)} prompts available, {n} asked")
print("\n".join(out[:n]))
