"""`factory schedules` as an operator runs it, on this machine's store (no Ray needed): the
example schedule added, listed with its next fire times in its time zone, paused, removed;
a bad cron expression refused with the field named."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from factory.schedules import CronScheduler
from factory.settings import Settings
from factory.store import open_store
from tests.e2e.test_cli import REPO, factory

EXAMPLE = REPO / "examples" / "sales_stats" / "nightly.yaml"


def test_schedules_add_list_pause_remove_the_example(factory_home: Path, tmp_path: Path) -> None:
    env = {**os.environ, "FACTORY_HOME": str(factory_home), "COLUMNS": "250", "PYTHONPATH": str(REPO)}
    added = factory(env, "schedules", "add", str(EXAMPLE))
    assert added.returncode == 0, added.stderr
    assert "sales-stats-nightly@1" in added.stdout and "active" in added.stdout
    listed = factory(env, "schedules", "list", "--next", "3")
    assert listed.returncode == 0, listed.stderr
    assert "30 6 * * 1-5" in listed.stdout and "Europe/Paris" in listed.stdout
    assert listed.stdout.count("06:30 CE") == 3  # the next three mornings, in Paris time (CET or CEST)
    # the scheduler of `factory up` would run it from this store: the registered example's
    # first due tick makes a run with the schedule's inputs over the workflow's defaults
    settings = Settings(home=factory_home)
    store = open_store(settings.resolved_store_url())
    try:
        record = store.get_schedule("sales-stats-nightly")
        assert record is not None and record.catchup == "run_once"
        handed: list[str] = []
        from factory import cron

        (first,) = cron.next_fire_times(record.cron, record.timezone, record.after, 1)
        CronScheduler(store, settings, handed.append).sweep(first + 5)
        run = store.get_run(handed[0])
        assert run.inputs == {"path": "data/sales.csv", "z": 2.0}
        assert run.grants is not None and run.grants.host_mounts  # its folder was registered with it
    finally:
        store.close()
    paused = factory(env, "schedules", "pause", "sales-stats-nightly")
    assert paused.returncode == 0 and "paused" in paused.stdout and "next -" in paused.stdout
    assert factory(env, "schedules", "remove", "sales-stats-nightly").returncode == 0
    # a bad expression: refused before anything is stored, the field named
    shutil.copy(EXAMPLE.parent / "salessteps.py", tmp_path)
    (tmp_path / "bad.yaml").write_text(EXAMPLE.read_text().replace('"30 6 * * 1-5"', '"30 6 * * 8"'))
    bad = factory(env, "schedules", "add", str(tmp_path / "bad.yaml"))
    assert bad.returncode == 2 and "field 5 (day-of-week) '8'" in bad.stderr, bad.stderr
