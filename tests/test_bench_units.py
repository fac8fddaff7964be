"""The benchmark harness's pure parts: ratios, the paste-ready markdown, the targets, the
memory and soak summaries, answer normalisation and the command line. No database, no
stopwatch: every figure here is made up."""

from __future__ import annotations

import os
from decimal import Decimal
from typing import Any

import pytest

from bench import procstat, report
from bench.__main__ import DEFAULT_VARIANTS, _check_answers, parse
from bench.models import Order, User
from bench.soak import RSS_TARGET_MIB, soak_summary
from bench.variants import ORDER_COLUMNS, answer_inserted, answer_rows
from bench.workloads import WORKLOADS

NAMES = ["asyncpg", "asyncpg-default-reset", "sidecar-uds", "ar-uds-http", "pgbouncer"]
# Medians per workload and variant: latencies in µs, throughputs in ops/s.
VALUES = {
    "point-c1": {
        "asyncpg": 100.0,
        "asyncpg-default-reset": 200.0,
        "sidecar-uds": 400.0,
        "ar-uds-http": 500.0,
        "pgbouncer": 300.0,
    },
    "point-c32": {
        "asyncpg": 10_000.0,
        "asyncpg-default-reset": 8_000.0,
        "sidecar-uds": 6_000.0,
        "ar-uds-http": 5_000.0,
        "pgbouncer": 4_000.0,
    },
    "scatter-count-c1": {name: 900.0 for name in NAMES},
    "shard-read-c1": {name: 500.0 for name in NAMES},
}


def _rep(value: float, rep: int, sidecar_cpu: float = 80.0) -> dict[str, Any]:
    return {
        "rep": rep,
        "value": value,
        "p50_us": value,
        "p99_us": value * 2,
        "ops_per_s": value,
        "ops": 100,
        "errors": 0,
        "first_error": None,
        "cpu_us_per_op": {"client": 40.0, "sidecar": sidecar_cpu, "postgres": 20.0, "total": 140.0},
        "other_cores": 0.1,
    }


def _summary(names: list[str] = NAMES, missing: dict[str, str] | None = None) -> dict[str, Any]:
    workloads = [w for w in WORKLOADS if w.key in VALUES]
    raw = {
        key: {
            name: [_rep(value * 0.9, 1), _rep(value, 2), _rep(value * 1.2, 3)]
            for name, value in per.items()
            if name in names and name not in (missing or {})
        }
        for key, per in VALUES.items()
    }
    return report.summarise(workloads, raw, names, missing or {})


def _meta(**extra: Any) -> dict[str, Any]:
    return {
        "date_utc": "2026-12-01 04:39 UTC",
        "commit": "0fef581",
        "command": "python -m bench --quick --only point-c1",
        "cpus": 2,
        "loadavg_before": (1.4, 1.2, 1.0),
        "loadavg_after": (2.24, 1.5, 1.1),
        "versions": {"python": "3.11.7", "postgresql": "15", "pgbouncer": "1.18.0"},
        "reps": 2,
        "duration_s": 0.3,
        "warmup_s": 0.1,
        "soak_s": None,
        "pool_size": 10,
        "missing": {},
        **extra,
    }


def _sidecar() -> dict[str, Any]:
    return {
        "rss": {"start_mib": 60.0, "peak_mib": 75.25, "end_mib": 70.0},
        "idle": {"before the run": {"sidecar": 0.004}, "after": {"sidecar": 0.0052}},
    }


def test_ratios_are_medians_over_the_baselines() -> None:
    summary = _summary()
    point = summary["point-c32"]["variants"]
    assert point["asyncpg"]["median"] == 10_000.0
    assert point["ar-uds-http"]["ratio_to_asyncpg"] == pytest.approx(0.5)
    assert point["ar-uds-http"]["ratio_to_pgbouncer"] == pytest.approx(1.25)
    assert point["pgbouncer"]["ratio_to_pgbouncer"] == pytest.approx(1.0)
    # Each repetition is paired with asyncpg's measurement of the same repetition.
    assert [r["ratio_to_asyncpg"] for r in point["sidecar-uds"]["reps"]] == pytest.approx(
        [0.6, 0.6, 0.6]
    )


