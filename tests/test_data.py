"""Dataset loaders: the shipped sets load whole, and malformed JSONL fails at its line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qsteer.data import DATASETS, DatasetError, load_dataset, prompt_text


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_humaneval_loads_all_problems_with_tests() -> None:
    records = load_dataset("humaneval")
    assert len(records) == 164
    assert len({r["id"] for r in records}) == 164
    first = records[0]
    assert first["id"] == "HumanEval/0"
    assert first["entry_point"] == "has_close_elements"
    for record in records:
        assert "def check(candidate)" in record["test"]
        assert f"def {record['entry_point']}" in record["prompt_code"]
        assert record["canonical_solution"].strip()
        # The chat prompt carries the signature and docstring in a python fence.
        assert record["prompt"].index("```python\n") < record["prompt"].index(record["prompt_code"].strip())
        assert record["prompt"].rstrip().endswith("```")


def test_humaneval_canonical_solution_passes_its_test() -> None:
    # Ties the fields together: prompt_code + canonical_solution + test is a working program.
    record = load_dataset("humaneval", limit=1)[0]
    namespace: dict = {}
    exec(record["prompt_code"] + record["canonical_solution"] + record["test"], namespace)
    namespace["check"](namespace[record["entry_point"]])


def test_sentiment_set_is_large_unique_and_neutral() -> None:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    records = load_dataset("sentiment")
    assert len(records) >= 60
    assert len({r["id"] for r in records}) == len(records)
    assert len({r["opening"] for r in records}) == len(records)
    assert {r["kind"] for r in records} == {"review", "story", "letter"}
    for record in records:
        assert f'"{record["opening"]}"' in record["prompt"]
        assert record["prompt"].startswith("Continue this ")
        score = analyzer.polarity_scores(record["opening"])["compound"]
        assert -0.3 <= score <= 0.3, (record["id"], score, record["opening"])


def test_limit_keeps_first_records() -> None:
    everything = load_dataset("sentiment")
    assert load_dataset("sentiment", limit=5) == everything[:5]
    assert load_dataset("sentiment", limit=0) == []
    assert len(load_dataset("humaneval", limit=3)) == 3
    with pytest.raises(DatasetError):
        load_dataset("sentiment", limit=-1)


def test_jsonl_loads_prompts_and_messages_and_keeps_fields(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "mixed.jsonl",
        [
            json.dumps({"id": "a", "prompt": "Say hi.", "tests": ["assert True"], "extra": {"x": 1}}),
            "",
            "   ",
            json.dumps(
                {
                    "id": 7,
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "First question"},
                        {"role": "assistant", "content": "Answer"},
                        {"role": "user", "content": "Follow-up"},
                    ],
                }
            ),
            json.dumps({"prompt": "No id here."}),
        ],
    )
    records = load_dataset("jsonl", path=str(path))
    assert [r["id"] for r in records] == ["a", "7", "5"]  # the missing id is its line number
    assert records[0]["tests"] == ["assert True"] and records[0]["extra"] == {"x": 1}
    assert [prompt_text(r) for r in records] == ["Say hi.", "Follow-up", "No id here."]
    assert load_dataset("jsonl", path=str(path), limit=1) == records[:1]


@pytest.mark.parametrize(
    "lines, fragment",
    [
        (
            ['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": "y"}', '{"id": "c", "prompt": '],
            "invalid JSON",
        ),
        (['{"id": "a", "prompt": "x"}', "", '["not", "an", "object"]'], "JSON object"),
        (
            ['{"id": "a", "prompt": "x"}', "", '{"id": "b", "text": "no prompt"}'],
            "neither 'prompt' nor 'messages'",
        ),
        (['{"id": "a", "prompt": "x"}', "", '{"id": "b", "messages": "hello"}'], "'messages'"),
        (['{"id": "a", "prompt": "x"}', "", '{"id": "b", "messages": [{"role": "user"}]}'], "messages[0]"),
        (
            [
                '{"id": "a", "prompt": "x"}',
                "",
                '{"id": "b", "messages": [{"role": "system", "content": "s"}]}',
            ],
            "role 'user'",
        ),
        (['{"id": "a", "prompt": "x"}', "", '{"id": "b", "prompt": 3}'], "'prompt' must be a string"),
        (['{"id": "a", "prompt": "x"}', "", '{"id": null, "prompt": "y"}'], "'id'"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, lines: list[str], fragment: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DatasetError) as caught:
        load_dataset("jsonl", path=str(path))
    message = str(caught.value)
    assert f"{path}:3" in message
    assert fragment in message


def test_jsonl_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "dup.jsonl",
        ['{"id": "x", "prompt": "a"}', '{"id": "y", "prompt": "b"}', '{"id": "x", "prompt": "c"}'],
    )
    with pytest.raises(DatasetError, match=r"dup\.jsonl:3: duplicate id 'x' \(first seen on line 1\)"):
        load_dataset("jsonl", path=str(path))


def test_missing_file_unknown_name_and_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(DatasetError, match="nowhere.jsonl"):
        load_dataset("jsonl", path=str(missing))
    # Even when nothing would be read, a wrong path is reported.
    with pytest.raises(DatasetError, match="nowhere.jsonl"):
        load_dataset("jsonl", path=str(missing), limit=0)
    with pytest.raises(DatasetError, match="needs a path"):
        load_dataset("jsonl")
    with pytest.raises(DatasetError) as caught:
        load_dataset("imdb")
    assert "'imdb'" in str(caught.value)
    for name in DATASETS:
        assert name in str(caught.value)
    with pytest.raises(DatasetError, match="humaneval"):
        load_dataset("humaneval", shuffle=True)


def test_humaneval_instruction_option() -> None:
    record = load_dataset("humaneval", limit=1, instruction="Finish this:")[0]
    assert record["prompt"].startswith("Finish this:\n\n```python\n")


def test_datasets_is_a_registry_not_a_chain() -> None:
    assert set(DATASETS) >= {"sentiment", "humaneval", "jsonl"}
    assert all(callable(loader) for loader in DATASETS.values())
