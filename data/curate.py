"""Data curation for RL prompts and SFT sets: decontamination against the eval sets, deduplication.

    python -m data.curate decontaminate --data IN --out OUT --against math500,aime24,aime25 [--ngram 8]
    python -m data.curate dedup --data IN --out OUT [--column problem]

Both read JSONL or Parquet (suffix .parquet) and write the same format (by OUT's suffix), every kept
row unchanged with all its columns, in input order; the output appears atomically (written beside
OUT, then renamed). A summary of what was dropped and why is printed and written to
`OUT.curate.json`.

- The problem text is `--column` (default: the first of problem, question, prompt a row has, as the
  eval sets read it); a file whose rows lack it is an error naming the file, the row and the column.
- Normalisation (both commands): lower case, LaTeX spacing commands (`\\,` `\\;` `\\!` `\\quad`
  `~`, `\\left` / `\\right`) and `$` removed, every run of whitespace one space, punctuation split
  off as words of its own. Words are then runs of letters and digits, or single other characters.
- decontaminate: a row is dropped when its problem shares a word n-gram (`--ngram`, default 8,
  as Open-R1's decontamination) with a problem of any `--against` set (benchmark names, found as
  the eval stage finds them: --data-dir / R1_DATA_DIR / ../shared/data; or files; all-math,
  all-code and all stand for their sets). A problem
  shorter than n words is matched whole. The summary lists, per eval set, which of its items were
  hit and by how many rows.
- dedup: a row is dropped when its problem equals an earlier row's exactly, or after normalisation;
  the summary counts each kind.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from data.datasets import _PROBLEM_COLUMNS as PROBLEM_COLUMNS
from data.datasets import EVAL_GROUPS, _iter_located, load_eval_set
from runtime.metrics import Progress

_LATEX_SPACING = re.compile(r"\\[,;:! ]|\\q?quad\b|\\left\b|\\right\b|~|\$")
_WORD = re.compile(r"[^\W_]+|[^\w\s]", re.UNICODE)


def normalise(text: str) -> str:
    """The comparison form of a problem (module docstring)."""
    text = _LATEX_SPACING.sub(" ", text.lower())
    return " ".join(_WORD.findall(text))


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The word n-grams of normalise(text); a text of fewer than n words is one n-gram, itself."""
    words = normalise(text).split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def problem_of(row: dict, where: str, column: str | None) -> str:
    """The row's problem text: `column`, else the first of PROBLEM_COLUMNS it has; ValueError naming
    the place (file and row) and the column."""
    names = (column,) if column else PROBLEM_COLUMNS
    for name in names:
        if isinstance(row.get(name), str):
            return row[name]
    raise ValueError(f"{where}: no {'column ' + repr(column) if column else 'problem column (' + ', '.join(PROBLEM_COLUMNS) + ')'} "
                     f"holding a string; the row's columns are {', '.join(sorted(row)) or 'none'}")


def decontaminate(rows, against: dict[str, list[dict]], n: int = 8, column: str | None = None):
    """(kept rows, report) for rows = [(where, row)] against {set label: eval rows}."""
    index: dict[tuple[str, ...], list[tuple[str, str]]] = {}
    for label, items in against.items():
        for item in items:
            for g in ngrams(item["problem"], n):
                index.setdefault(g, []).append((label, item["id"]))
    kept, dropped, hits = [], 0, {label: {} for label in against}
    progress = Progress(len(rows), desc="decontaminate", unit="row", every_s=10.0)
    for where, row in rows:
        progress.update(1)
        found = {ref for g in ngrams(problem_of(row, where, column), n) for ref in index.get(g, ())}
        if not found:
            kept.append(row)
            continue
        dropped += 1
        for label, item_id in found:
            hits[label][item_id] = hits[label].get(item_id, 0) + 1
    report = {"ngram": n, "rows": len(kept) + dropped, "kept": len(kept), "dropped": dropped,
              "against": {label: {"items": len(items), "items_hit": len(hits[label]),
                                  "hit": dict(sorted(hits[label].items()))} for label, items in against.items()}}
    return kept, report


def dedup(rows, column: str | None = None):
    """(kept rows, report): rows = [(where, row)] without exact or normalised repeats of a problem."""
    exact, norm, kept = set(), set(), []
    counts = {"exact": 0, "normalised": 0}
    progress = Progress(len(rows), desc="dedup", unit="row", every_s=10.0)
    for where, row in rows:
        progress.update(1)
        text = problem_of(row, where, column)
        if text in exact:
            counts["exact"] += 1
            continue
        key = normalise(text)
        if key in norm:
            counts["normalised"] += 1
            continue
        exact.add(text)
        norm.add(key)
        kept.append(row)
    return kept, {"rows": len(kept) + sum(counts.values()), "kept": len(kept), "dropped": sum(counts.values()),
                  "duplicates": counts}


def write_rows(rows: list[dict], out: Path) -> None:
    """rows to OUT (Parquet by suffix, else JSONL), written beside it and renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if out.suffix == ".parquet":
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq
            except ImportError:
                raise ImportError(f"{out}: writing Parquet files needs pyarrow (pip install pyarrow), or give --out "
                                  f"a .jsonl name") from None
            pq.write_table(pa.Table.from_pylist(rows), tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _eval_sets(names: str, data_dir: str | None) -> dict[str, list[dict]]:
    out = {}
    for part in (s.strip() for s in names.split(",")):
        for name in EVAL_GROUPS.get(part, (part,) if part else ()):   # all-math, all-code, all
            out[Path(name).stem if Path(name).suffix else name] = load_eval_set(name, data_dir)
    if not out:
        raise ValueError(f"--against {names!r}: expected eval set names or files, comma-separated")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.curate", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("decontaminate", "dedup"):
        s = sub.add_parser(name)
        s.add_argument("--data", required=True, help="input JSONL or Parquet")
        s.add_argument("--out", required=True, help="output file (its suffix chooses the format)")
        s.add_argument("--column", default=None, help="the problem column (default: problem, question or prompt)")
        if name == "decontaminate":
            s.add_argument("--against", required=True, help="eval sets (names or files), comma-separated")
            s.add_argument("--ngram", type=int, default=8, help="words per shared n-gram that marks a row")
            s.add_argument("--data-dir", default=None, help="where the named eval sets are (default: R1_DATA_DIR, "
                           "../shared/data)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        if Path(args.out).resolve() == Path(args.data).resolve():
            raise ValueError(f"--out {args.out} is the input file; write the curated rows elsewhere")
        rows = list(_iter_located(args.data))
        if args.command == "decontaminate":
            if args.ngram < 1:
                raise ValueError(f"--ngram {args.ngram}: expected >= 1")
            kept, report = decontaminate(rows, _eval_sets(args.against, args.data_dir), args.ngram, args.column)
        else:
            kept, report = dedup(rows, args.column)
    except (ValueError, FileNotFoundError) as e:
        print(f"data.curate: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    write_rows(kept, out)
    report = {"command": args.command, "data": str(args.data), "out": str(out), **report,
              "seconds": round(time.perf_counter() - t0, 2)}
    Path(f"{out}.curate.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"{args.command}: {report['rows']} rows, kept {report['kept']}, dropped {report['dropped']} -> {out}")
    if args.command == "decontaminate":
        for label, r in report["against"].items():
            print(f"  {label}: {r['items_hit']} of {r['items']} items hit"
                  + (f" ({', '.join(list(r['hit'])[:10])}{', ...' if len(r['hit']) > 10 else ''})" if r["hit"] else ""))
    else:
        print(f"  exact duplicates {report['duplicates']['exact']}, normalised {report['duplicates']['normalised']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