def test_markdown_cells_carry_value_and_ratios() -> None:
    table = report.markdown_table(_summary(), NAMES)
    lines = table.splitlines()
    assert lines[0] == "| workload | " + " | ".join(NAMES) + " |"
    assert lines[1] == "| --- |" + " --- |" * len(NAMES)
    c1 = next(line for line in lines if "`point-c1`" in line)
    c32 = next(line for line in lines if "`point-c32`" in line)
    assert c1.startswith("| point read, c1, p50 (`point-c1`) | 100 µs |")
    assert "| 500 µs (5.00x) |" in c1
    assert "pgb" not in c1  # the pgbouncer ratio is for c32 rows only
    assert "| 10,000/s (2.50x pgb) |" in c32
    assert "| 5,000/s (0.50x, 1.25x pgb) |" in c32
    assert c32.endswith("| 4,000/s (0.40x) |")


def test_variants_that_did_not_run_are_not_columns() -> None:
    missing = {"pgbouncer": report.PGBOUNCER_MISSING}
    table = report.markdown_table(_summary(missing=missing), NAMES)
    assert "pgbouncer" not in table.splitlines()[0]
    assert "pgb)" not in table


def test_header_says_when_where_what_and_how() -> None:
    meta = _meta(missing={"pgbouncer": report.PGBOUNCER_MISSING}, other_cores=0.25)
    text = "\n".join(report.header_lines(meta, _sidecar()))
    assert "- run: 2026-12-01 04:39 UTC, commit 0fef581" in text
    assert "- command: `python -m bench --quick --only point-c1`" in text
    assert "2 CPUs, load average (1/5/15 min) 1.40 1.20 1.00 before, 2.24 1.50 1.10 after" in text
    assert "python 3.11.7, PostgreSQL 15, pgbouncer 1.18.0" in text
    assert "2 reps x 0.3 s per measurement (0.1 s warm-up)" in text
    assert "start 60.0 MiB, peak 75.2 MiB, end 70.0 MiB" in text
    assert "idle CPU 0.40% of a core before the run, 0.52% of a core after" in text
    assert "0.25 of 2 cores" in text
    assert "- pgbouncer: not installed (apt-get install pgbouncer)" in text
    soaked = report.header_lines(_meta(soak_s=600.0, soak_window_s=10.0), _sidecar())
    assert "- method: one workload for 600 s in windows of 10 s" in "\n".join(soaked)


def test_markdown_document_is_self_contained() -> None:
    summary = _summary()
    document = {"meta": _meta(), "sidecar": _sidecar(), "workloads": summary}
    text = report.markdown(document, NAMES)
    for part in ("- run:", "- command:", "- versions:", "- variants:", "| workload |"):
        assert part in text
    assert "| CPU µs per request, point-c32 |" in text
    assert "| target | sidecar-uds | ar-uds-http |" in text


def test_targets() -> None:
    values = report.target_values(_summary(), "ar-uds-http")
    assert values["scatter-count"] == (pytest.approx(1.8), True)
    assert values["vs-pgbouncer"] == (pytest.approx(1.25), False)
    assert values["vs-asyncpg"] == (pytest.approx(0.5), False)
    assert values["scatter-top"] == (None, False)  # not measured
    targets = report.markdown_targets(_summary(), NAMES)
    assert "scatter ordered limit" not in targets  # a row nobody measured is left out
    row = "| point read c32 >= 2x asyncpg through pgbouncer | missed (1.50x) | missed (1.25x) |"
    assert row in targets
    assert values["c1-added"] == (pytest.approx(400.0), False)  # 500 µs against 100 µs


def test_rss_watch_reads_this_process_and_keeps_start_peak_end() -> None:
    found = procstat.memory_mib(os.getpid())
    assert found is not None and 0 < found["rss"] <= found["hwm"]
    assert procstat.memory_mib(None) is None
    watch = procstat.RssWatch(None)
    assert watch.summary()["start_mib"] is None
    watch.samples, watch.hwm = [60.0, 80.0, 70.0], 90.0
    assert watch.summary() == {
        "start_mib": 60.0,
        "peak_mib": 90.0,
        "end_mib": 70.0,
        "max_sampled_mib": 80.0,
        "samples": 3,
    }


