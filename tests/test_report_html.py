"""qsteer-report's HTML pages, rendered in headless Chromium and read back from the browser's DOM.

A run folder, a sweep folder and a frontier, all from real runs (run_job on the tiny model,
in-process). Chromium loads each page from disk, runs its inline script, and dumps the DOM as it
then stands: the tables are counted and their numbers compared with the run's files, and each
plot's `data-width` is the width the browser decoded it to (0 for an image that did not decode,
which a negative control shows). Nothing on a page may point at the network.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from qsteer import report_page
from qsteer.actors.local import local_policy, local_reward
from qsteer.report import frontier, main, report, run_report
from qsteer.rewards.sentiment import SentimentReward
from qsteer.run import run_job

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                 if (path := shutil.which(name))), None)


def browser(test):
    """A test that renders in Chromium: slow (a browser start per page), skipped where there is no Chromium."""
    test = pytest.mark.slow(test)
    return pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian's chromium package: "
                              "`apt-get install chromium`, which `make setup` runs as root)")(test)


FAST = ["dataset.limit=4", "generation.max_new_tokens=8", "batch_size=2"]


class Dom(HTMLParser):
    """The parts of a dumped DOM the checks read: tables (body rows of cell texts), images, warnings, URLs."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.headers: dict[str, list[str]] = {}
        self.images: dict[str, dict[str, str]] = {}
        self.broken = 0
        self.urls: list[str] = []
        self._table: str | None = None
        self._section = ""
        self._cell: list[str] | None = None
        self._in_broken = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.urls += [a[k] for k in ("src", "href") if k in a]
        if tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table], self.headers[self._table] = [], []
        elif tag in ("thead", "tbody"):
            self._section = tag
        elif tag == "tr" and self._table is not None and self._section == "tbody":
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "img":
            self.images[a.get("id", "")] = a
        elif tag == "p" and "broken" in a.get("class", ""):
            self.broken += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            text = "".join(self._cell).strip()
            (self.headers[self._table] if self._section == "thead" else self.tables[self._table][-1]).append(text)
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def column(self, table: str, name: str) -> list[str]:
        index = self.headers[table].index(name)
        return [row[index] for row in self.tables[table]]


def browser_dom(page: Path, profile: Path) -> Dom:
    """The page's DOM as headless Chromium leaves it after loading it (and running its script)."""
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "<table" in proc.stdout or "<img" in proc.stdout, proc.stdout[:500]
    return Dom(proc.stdout)


def assert_decoded(dom: Dom, image: str) -> None:
    assert int(dom.images[image]["data-width"]) > 100  # the browser decoded it (0 when it did not)
    assert dom.broken == 0


def assert_offline(dom: Dom) -> None:
    assert dom.urls and all(url.startswith("data:image/png;base64,") for url in dom.urls), dom.urls[:3]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_engine):
    """A multirun-shaped folder with Best-of-1 and Best-of-2 run folders, from real in-process runs."""
    from hydra import compose, initialize_config_module

    root = tmp_path_factory.mktemp("runs")
    for index, n in enumerate((1, 2)):
        with initialize_config_module("qsteer.conf", version_base="1.3"):
            cfg = compose("config", overrides=["progress=false", f"workflow.n={n}", *FAST])
        run_job(cfg, root / "sweep" / str(index), roles={"policy": local_policy(tiny_engine),
                                                        "reward": local_reward(SentimentReward())})
    return root


@browser
def test_a_run_folders_page_shows_its_summary_roles_records_and_plot(runs, tmp_path, monkeypatch):
    run = runs / "sweep" / "1"
    monkeypatch.setattr(sys, "argv", ["qsteer-report", str(run)])
    main()
    dom = browser_dom(run / "report.html", tmp_path / "profile")
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert len(dom.tables["records"]) == len(records) == 4
    assert dom.column("records", "id") == [r["id"] for r in records]
    assert dom.column("records", "reward") == [f"{r['reward']:.4g}" for r in records]
    values = dict(dom.tables["summary"])
    assert values["num_prompts"] == "4" and values["mean_reward"] == f"{summary['mean_reward']:.4g}"
    progress = json.loads((run / "progress.json").read_text())
    roles = {row[0]: row[1:] for row in dom.tables["roles"]}
    assert roles["policy"] == [str(progress["roles"]["policy"][k]) for k in ("calls", "errors", "tokens")]
    assert dict(dom.tables["config"])["workflow.n"] == "2"
    assert_decoded(dom, "plot-rewards")
    assert_offline(dom)


@browser
def test_a_sweep_folders_page_shows_the_sweep_table_and_plot(runs, tmp_path):
    sweep = runs / "sweep"
    report(sweep)
    dom = browser_dom(sweep / "report.html", tmp_path / "profile")
    assert dom.column("sweep", "workflow.n") == ["1", "2"]
    table = json.loads((sweep / "sweep.json").read_text())
    assert dom.column("sweep", "mean_reward") == [f"{row['mean_reward']:.4g}" for row in table]
    assert_decoded(dom, "plot-sweep")
    assert_offline(dom)


@browser
def test_the_frontier_page_shows_the_frontier_table_and_plot(runs, tmp_path):
    frontier([runs / "sweep"], runs / "frontier")
    dom = browser_dom(runs / "frontier" / "frontier.html", tmp_path / "profile")
    rows = json.loads((runs / "frontier" / "frontier.json").read_text())
    assert len(dom.tables["frontier"]) == len(rows) == 2
    assert dom.column("frontier", "method") == ["best_of_n", "best_of_n"]
    assert dom.column("frontier", "mean_kl") == [f"{row['mean_kl']:.4g}" for row in rows]
    assert_decoded(dom, "plot-frontier")
    assert_offline(dom)


@browser
def test_a_plot_that_does_not_decode_is_marked_by_the_browser(tmp_path):
    """Negative control for the decoding check: bytes that are no PNG decode to width 0 and a visible note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [1, 0])
    page = tmp_path / "broken.html"
    page.write_text(report_page.page("broken", report_page.png(report_page.figure_png(fig), "good", "plot-good"),
                                     report_page.png(b"these bytes are no PNG", "broken", "plot-broken")))
    dom = browser_dom(page, tmp_path / "profile")
    assert int(dom.images["plot-good"]["data-width"]) > 100
    assert dom.images["plot-broken"]["data-width"] == "0"
    assert dom.broken == 1


def test_a_page_of_a_running_run_leaves_its_results_untouched(tmp_path):
    """A report may read a folder a run is writing: the line being written is left out, and left as it is."""
    run = tmp_path / "running"
    run.mkdir()
    whole = "".join(json.dumps({"id": f"r{i}", "reward": 0.5, "stats": {"generated_tokens": 4}, "error": None}) + "\n"
                    for i in range(2))
    (run / "results.jsonl").write_text(whole + '{"id": "r2", "rew')
    page = run_report(run).read_text()
    assert (run / "results.jsonl").read_text() == whole + '{"id": "r2", "rew'
    assert page.count("<tr><td>r") == 2 and "has not finished" in page
    assert "http://" not in page and "https://" not in page
