"""`run_compare`: resolve the plan, prepare the store, score the baselines, train (or reuse) and test each model,
score SAM with automatic boxes, write the results.

The runner prints nothing: what the user should read goes through ``notify(level, message)``
(level ``"info"`` or ``"warn"``, the message plain text); the CLI prints it. The progress
bar is the library's (:func:`flaresam.ui.progress`), silenced by ``plan.quiet``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flaresam.compare.plan import (
    ComparePlan,
    ModelRun,
    Resolved,
    display,
    family,
    given_split_options,
    min_pixels,
    model_runs,
    resolve,
    split_spec,
    training_threads,
)
from flaresam.compare.report import build_results, caption, write_results
from flaresam.compare.scoring import (
    Predictor,
    Row,
    auto_box_predictor,
    box_fill_predictor,
    choose_proposer,
    dense_predictor,
    figure5_slices,
    in_table_order,
    oracle_predictor,
    score_row,
    small_organ_pairs,
)
from flaresam.errors import UsageError
from flaresam.messages import Notify, silent

if TYPE_CHECKING:
    import numpy as np
    import torch
    from rich.progress import Progress, TaskID

    from flaresam.data.store import PreparedCase, PreparedStore
    from flaresam.models.base import ModelStep

@dataclass
class _Bar:
    """The one progress bar of a comparison: a unit per training epoch and per (row, test case)."""

    bar: Progress
    task: TaskID

    def say(self, description: str) -> None:
        self.bar.update(self.task, description=description)

    def step(self) -> None:
        self.bar.advance(self.task, 1)

    def on_case(self, row: Row, cid: str) -> None:
        self.say(f"testing {row.label} ({cid})")
        self.step()


@dataclass
class _Compare:
    """The state of one comparison, filled in step by step."""

    r: Resolved
    store: PreparedStore
    device: torch.device
    runs: dict[str, ModelRun]
    cases: dict[str, PreparedCase]  # the test cases
    shown: list[tuple[str, int]]  # the slices the overlay figure shows
    notify: Notify
    rows: list[Row] = field(default_factory=list)
    clicks: list[dict[str, Any]] = field(default_factory=list)  # Dice-vs-clicks curve of each prompted row (--clicks)
    selected: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: dict[str, ModelStep] = field(default_factory=dict)  # each model's tested epoch, loaded once
    proposals: dict[str, dict[str, dict[int, np.ndarray]]] = field(default_factory=dict)  # dense model -> automatic boxes
    parameters: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> trainable and total parameters

    def score(self, row: Row, predict: Predictor, bar: _Bar) -> None:
        self.rows.append(score_row(row, self.cases, predict, bar.on_case, self.shown, self.store.label_set.organs))

    def click_curve(self, row: Row, step: ModelStep, bar: _Bar) -> None:
        """``--clicks K``: the row's model with its boxes, then K corrective clicks (:mod:`flaresam.compare.clicks`)."""
        k = self.r.plan.clicks
        if not k:
            return
        from flaresam.compare.clicks import click_curve

        def on_case(cid: str) -> None:
            bar.say(f"clicks: {row.label} ({cid})")
            bar.step()

        curve = click_curve(step, self.cases, self.device, k, self.store.label_set.organs, on_case=on_case)
        self.clicks.append({"key": row.key, "label": row.label, "kind": row.kind, **curve})


def run_compare(plan: ComparePlan, notify: Notify = silent) -> dict[str, Any]:
    """Train or reuse every model, evaluate them all on the test cases, write the results; returns results.json's document."""
    from flaresam.training.devices import pick_device
    from flaresam.ui import progress

    started = time.time()
    r = resolve(plan)
    check_outputs(r)
    store = prepare_store(r, notify)
    r = with_standin_checkpoints(r)
    cap = caption(r, store)
    if cap["warning"]:
        notify("warn", cap["warning"])
    device = pick_device(plan.device)
    plan.runs.mkdir(parents=True, exist_ok=True)
    cases = {cid: store.load_case(cid) for cid in store.test_ids}
    organs = store.label_set.organs
    c = _Compare(r, store, device, model_runs(r, store), cases, figure5_slices(cases, organs=organs), notify)

    with progress(quiet=plan.quiet) as bar:
        b = _Bar(bar, bar.add_task("Compare", total=_progress_total(c)))
        baselines(c, b)
        for i, m in enumerate(r.models, 1):
            train_or_reuse(c, m, f"[{i}/{len(r.models)}]", b)
            evaluate_model(c, m, b)
        proposer = choose_proposer(r.dense, c.selected) if r.prompted else None
        if proposer:
            automatic_rows(c, proposer, b)
        b.say("writing results")

    rows = in_table_order(c.rows)
    small = small_organ_pairs(cases, min_pixels(c.runs[r.prompted[0]].config), organs) if r.prompted else None
    results = build_results(r, store, rows, c.runs, c.selected, proposer, cap, device, time.time() - started, small,
                            clicks=c.clicks, parameters=c.parameters)
    write_results(results, rows, cases, plan.out, c.shown)
    return results


