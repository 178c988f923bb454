"""The runs of `python -m rekd.reproduce` as Ray tasks, tracked in MLflow by the driver, and the files they end in.

Stage 1 trains each seed's baseline; its weights go into Ray's object store, and stage 2's KD tasks of that
seed take them from there (Ray starts a KD task as soon as its seed's baseline is done). Each seed's data
go into the object store once and are shared by that seed's runs. Tasks never talk to MLflow: they return
their per-epoch history, and the driver logs it into one child run per training run under the
reproduction's parent run (tag rekd.role=reproduce). The parent ends FAILED if anything raises, KILLED on
Ctrl-C or SIGTERM. The driver logs through the queued writer (rekd.tracking.writer): an unreachable tracking
server never stops the reproduction; what it never received is named in a warning at the end, and the
tables are written all the same.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

from mlflow.entities import Metric, Param

from rekd.config import TrainConfig
from rekd.datasets import DataSplits
from rekd.library_log import LibraryLog
from rekd.provenance import provenance
from rekd.evaluate.reproduce_plan import ReproducePlan, RunSpec
from rekd.evaluate import structure_table
from rekd.evaluate.tables import csv_text, markdown, plot, rows_from, summary_metrics
from rekd.search.ray_session import fixed_cluster, gpu_request, start_ray
from rekd.snn.teachers import cpu_weights
from rekd.tracking.outcomes import run_status
from rekd.tracking.runs import create_parent_run, flat_params, numeric_metrics
from rekd.tracking.tags import ROLE_TAG
from rekd.tracking.store import open_store
from rekd.tracking.writer import FAILED_GRACE_S, GRACE_S, ChildRun, RunWriter, warn_unlogged
from rekd.train.loop import train
from rekd.tracking.links import ui_hint

CHILD_ROLE = "reproduce_run"
NAME_TAG = "rekd.reproduce"  # the reproduction's name, on the parent and on every child
ARTIFACT_DIR = "reproduce"


# -- the tasks: plain functions, run by Ray workers ---------------------------------------------------------
def baseline_task(cfg: TrainConfig, data: DataSplits) -> tuple[dict, dict]:
    """Stage 1: the baseline student; (its outcome, its CPU weights: the teacher of this seed's KD runs)."""
    ends: list[int] = []
    result = train(cfg, data=data, on_epoch=lambda metrics: ends.append(now_ms()))
    return outcome(result, ends), cpu_weights(result.model)


def kd_task(cfg: TrainConfig, data: DataSplits, teacher_weights: Optional[dict]) -> dict:
    """Stage 2: the distilled student; for sparse_kd also its pruned teacher's test accuracy as it is (no
    fine-tuning), which train() measures before the student's first step."""
    ends: list[int] = []
    result = train(cfg, data=data, teacher_weights=teacher_weights, on_epoch=lambda metrics: ends.append(now_ms()))
    teacher = {k: result.final[k] for k in ("teacher_test_acc", "teacher_sparsity") if k in result.final}
    return {**outcome(result, ends), **teacher}


def outcome(result, epoch_end_ms: list[int]) -> dict:
    """The run's scores and what its student costs (density, live synapses, SOPs and energy per sample)."""
    costs = {k: result.final[k] for k in structure_table.COSTS}
    return {"history": result.history, "epoch_end_ms": epoch_end_ms, "test_acc": result.final["test_acc"],
            "val_acc": result.final["val_acc"], **costs}


def now_ms() -> int:
    return int(time.time() * 1000)


# -- the driver -----------------------------------------------------------------------------------------------
def execute(plan: ReproducePlan, data: dict[int, DataSplits], library_log: LibraryLog) -> int:
    """Run the plan (data: each seed's splits), write the tables, and track it all in MLflow; what the
    libraries log goes to driver.log in the reproduction's folder."""
    client, experiment_id = open_store(plan.tracking_uri, plan.experiment)
    (plan.out_dir / plan.name).mkdir(parents=True, exist_ok=True)
    library_log.write_to(plan.out_dir / plan.name)
    parent_id = open_parent(client, experiment_id, plan)
    writer = RunWriter(plan.tracking_uri, experiment_id, parent_id, child_run=child_runs(plan))
    try:
        records = run_tasks(plan, data, writer)
        if plan.variants:
            rows = structure_table.rows(records, plan.seeds, plan.variants, plan.ratios[0])
            summary = structure_table.summary_metrics(rows)
        else:
            rows = rows_from(records, plan.seeds, plan.ratios)
            summary = summary_metrics(rows)
        table, files = write_results(plan, records, rows)
        writer.log(None, metrics=[Metric(k, v, now_ms(), 0) for k, v in summary.items()])
        for path in files:
            writer.log_artifact(None, str(path), artifact_path=ARTIFACT_DIR)
    except BaseException as e:
        writer.end(None, run_status(e))
        warn_unlogged(writer, writer.close(timeout=FAILED_GRACE_S))
        raise
    writer.end(None, "FINISHED")
    unsent = writer.close(timeout=GRACE_S)
    print("\n" + table)
    print(f"\nsaved {plan.out_dir / plan.name}: {', '.join(p.name for p in files)}")
    print("\n".join(ui_hint(plan.tracking_uri, plan.experiment, experiment_id, parent_id)))
    warn_unlogged(writer, unsent, str(plan.out_dir / plan.name))
    writer.raise_if_crashed()
    return 0


def run_tasks(plan: ReproducePlan, data: dict[int, DataSplits], writer: RunWriter) -> list[dict]:
    """Submit every run as a Ray task; log each into its child run as it finishes; the per-run records."""
    import ray

    start_ray(worker_output=plan.verbose)
    gpus, gpu_note = gpu_request(plan.gpus, plan.cpu_only, ray.cluster_resources().get("GPU", 0), fixed_cluster())
    resources = {"num_cpus": plan.cpus, "num_gpus": gpus}
    specs = plan.runs()
    print(f"reproduce {plan.name}: {plan.describe()}", flush=True)
    for note in (*plan.notes, gpu_note):
        if note:
            print(note, flush=True)
    print(f"{len(specs)} training runs as Ray tasks, {{cpu: {plan.cpus:g}, gpu: {gpus:g}}} each", flush=True)
    data_refs = {seed: ray.put(splits) for seed, splits in data.items()}
    baseline = ray.remote(baseline_task).options(num_returns=2, **resources)
    kd = ray.remote(kd_task).options(**resources)
    pending, weights = {}, {}
    for spec in specs:  # baselines come first in specs, so their weights' refs exist for the KD tasks
        key = run_name(plan, spec)
        writer.start(key, spec.config.to_dict())
        if spec.kind == "baseline":
            ref, weights[spec.seed] = baseline.remote(spec.config, data_refs[spec.seed])
        else:
            teacher = weights[spec.seed] if spec.config.mode == "sparse_kd" else None
            ref = kd.remote(spec.config, data_refs[spec.seed], teacher)
        pending[ref] = (spec, key)
    records, keys = [], []
    try:
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            spec, key = pending.pop(ref)
            try:
                result = ray.get(ref)
            except BaseException as e:
                writer.end(key, run_status(e))
                raise
            records.append(close_child(writer, key, spec, result))
            keys.append(key)
            print(f"{plan.table} {progress(spec, result)} ({len(records)}/{len(specs)} done)", flush=True)
    except BaseException:
        for ref, (spec, key) in pending.items():
            ray.cancel(ref)
            writer.end(key, "KILLED")
        raise
    for record, key in zip(records, keys):
        # The runs were made while the tasks ran (their starts were queued before the first task); a run
        # the store has not received yet, as it was unreachable, has no id.
        record["mlflow_run_id"] = writer.runs.get(key)
    return records


def progress(spec: RunSpec, result: dict) -> str:
    line = f"{spec.label} test_acc={result['test_acc']:.4f}"
    if "teacher_test_acc" in result:
        line += f", teacher test_acc={result['teacher_test_acc']:.4f} (sparsity {result['teacher_sparsity']:.2f})"
    return line


# -- MLflow: the parent run and one child per training run -----------------------------------------------------
def open_parent(client, experiment_id: str, plan: ReproducePlan) -> str:
    return create_parent_run(client, experiment_id, plan.name, params=parent_params(plan),
                             tags={ROLE_TAG: "reproduce", NAME_TAG: plan.name, "rekd.table": plan.table})


def parent_params(plan: ReproducePlan) -> list[Param]:
    """What the table depends on: the protocol, the distillation settings and their sources, the shared config."""
    varied = ("mode", "seed", "prune_ratio")  # set per run; the children hold each run's value
    values = {
        "table": plan.table, "dataset": plan.base.dataset, "arch": plan.base.arch, "epochs": plan.base.epochs,
        "seeds": ",".join(map(str, plan.seeds)), "prune_ratios": ",".join(f"{r:g}" for r in plan.ratios) or "none",
        "best_file": plan.best_file or "none", "distillation_mode": plan.base.mode,
        **plan.kd_settings, **{f"source.{k}": v for k, v in plan.kd_sources.items()},
        **{f"config.{k}": v for k, v in plan.base.to_dict().items() if k not in varied},
    }
    return flat_params(values)


def run_name(plan: ReproducePlan, spec: RunSpec) -> str:
    """A training run's child run name, also its key in the writer (unique within the reproduction)."""
    return f"{plan.table} {spec.label}"


def child_runs(plan: ReproducePlan) -> ChildRun:
    """How the writer makes each training run's child run: its name and tags, from its spec."""
    specs = {run_name(plan, spec): spec for spec in plan.runs()}

    def child_run(key: str) -> tuple[str, dict[str, str]]:
        spec = specs[key]
        tags = {ROLE_TAG: CHILD_ROLE, NAME_TAG: plan.name, "rekd.table": plan.table, "rekd.kind": spec.kind,
                "rekd.seed": str(spec.seed)}
        if spec.prune_ratio is not None:
            tags["rekd.prune_ratio"] = f"{spec.prune_ratio:g}"
        if spec.variant:
            tags["rekd.variant"] = spec.variant
        return key, tags

    return child_run


def close_child(writer: RunWriter, key: str, spec: RunSpec, result: dict) -> dict:
    """Log a finished run's history (step = epoch, one log per epoch: the writer batches them within MLflow's
    limits) and final scores; its record for the table (its run id comes once the tasks are done)."""
    for epoch_metrics, end_ms in zip(result["history"], result["epoch_end_ms"]):
        writer.log(key, numeric_metrics(epoch_metrics, epoch_metrics["epoch"], end_ms))
    writer.log(key, [Metric("final_test_acc", result["test_acc"], now_ms(), 0)])
    writer.end(key, "FINISHED")
    return {"kind": spec.kind, "seed": spec.seed, "prune_ratio": spec.prune_ratio, "variant": spec.variant,
            "mlflow_run_id": None,
            **{k: v for k, v in result.items() if k not in ("history", "epoch_end_ms")}}


# -- the files ----------------------------------------------------------------------------------------------------
def write_results(plan: ReproducePlan, records: list[dict], rows: list) -> tuple[str, list[Path]]:
    """table.md, table.csv, accuracy.png (table1: against the prune ratio; structure: against density),
    runs.json (per-seed raw numbers) and plan.json."""
    folder = plan.out_dir / plan.name
    folder.mkdir(parents=True, exist_ok=True)  # made by execute() for its log
    b = plan.base
    if plan.variants:
        table = structure_table.markdown(rows, caption(plan))
        csv = structure_table.csv_text(rows, b.dataset, b.arch, plan.kd_settings)
    else:
        table = markdown(rows, b.dataset, b.arch, caption(plan))
        csv = csv_text(rows, b.dataset, b.arch, plan.kd_settings)
    files = [folder / "table.md", folder / "table.csv", folder / "runs.json", folder / "plan.json"]
    files[0].write_text(table + "\n")
    files[1].write_text(csv)
    order = {s.key: i for i, s in enumerate(plan.runs())}  # not the finishing order
    records = sorted(records, key=lambda r: order[r["kind"], r["seed"], r["prune_ratio"], r["variant"]])
    files[2].write_text(json.dumps({"name": plan.name, "table": plan.table, "seeds": list(plan.seeds),
                                    "runs": records}, indent=2) + "\n")
    files[3].write_text(json.dumps(plan_document(plan), indent=2) + "\n")
    if plan.variants:
        files.append(structure_table.plot(rows, f"sparse students on {b.dataset}/{b.arch}, {len(plan.seeds)} seeds",
                                          folder / "accuracy.png"))
    elif plan.ratios:
        files.append(plot(rows, f"{plan.table}: sparse-KD on {b.dataset}/{b.arch}, {len(plan.seeds)} seeds",
                          folder / "accuracy.png"))
    if plan.best_file:
        files.append(Path(shutil.copy(plan.best_file, folder / "best.yaml")))
    return table, files


def caption(plan: ReproducePlan) -> str:
    b, n = plan.base, len(plan.seeds)
    teacher = ("each seed's baseline student, magnitude-pruned at the ratio, not fine-tuned" if plan.ratios
               else "the virtual teacher of Eq. 6 (`confidence` on the true class)")
    if plan.variants:
        return (f"**structure** on {b.dataset}/{b.arch}, test split: sparse students against the dense baseline, "
                f"accuracy in %, mean ± std over {n} seeds ({', '.join(map(str, plan.seeds))}); every generation "
                f"{b.epochs} epochs. Δ = student − dense baseline, paired by seed; its 95% CI is a Student t with "
                f"{n - 1} degree{'s' * (n > 2)} of freedom. KD students are taught by each seed's baseline, "
                f"magnitude-pruned at {plan.ratios[0]:g}. Density = live share of conv weights; SOPs and energy "
                f"count live synapses only (rekd.snn.energy). Distillation: "
                f"{plan.settings_text(sources=False)}. Code {provenance()['code_version']}.")
    settings = plan.settings_text(sources=True)
    return (f"**{plan.table}** ({b.mode}) on {b.dataset}/{b.arch}, test split: accuracy in %, mean ± std over "
            f"{n} seeds ({', '.join(map(str, plan.seeds))}); every run {b.epochs} epochs. Improvement = student KD "
            f"− student SNN, paired by seed; its 95% CI is a Student t with {n - 1} degree{'s' * (n > 2)} of "
            f"freedom. Teacher: {teacher}. Distillation: {settings}. Code {provenance()['code_version']}.")


def plan_document(plan: ReproducePlan) -> dict:
    """What made the table: protocol, settings and their sources, every run's resolved config, code versions."""
    return {
        "name": plan.name, "table": plan.table, "seeds": list(plan.seeds), "prune_ratios": list(plan.ratios),
        "distillation": plan.kd_settings, "sources": plan.kd_sources, "best_file": plan.best_file,
        "tracking_uri": plan.tracking_uri, "experiment": plan.experiment, "provenance": provenance(),
        "runs": [{"kind": s.kind, "seed": s.seed, "prune_ratio": s.prune_ratio, "variant": s.variant,
                  "config": s.config.to_dict()} for s in plan.runs()],
    }