def test_soak_summary_and_its_markdown() -> None:
    windows = [
        {"ops": 1000, "ops_per_s": 100.0, "errors": 0, "first_error": None},
        {"ops": 2000, "ops_per_s": 200.0, "errors": 1, "first_error": "Timeout: slow"},
    ]
    rss = {"start_mib": 60.0, "peak_mib": 151.0, "end_mib": 150.5}
    found = soak_summary("ar-uds-channel", "point-c32", 20.0, 20.0, windows, rss)
    assert found["ops_per_s"] == 150.0
    assert (found["window_ops_per_s_min"], found["window_ops_per_s_max"]) == (100.0, 200.0)
    assert (found["errors"], found["first_error"]) == (1, "Timeout: slow")
    assert found["rss_target_met"] is False and found["rss_target_mib"] == RSS_TARGET_MIB
    found["transport_problem"] = "the sidecar refused the channel: its requests went over HTTP"
    assert "errors (the sidecar refused the channel" in report.markdown_soak(found)
    found["transport_problem"] = None
    text = report.markdown_soak(found)
    row = "| point-c32 through ar-uds-channel, 20 s | 150/s (windows 100-200/s), 1 errors |"
    assert row in text
    assert "| sidecar RSS < 150 MiB | missed |" in text


def test_answers_compare_across_shapes() -> None:
    amount = Decimal("1.25")
    expected = [["1", "1", "paid", "1.25"]]
    as_lists = [[1, 1, "paid", amount]]
    as_dicts = [dict(zip(ORDER_COLUMNS, as_lists[0], strict=True))]
    record = Order(id=1, user_id=1, status="paid", amount=amount)
    assert answer_rows(as_lists, ORDER_COLUMNS) == expected
    assert answer_rows(as_dicts, ORDER_COLUMNS) == expected
    assert answer_rows(record, ORDER_COLUMNS) == expected
    assert answer_rows([User(id=5, name="user-5", score=1)], ["id", "name", "score"]) == [
        ["5", "user-5", "1"]
    ]
    assert answer_inserted("INSERT 0 1") == answer_inserted(1) == 1
    assert answer_inserted(record) == 0  # not saved
    record._persisted = True
    assert answer_inserted(record) == 1


def test_different_answers_are_named() -> None:
    base = {"count": 10, "top": [["1"]]}
    answers = {
        "asyncpg": base,
        "ar-uds-http": {"count": 10, "top": [["2"]]},
        "sidecar-uds": dict(base),
        "sidecar-uds-channel": {"error": "RuntimeError: no channel"},
    }
    assert _check_answers(answers) == ["ar-uds-http top: [['2']], asyncpg [['1']]"]


def test_command_line() -> None:
    args = parse(["--quick", "--only", "point-c1", "--variants", "ar-uds-http,asyncpg"])
    assert [w.key for w in args.workloads] == ["point-c1"]
    assert args.variant_names == ["ar-uds-http"]
    assert (args.reps, args.duration) == (2, 0.3)
    assert parse([]).variant_names == DEFAULT_VARIANTS
    assert parse(["--soak", "30"]).soak == 30.0
    with pytest.raises(SystemExit):
        parse(["--variants", "nope"])
    with pytest.raises(SystemExit):
        parse(["--soak", "0"])


def test_metric_totals_sum_over_labels() -> None:
    text = "\n".join(
        [
            "# HELP dbsidecar_channel_frames_total Frames received",
            "# TYPE dbsidecar_channel_frames_total counter",
            'dbsidecar_channel_frames_total{code="200",kind="plan"} 120.0',
            'dbsidecar_channel_frames_total{code="200",kind="bundle"} 30.0',
            "dbsidecar_channel_frames_created 1.7e9",
            "dbsidecar_channels_open 1.0",
        ]
    )
    wanted = {"frames": "dbsidecar_channel_frames_total", "absent": "dbsidecar_nothing_total"}
    assert report.metric_totals(text, wanted) == {"frames": 150.0, "absent": 0.0}


def test_a_variant_that_left_its_transport_is_not_shown_as_measured() -> None:
    workloads = [w for w in WORKLOADS if w.key == "point-c32"]
    rep = _rep(5_000.0, 1)
    rep["transport_problem"] = "the sidecar refused the channel: its requests went over HTTP"
    raw = {"point-c32": {"asyncpg": [_rep(10_000.0, 1)], "ar-uds-channel": [rep]}}
    summary = report.summarise(workloads, raw, ["asyncpg", "ar-uds-channel"], {})
    status = summary["point-c32"]["variants"]["ar-uds-channel"]["status"]
    assert status.startswith("failed: the sidecar refused the channel")
    table = report.markdown_table(summary, ["asyncpg", "ar-uds-channel"])
    assert "5,000/s" not in table and "failed: the sidecar refused" in table