# ---------------------------------------------------------------------------
# before any training


def check_outputs(r: Resolved) -> None:
    """The results folder can be written, dense encoder weights can be had."""
    from flaresam.io.atomic import check_writable

    check_writable(r.plan.out / "results.json")
    if r.dense:
        from flaresam.models.dense.encoder_weights import check_encoder_weights_available
        from flaresam.models.dense.options import DEFAULT_ENCODER

        weights = r.encoder_weights if r.encoder_weights is not None else "imagenet"
        check_encoder_weights_available(r.encoder or DEFAULT_ENCODER, weights)


def prepare_store(r: Resolved, notify: Notify) -> PreparedStore:
    """The prepared dataset (the demo's phantoms, generated on first use), refused without test cases."""
    from flaresam.data.store import ensure_prepared

    split = split_spec(r)
    if r.demo:
        from flaresam.data.phantom import demo_dataset

        s = r.settings
        raw = demo_dataset(cases=s.cases, size=s.size, slices=s.slices, seed=0, quiet=r.plan.quiet)
        store = ensure_prepared(raw, split=split, quiet=True)
    else:
        store = ensure_prepared(str(r.plan.data), split=split, quiet=r.plan.quiet)
    given = given_split_options(r.plan)
    if given and any(store.split_spec.get(k) != v for k, v in given.items()):
        notify("warn", f"{store.root} is a prepared store split with {store.split_spec}; it keeps that split, so "
                       f"{', '.join(f'--{k.replace(chr(95), chr(45))} {v}' for k, v in given.items())} do nothing here")
    if not store.test_ids:
        raise UsageError(f"{store.root}: the split has no test cases ({len(store.case_ids)} cases, test fraction "
                         f"{store.split_spec.get('test_fraction')}); reported numbers are measured on held-out test cases only: "
                         "prepare the raw data into a new --out with --test-fraction > 0 (at least 3 cases)")
    if not store.val_ids:
        notify("warn", f"{store.root}: the split has no validation cases: each run's epoch and the proposer are "
                       "chosen by training loss")
    return store


def with_standin_checkpoints(r: Resolved) -> Resolved:
    """The demo's SAM models start from the stand-in checkpoints (built on first use)."""
    if not r.standin:
        return r
    from flaresam.models.standin import standin_checkpoints

    files = standin_checkpoints(quiet=r.plan.quiet)
    return dataclasses.replace(r, checkpoints={m: str(files[family(m)]) for m in r.checkpoints})


def _zero_shot(r: Resolved) -> list[tuple[str, str]]:
    """The rows before fine-tuning, as (model key, family built): one per base checkpoint and decoder (``hqsam`` and
    ``hqsam:lora`` share their base), under the first of its keys. HQ-SAM over a file without HQ-SAM's parts would
    start them fresh: its zero-shot row is the SAM it sits on (shared with a ``sam`` row on the same file)."""
    from flaresam.models.sam.checkpoint import has_hq_parts

    firsts: dict[tuple[str, str], str] = {}
    for m in r.prompted:
        base = r.checkpoints.get(m)
        if not base:
            continue
        built = "sam" if family(m) == "hqsam" and not has_hq_parts(base) else family(m)
        firsts.setdefault((built, base), m)
    return [(m, built) for (built, _), m in firsts.items()]


def zero_shot_label(built: str, base: str | None) -> str:
    """A zero-shot row's name: the base's own where it is not an official SAM (``LiteMedSAM (zero-shot)``)."""
    from flaresam.models.weights import find_entry

    entry = find_entry(base or "")
    name = entry.title if entry is not None and not entry.official else display(built)
    return f"{name} (zero-shot)"


def _progress_total(c: _Compare) -> int:
    r = c.r
    n_rows = (1 if r.prompted else 0) + len(_zero_shot(r)) + len(r.models) + (len(r.prompted) if r.dense else 0)
    click_rows = (len(_zero_shot(r)) + len(r.prompted)) if r.plan.clicks else 0
    train_units = sum(run.config.epochs for run in c.runs.values() if run.status != "finished")
    return train_units + (n_rows + click_rows) * len(c.cases)


# ---------------------------------------------------------------------------
# the steps


