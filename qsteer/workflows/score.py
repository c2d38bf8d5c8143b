"""Score given completions without generating: each record has `prompt` and `completion`."""

from __future__ import annotations

from qsteer.workflows.common import Context, Stats, candidate, result, reward_error, score


def run(records: list[dict], ctx: Context) -> list[dict]:
    stats = Stats()
    missing = [r["id"] for r in records if not isinstance(r.get("completion"), str)]
    ok = [r for r in records if isinstance(r.get("completion"), str)]
    scored = dict(zip([r["id"] for r in ok], score(ok, [[r["completion"]] for r in ok], ctx, stats), strict=True))
    out = []
    for record in records:
        per_record = stats.as_dict(len(records)) | {"generated_tokens": 0}
        if record["id"] in missing:
            err = "record has no string field 'completion' (workflow=score needs prompt and completion)"
            out.append(result(record, None, None, [], per_record, err))
            continue
        reward, info = scored[record["id"]][0]
        out.append(
            result(record, record["completion"], reward, [candidate(record["completion"], reward, info)],
                   per_record, reward_error(scored[record["id"]]))
        )
    return out
