"""Score given completions without generating: each record has `prompt` and `completion`."""

from __future__ import annotations

from qsteer.workflows.common import Context, Stats, assemble, score


def run(records: list[dict], ctx: Context) -> list[dict]:
    stats = Stats()
    has = [isinstance(r.get("completion"), str) for r in records]
    texts = [[r["completion"]] if ok else [] for r, ok in zip(records, has, strict=True)]
    errors = [None if ok else "record has no string field 'completion' (workflow=score needs prompt and completion)"
              for ok in has]
    scored = score(records, texts, ctx, stats)
    return assemble(records, [t if ok else None for t, ok in zip(texts, has, strict=True)], errors, scored, stats)