def baselines(c: _Compare, bar: _Bar) -> None:
    """The filled box (no model), then each SAM checkpoint before fine-tuning, with the same boxes."""
    from flaresam.models.registry import build_step

    r = c.r
    if r.prompted:
        c.score(Row("boxfill", "boxfill", "Box fill (no model)", "baseline", "oracle boxes", None),
                box_fill_predictor(min_pixels(c.runs[r.prompted[0]].config)), bar)
    zero_shot = _zero_shot(r)
    for m, f in zero_shot:
        options = {k: v for k, v in c.runs[m].config.model_options.items() if k not in ("trainable", "click_training")}
        options = {k: v for k, v in options.items() if not k.startswith("lora_")}
        step = build_step(f, quiet=True, **options)  # the run's embedding cache: its test slices are encoded once
        step.prepare_inference()
        step.network().to(c.device).eval()
        key = f"{f}@zeroshot" if sum(built == f for _, built in zero_shot) == 1 else f"{m}@zeroshot"
        row = Row(key, f, zero_shot_label(f, r.checkpoints[m]), "baseline", "oracle boxes", None,
                  checkpoint=r.checkpoints[m])
        c.score(row, oracle_predictor(step, c.device), bar)
        c.click_curve(row, step, bar)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block and restored after it (None: left alone)."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_or_reuse(c: _Compare, m: str, counter: str, bar: _Bar) -> None:
    """Reuse a finished run of this plan, resume an interrupted one, or train anew."""
    from flaresam.training.trainer import train

    run = c.runs[m]
    if run.status == "finished":
        c.notify("info", f"{counter} {display(m)}: reusing finished run {run.dir}")
        return
    bar.say(f"{counter} training {display(m)}")

    def on_epoch(record: dict[str, Any], summary: dict[str, Any]) -> None:
        bar.step()
        dice = record.get("val_mean_dice")
        bar.say(f"{counter} training {display(m)}: epoch {record.get('epoch')}/{run.config.epochs}"
                + (f", val 2D Dice {dice:.3f}" if isinstance(dice, float) else ""))

    command = list(c.r.plan.command) or ["flaresam", "compare"]
    threads = training_threads(c.r, m, os.cpu_count() or 1) if c.device.type == "cpu" else None
    with torch_threads(threads):
        if run.status == "resume":
            c.notify("info", f"{counter} {display(m)}: resuming interrupted run {run.dir}")
            train(resume=run.dir, quiet=True, on_epoch=on_epoch, command=command)
        else:
            if run.dir.exists():
                import shutil

                shutil.rmtree(run.dir)  # an unusable leftover of this very plan (no resume state)
            train(run.config, out=run.dir, quiet=True, on_epoch=on_epoch, command=command)


def evaluate_model(c: _Compare, m: str, bar: _Bar) -> None:
    """Score the run's chosen epoch (``--select``) on the test cases: oracle boxes for SAM models."""
    from flaresam.models.sam.step import SamStep
    from flaresam.training.run_folder import load_run

    select = c.r.plan.select
    run = c.runs[m]
    step, ckpt = load_run(run.dir, c.device, which=select)
    if isinstance(step, SamStep) and not step.options.encoder_trains:
        step.use_embedding_cache()  # a frozen encoder's test slices are those its zero-shot row encoded
    c.steps[m] = step
    metrics = ckpt.get("metrics") or {}
    c.selected[m] = {"epoch": ckpt.get("epoch"), "which": select, "val_2d_dice": metrics.get("val_mean_dice"),
                     "train_loss": metrics.get("train_loss"), "model_config": ckpt.get("model")}
    c.parameters[m] = step.parameter_counts()
    prompted = m in c.r.prompted
    label = f"{display(m)} (fine-tuned)" if prompted and c.r.checkpoints.get(m) else display(m)
    row = Row(m, family(m), label, "fine-tuned" if prompted else "trained", "oracle boxes" if prompted else "none (dense)",
              str(run.dir), checkpoint=f"{select} epoch ({ckpt.get('epoch')})")
    if prompted:
        c.score(row, oracle_predictor(step, c.device), bar)
        c.click_curve(row, step, bar)
    else:  # the automatic rows' boxes come from this same segmentation, should this model be the proposer
        thresholds = [min_pixels(c.runs[p].config) for p in c.r.prompted]
        proposals = c.proposals.setdefault(m, {}) if thresholds else None
        c.score(row, dense_predictor(step, c.device, proposals, thresholds, c.store.label_set.num_organs), bar)


def automatic_rows(c: _Compare, proposer: str, bar: _Bar) -> None:
    """Each SAM model again, with boxes from the dense model that did best on the *validation* cases."""
    prompted = c.r.prompted
    boxes = c.proposals[proposer]  # from the proposer's own test row: it segmented each case once
    for m in prompted:
        row = Row(f"{m}@auto", family(m), f"{display(m)} (auto boxes)", "automatic boxes", f"automatic boxes (from {display(proposer)})",
                  str(c.runs[m].dir), checkpoint=f"{c.r.plan.select} epoch")
        c.score(row, auto_box_predictor(c.steps[m], c.device, boxes), bar)

