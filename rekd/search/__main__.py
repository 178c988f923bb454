"""`python -m rekd.search STUDY`: the command line of a search (rekd.search.plan checks it, rekd.search.driver
runs it). Everything a user can get wrong is checked before Ray starts or anything is written."""
from __future__ import annotations

import dataclasses
import itertools
import sys
from typing import Optional, Sequence

from rekd.cli import run
from rekd.datasets import load_dataset
from rekd.locks import FileLock
from rekd.search.plan import PROG, SearchPlan, build_parser, plan_from_args
from rekd.search.state import STATE_FILE, claim_existing, claim_new, check_parent_run, name_taken, release_new


def claim_name(plan: SearchPlan, chosen: bool) -> tuple[SearchPlan, FileLock]:
    """The new search's folder, claimed. A name the user chose is refused if taken; a default name (study and
    start time) taken by a search started in the same second gets a suffix: two `make run` at once both run."""
    base = plan.name
    for n in itertools.count(2):
        lock = claim_new(plan.folder)
        if lock is not None:
            return plan, lock
        if chosen:
            raise name_taken(plan.folder)
        name = f"{base}-{n}"
        argv = list(plan.argv)
        argv[argv.index("--name") + 1] = name
        plan = dataclasses.replace(plan, name=name, argv=tuple(argv))
    raise AssertionError("unreachable")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, PROG, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    plan = plan_from_args(args, argv)
    data = load_dataset(plan.base)  # a missing dataset stops here, before anything is written
    from rekd.library_log import LibraryLog
    from rekd.search.ray_session import check_cluster_address
    from rekd.tracking.store import open_store

    check_cluster_address()  # a cluster that does not answer stops here, before anything is written
    library_log = LibraryLog(verbose=plan.verbose).apply()
    try:
        client, experiment_id = open_store(plan.tracking_uri, plan.experiment)
        if plan.resume:
            lock = claim_existing(plan.folder)
            check_parent_run(client, plan.resume, plan.name, plan.tracking_uri)
        else:
            plan, lock = claim_name(plan, chosen=args.name is not None)
        folder = plan.folder
        library_log.write_to(folder)
        from rekd.search.driver import run_search

        try:
            return run_search(plan, data, (client, experiment_id), owns_ray=True)
        finally:
            if plan.resume or (folder / STATE_FILE).exists():
                lock.release()
            else:  # stopped before the search recorded anything: no half-made search is left behind
                library_log.close()
                release_new(folder, lock)
    finally:
        library_log.close()


if __name__ == "__main__":
    sys.exit(main())
