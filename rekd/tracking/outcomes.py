"""How a trial ended, in one word: the `rekd.outcome` tag of its MLflow run, its row in the search's summary
and in the live table. Defined here once; the Tune callback, the summary, the table and the searcher read it.

A trial that stops itself (a NaN loss, a GPU it cannot use, a batch too large for the card) says why in
its last result under STOP_REASON; the trainable never raises for those, so Tune does not retry them.
"""
from __future__ import annotations

COMPLETED = "completed"  # ran the study's full epoch budget
STOPPED_EARLY = "stopped_early"  # ASHA stopped it at a rung
ERRORED = "errored"  # raised (after Tune's retries)
NON_FINITE_LOSS = "non_finite_loss"  # stopped itself: the loss became NaN or infinite
CUDA_OOM = "cuda_oom"  # stopped itself: the GPU ran out of memory
CUDA_UNUSABLE = "cuda_unusable"  # stopped itself: the GPU it was given cannot run it
INTERRUPTED = "interrupted"  # SIGINT/SIGTERM stopped the search while it ran; --resume continues it
SEARCH_FAILED = "search_failed"  # the search itself failed while the trial ran
LOST_WITH_DRIVER = "lost_with_driver"  # started after the dead driver's last snapshot: its work is lost

# A search's parent run: running, then finished, interrupted (INTERRUPTED) or failed.
RUNNING = "running"
FINISHED = "finished"
FAILED = "failed"

STOPPED_ITSELF = (NON_FINITE_LOSS, CUDA_OOM, CUDA_UNUSABLE)
# Every outcome a finished search's summary counts (zeros included).
SUMMARY_OUTCOMES = (COMPLETED, STOPPED_EARLY, ERRORED, *STOPPED_ITSELF, INTERRUPTED)

STOP_REASON = "stop_reason"  # result key: one of STOPPED_ITSELF
STOP_DETAIL = "stop_detail"  # result key: the error's first line
EPOCH = "epoch"  # result key: rekd's own epoch counter, which survives a trial's restarts (Tune's iteration does not)


def run_status(error: BaseException) -> str:
    """The MLflow status of a run its command ended on `error`: KILLED when the user or a scheduler stopped
    it (Ctrl-C, SIGTERM: KeyboardInterrupt; Ray's own SIGTERM handler: SystemExit), FAILED otherwise."""
    return "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"


def stop_reason(result: dict | None) -> str | None:
    """The outcome a trial that stopped itself gave in its last result; None for any other result."""
    reason = (result or {}).get(STOP_REASON)
    return str(reason) if reason else None


def ended(last_result: dict | None, max_epochs: int, errored: bool = False) -> str:
    """The outcome of a trial that ended, from its last result: errored, stopped itself, completed its
    budget, or stopped early by ASHA."""
    if errored:
        return ERRORED
    reason = stop_reason(last_result)
    if reason:
        return reason
    return COMPLETED if int((last_result or {}).get(EPOCH, 0)) >= max_epochs else STOPPED_EARLY
