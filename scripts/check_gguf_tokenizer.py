#!/usr/bin/env python3
"""Reference tokenization of the task files with a GGUF model's own tokenizer, independent of dejavu's Rust code.

For every text string of every task file (*.jsonl in --tasks) it writes one JSON line
    {"file": ..., "line": N, "field": ..., "text": ..., "ids": [...]}
to --out. Strings are taken as they appear (each query, choice, context option, continuation, context); for the
fields that are scored as continuations (choices, continuation) the text with one leading space is written too,
under the field name with a "+space" suffix, since that is how a scorer appends them to a context.

The ids come from llama.cpp's tokenizer (llama-cpp-python, `Llama(model_path, vocab_only=True).tokenize(text,
add_bos=False, special=False)`) or, with --impl transformers, from transformers' GGUF tokenizer conversion
(`AutoTokenizer.from_pretrained(dir, gguf_file=name)`, encode without special tokens).

The Rust test `gguf::tests::smollm2_tokenizer_matches_reference` reads the output through the environment
variable DEJAVU_TOKENIZER_REF and compares it with `GgufFile::tokenizer()`. See README-tokenizer-check.md.
"""

import argparse
import glob
import json
import os
import sys

# Fields whose text is appended to a context when scoring: also checked with a leading space.
CONTINUATION_FIELDS = {"choices", "continuation"}


def load_llama_cpp(gguf):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf, vocab_only=True, verbose=False)

    def tokenize(text):
        if not text:
            return []
        return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    return tokenize, f"llama-cpp-python {llama_cpp.__version__}"


def load_transformers(gguf):
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf)), gguf_file=os.path.basename(gguf))

    def tokenize(text):
        return list(tok.encode(text, add_special_tokens=False))

    return tokenize, f"transformers {transformers.__version__} (GGUF conversion)"


def strings_of(record):
    """(field, text) for every text string of a task record."""
    for key, value in record.items():
        if isinstance(value, str):
            yield key, value
            if key in CONTINUATION_FIELDS:
                yield key + "+space", " " + value
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, str):
                    yield f"{key}[{i}]", item
                    if key in CONTINUATION_FIELDS:
                        yield f"{key}[{i}]+space", " " + item


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="path to the .gguf model")
    ap.add_argument("--tasks", required=True, help="directory of task *.jsonl files")
    ap.add_argument("--out", required=True, help="output JSONL of reference ids")
    ap.add_argument("--impl", choices=["auto", "llama-cpp", "transformers"], default="auto")
    args = ap.parse_args()

    tokenize = None
    errors = []
    for impl, loader in (("llama-cpp", load_llama_cpp), ("transformers", load_transformers)):
        if args.impl not in ("auto", impl):
            continue
        try:
            tokenize, name = loader(args.gguf)
            break
        except Exception as e:  # noqa: BLE001 - report and try the next implementation
            errors.append(f"{impl}: {e!r}")
    if tokenize is None:
        sys.exit("no reference tokenizer available: " + "; ".join(errors))

    files = sorted(glob.glob(os.path.join(args.tasks, "*.jsonl")))
    if not files:
        sys.exit(f"no *.jsonl files in {args.tasks}")
    total = 0
    with open(args.out, "w", encoding="utf-8") as out:
        for path in files:
            fname = os.path.basename(path)
            n = 0
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    for field, text in strings_of(record):
                        ids = tokenize(text)
                        out.write(json.dumps({"file": fname, "line": line_no, "field": field, "text": text,
                                              "ids": ids}, ensure_ascii=False) + "\n")
                        n += 1
            print(f"{fname}: {n} strings", file=sys.stderr)
            total += n
    print(f"reference: {name}; {total} strings from {len(files)} files -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
