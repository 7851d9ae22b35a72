"""The one training loop for every model family (HQ-SAM, SAM, U-Net, DeepLabV3+).

A model family is a :class:`~flaresam.models.base.ModelStep`; the trainer owns
everything else, written once: seeding, the epoch-seeded sampler, AdamW with
warm-up and cosine decay, bf16 autocast on CUDA, gradient clipping, validation
(:mod:`flaresam.training.evaluation`, identical for every family), the run
folder (:mod:`flaresam.training.run_folder`), exact resume and
DistributedDataParallel.

Exact resume: the sampler's order depends only on ``(seed, epoch)``, datasets
seed their augmentation per item (``set_epoch``, called when the training
dataset has it), the DataLoader has its own generator, and ``resume.pt``
restores all RNG states. A run stopped at any step (Ctrl-C saves the state at
the last finished step) and resumed therefore ends with the same weights as one
never stopped (bit for bit on CPU, single process). This relies on the order of
:meth:`Trainer.initialize`: every step there that draws random numbers runs in
the same order on a fresh and on a resumed run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sized
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from flaresam import __version__
from flaresam.errors import DataError, FlaresamError, UsageError
from flaresam.figures import training_curves
from flaresam.io.atomic import atomic_path
from flaresam.training.config import TrainConfig
from flaresam.training.devices import Dist, init_distributed, rng_state, seed_everything, set_rng_state
from flaresam.training.evaluation import accumulate_dice, validation_result, validation_slices
from flaresam.training.run_folder import (
    CHECKPOINT_FORMAT,
    CHECKPOINTS_DIR,
    CURVES_FILE,
    RESUME_FORMAT,
    RUN_FILE,
    RUN_FORMAT,
    claim_run_dir,
    load_torch,
    read_metrics,
    read_run,
    resume_path,
    save_torch,
    timestamp,
    versions,
    write_metrics,
    write_run,
)
from flaresam.ui import progress as progress_bar

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from flaresam.data.store import PreparedStore
    from flaresam.models.base import ModelStep

OnEpoch = Callable[[dict[str, Any], dict[str, Any]], None]


class TrainingInterrupted(FlaresamError):
    """Training stopped on request; the run folder holds the state to resume from."""

    exit_code = 130

    def __init__(self, run_dir: Path, epoch: int, step: int) -> None:
        self.run_dir, self.epoch, self.step = run_dir, epoch, step
        super().__init__(
            f"training interrupted in epoch {epoch + 1} after step {step}; continue with: flaresam finetune --resume {run_dir}"
        )


# ---------------------------------------------------------------------------
# sampling, schedule, interruption


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1, max_steps: int | None = None) -> list[list[int]]:
    """This process's batches of dataset indices for ``epoch``: depends only on its arguments.

    A seeded permutation per epoch, padded (by repeating its start) so every
    process gets as many batches as the others, as DistributedSampler does. A
    trailing batch of one item joins the previous batch: BatchNorm (and
    DeepLabV3+'s image pooling) cannot train on a single item.
    """
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = math.ceil(n / world)
    perm = np.resize(perm, per_rank * world)
    shard = perm[rank::world]
    batches = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        last = batches.pop()
        batches[-1] = np.concatenate([batches[-1], last])
    if max_steps is not None:
        batches = batches[:max_steps]
    return [[int(i) for i in b] for b in batches]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to the full rate over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    done = min(1.0, (step - warmup) / span)
    return 0.5 * (1.0 + math.cos(math.pi * done))


class StopFlag:
    """Ctrl-C / SIGTERM ask to stop at the end of the current step (a second Ctrl-C stops at once)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """The handlers while training runs (signals can only be caught on the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        try:
            yield self
        finally:
            for signum, old in self._old.items():
                signal.signal(signum, old)


# ---------------------------------------------------------------------------
# the state


@dataclass
class Progress:
    """Where the loop stands: saved as resume.pt's ``state`` (these keys), so a resumed run continues at that step."""

    epoch: int = 0  # finished epochs
    step_in_epoch: int = 0  # finished steps of the current epoch
    global_step: int = 0
    loss_sum: float = 0.0  # running sums of the current epoch, for its mean loss and speed
    loss_n: float = 0.0
    items: float = 0.0
    seconds: float = 0.0
    best: dict[str, Any] | None = None  # the best epoch so far: {"epoch", "metric", "score", "value"}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Progress:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch, self.loss_sum, self.loss_n, self.items, self.seconds = 0, 0.0, 0.0, 0.0, 0.0


@dataclass(frozen=True)
class Schedule:
    """The resolved optimiser settings and step counts (recorded in run.json; resume checks them)."""

    lr: float
    weight_decay: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


@dataclass(frozen=True)
class EpochStats:
    loss: float  # mean training loss over all processes
    rate: float  # slices per second, all processes together
    seconds: float


@dataclass
class TrainState:
    """What the loop works on, set up once by :meth:`Trainer.initialize`."""

    step: ModelStep
    net: torch.nn.Module  # step.network() on the device (never the DDP wrapper: validation runs per process)
    store: PreparedStore
    dataset: Dataset[Any]
    num_items: int  # len(dataset)
    train_ids: list[str]
    val_ids: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    trained: list[torch.Tensor]  # every parameter the optimizer updates (clipped together)
    schedule: Schedule
    amp: bool  # bf16 autocast
    run_dir: Path
    progress: Progress
    history: list[dict[str, Any]]  # metrics.jsonl records of the finished epochs
    run_info: dict[str, Any] = field(default_factory=dict)  # run.json

    @property
    def model_config(self) -> dict[str, Any]:
        """The config saved in checkpoints: the run's own (a resumed run keeps what it recorded)."""
        return cast(dict[str, Any], self.run_info["model_config"])


# ---------------------------------------------------------------------------
# the public entry point


def train(
    config: TrainConfig | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
    device: str | None = None,
    workers: int | None = None,
    quiet: bool = False,
    on_epoch: OnEpoch | None = None,
    stop_after_steps: int | None = None,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Train a new run from ``config``, or continue the run folder ``resume`` (then ``epochs``,
    ``device`` and ``workers`` may override what the run recorded).

    ``on_epoch(record, summary)`` is called on rank 0 after each epoch.
    ``stop_after_steps`` stops like Ctrl-C after that many steps (tests).
    Returns the run summary (rank 0; other ranks get the same dict).
    """
    prior: dict[str, Any] | None = None
    if resume is not None:
        prior = read_run(resume)
        config = TrainConfig.from_dict(prior["config"])
    if config is None:
        raise UsageError("train() needs a config or a run folder to resume")
    # the caller's config is never changed
    config = dataclasses.replace(config, epochs=config.epochs if epochs is None else epochs,
                                 device=config.device if device is None else device,
                                 workers=config.workers if workers is None else workers)
    config.validate()

    dist, dev = init_distributed(config.device)
    finished = False
    try:
        trainer = Trainer(config, dist, dev, quiet=quiet or not dist.main, out=out, resume=Path(resume) if resume is not None else None,
                          prior=prior, on_epoch=on_epoch, stop_after_steps=stop_after_steps, command=command)
        summary = trainer.run_training()
        finished = True
        return summary
    finally:
        if dist.active and torch.distributed.is_initialized():
            if finished:
                torch.distributed.barrier()  # no process tears the group down while a peer still talks to it
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------
# the trainer


class Trainer:
    """One run: :meth:`run_training` sets up :attr:`state`, then trains epoch by epoch; each phase is a method."""

    state: TrainState

    def __init__(
        self,
        cfg: TrainConfig,
        dist: Dist,
        device: torch.device,
        *,
        quiet: bool = False,
        out: str | os.PathLike[str] | None = None,
        resume: Path | None = None,
        prior: dict[str, Any] | None = None,
        on_epoch: OnEpoch | None = None,
        stop_after_steps: int | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.cfg, self.dist, self.device, self.quiet = cfg, dist, device, quiet
        self.out, self.resume, self.prior = out, resume, prior  # prior: the resumed run's run.json
        self.on_epoch, self.stop_after_steps = on_epoch, stop_after_steps
        self.command = command if command is not None else list(sys.argv)
        self.stop = StopFlag()
        from flaresam.models.registry import spec

        self.model_spec = spec(cfg.model)  # an unknown model fails here, before any data is prepared

    def run_training(self) -> dict[str, Any]:
        self.state = self.initialize()
        self.on_train_start()
        try:
            with self.stop.installed():
                while self.state.progress.epoch < self.cfg.epochs:
                    stats = self.train_epoch()
                    self.on_epoch_end(stats)
        except TrainingInterrupted:
            raise
        except BaseException as exc:
            self.on_train_failed(exc)
            raise
        return self.summary()

    def info(self, message: str) -> None:
        if not self.quiet:
            from flaresam.ui import info

            info(message)

    # -- setup: the order matters for exact resume (see the module docstring) ---
    def build_model(self, store: PreparedStore) -> ModelStep:
        """A new run's model from its options; a resumed run's from the model config it recorded.

        Resuming rebuilds exactly what was trained (resolved architecture and base
        file; a base whose bytes changed since is refused by the family's builder)
        and skips fetching weights the trained tensors replace (ImageNet encoders).
        A new dense model gets one output per organ of the store's label set.
        """
        from flaresam.models.registry import build_step, rebuild_step

        recorded = (self.prior or {}).get("model_config")
        if self.resume is None or not recorded:
            return build_step(self.cfg.model, restore=self.resume is not None, num_organs=store.label_set.num_organs, **self.cfg.model_options)
        try:
            return rebuild_step(recorded, quiet=self.quiet, **self.cfg.model_options)
        except DataError as exc:
            raise DataError(f"cannot resume {self.resume}: {exc}") from None

    def initialize(self) -> TrainState:
        """Data, model, optimiser and schedule, the resumed state, DDP, and the run folder."""
        cfg, dist, device = self.cfg, self.dist, self.device
        store, train_ids, val_ids = self.load_data()
        seed_everything(cfg.seed)
        step = self.build_model(store)
        net = step.network().to(device)
        dataset = step.train_dataset(store, train_ids, cfg.seed)
        num_items = len(cast(Sized, dataset))
        if num_items == 0:
            raise DataError(f"{store.root}: the training cases have no slices to train on")
        schedule = self.plan_schedule(num_items, step.default_lr)
        optimizer = torch.optim.AdamW(step.optimizer_groups(schedule.lr, schedule.weight_decay), lr=schedule.lr, weight_decay=schedule.weight_decay)
        trained: list[torch.Tensor] = [p for g in optimizer.param_groups for p in g["params"]]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, schedule.total_steps, schedule.warmup_steps))
        progress, history = Progress(), list[dict[str, Any]]()
        if self.resume is not None:
            progress, history = self.restore(self.resume, step, net, optimizer, scheduler, schedule)
        if dist.active:
            self.wrap_ddp(step, net)
        run_dir = self.resume if self.resume is not None else Path(dist.on_main(lambda: str(claim_run_dir(self.out, cfg.model))))
        return TrainState(step=step, net=net, store=store, dataset=dataset, num_items=num_items, train_ids=train_ids, val_ids=val_ids,
                          optimizer=optimizer, scheduler=scheduler, trained=trained, schedule=schedule,
                          amp=device.type == "cuda" and cfg.amp, run_dir=run_dir, progress=progress, history=history)

    def load_data(self) -> tuple[PreparedStore, list[str], list[str]]:
        """The prepared store and the split: the store's, or the one a resumed run recorded."""
        cfg, prior = self.cfg, self.prior
        store = _prepared_store(prior["dataset"]["store"] if prior and Path(prior["dataset"]["store"]).is_dir() else cfg.data, self.dist, self.quiet)
        if prior and store.fingerprint != prior["dataset"]["fingerprint"]:
            raise DataError(f"the prepared data changed since the run started (fingerprint {store.fingerprint} != {prior['dataset']['fingerprint']}); "
                            f"cannot resume {self.resume}")
        train_ids, val_ids = store.train_ids, store.val_ids
        if prior is not None and prior.get("split"):
            # a resumed run keeps its own split, even if the store was re-split since (another --seed)
            recorded = prior["split"]
            missing = sorted((set(recorded["train"]) | set(recorded["val"])) - set(store.case_ids))
            if missing:
                raise DataError(f"--resume: the run's cases {missing[:5]} are no longer in {store.root}")
            train_ids, val_ids = list(recorded["train"]), list(recorded["val"])
        if not train_ids:
            raise DataError(f"{store.root}: no training cases in the split")
        return store, train_ids, val_ids

    def plan_schedule(self, num_items: int, default_lr: float | None = None) -> Schedule:
        """Steps and rates; ``default_lr``: the step's own default (a SAM LoRA run's), else the family's."""
        cfg, dist, model_spec = self.cfg, self.dist, self.model_spec
        steps_per_epoch = len(epoch_batches(num_items, cfg.batch_size, cfg.seed, 0, dist.rank, dist.world, cfg.max_steps))
        total = steps_per_epoch * cfg.epochs
        return Schedule(
            lr=cfg.lr if cfg.lr is not None else (default_lr or model_spec.lr),
            weight_decay=cfg.weight_decay if cfg.weight_decay is not None else model_spec.weight_decay,
            steps_per_epoch=steps_per_epoch,
            total_steps=total,
            warmup_steps=math.ceil(cfg.warmup * total) if cfg.warmup > 0 else 0,
        )

    def restore(self, run_dir: Path, step: ModelStep, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LambdaLR, schedule: Schedule) -> tuple[Progress, list[dict[str, Any]]]:
        """Tensors, optimiser, schedule, progress and RNG states from resume.pt (the RNGs last: nothing may draw after)."""
        cfg, path = self.cfg, resume_path(run_dir)
        r = load_torch(path)
        if r.get("format") != RESUME_FORMAT:
            raise DataError(f"{run_dir}: unknown resume state format {r.get('format')!r}")
        step.load_trainable_state_dict(r["state_dict"], source=f"checkpoint {path}: its")
        net.to(self.device)
        optimizer.load_state_dict(r["optimizer"])
        scheduler.load_state_dict(r["scheduler"])
        progress = Progress.from_dict(r["state"])
        history = [rec for rec in read_metrics(run_dir) if rec["epoch"] <= progress.epoch]
        if progress.epoch >= cfg.epochs:
            raise UsageError(f"{run_dir} already finished {progress.epoch} epochs; pass --epochs N with N > {progress.epoch} to train further")
        if r.get("steps_per_epoch") != schedule.steps_per_epoch:
            raise UsageError(f"cannot resume {run_dir}: {schedule.steps_per_epoch} steps per epoch now vs {r.get('steps_per_epoch')} when it stopped "
                             "(batch size, --max-steps or processes changed)")
        if r.get("total_steps") != schedule.total_steps:
            self.info(f"[yellow]Note:[/yellow] {cfg.epochs} epochs instead of {r.get('total_steps', 0) // max(1, schedule.steps_per_epoch)}: "
                      "the learning-rate schedule is stretched from here on")
        set_rng_state(r["rng"])
        return progress, history

    def wrap_ddp(self, step: ModelStep, net: torch.nn.Module) -> None:
        """Wrap the network in DistributedDataParallel; the step runs its training forwards through the wrapper."""
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(
            net,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=step.ddp_find_unused_parameters,
        )
        step.bind_network(wrapped)

    def on_train_start(self) -> None:
        """run.json for a new run, or the resumed run's updated; one line about the run."""
        s, dist = self.state, self.dist
        s.run_info = self.describe_run()
        if dist.main:
            write_run(s.run_dir, s.run_info)
        self.info(
            f"Run [bold]{s.run_dir}[/bold]: {self.model_spec.title}, {s.num_items} training slices from {len(s.train_ids)} cases, "
            f"{len(s.val_ids)} validation cases, {s.schedule.steps_per_epoch} steps/epoch, {self.device}"
            + (f" x{dist.world} processes" if dist.active else "")
            + (", bf16" if s.amp else "")
        )

    def describe_run(self) -> dict[str, Any]:
        s, cfg, dist, store = self.state, self.cfg, self.dist, self.state.store
        run_info = self.prior or {
            "format": RUN_FORMAT,
            "created": timestamp(),
            "model": cfg.model,
            "prompted": bool(s.step.prompted),
            "config": cfg.to_dict(),
            "model_config": s.step.config(),
            "dataset": {
                "data": str(Path(cfg.data).resolve()),
                "store": str(Path(store.root).resolve()),
                "fingerprint": store.fingerprint,
                "window": store.manifest.get("window"),
                "source": store.manifest.get("source"),
                "synthetic": bool(store.synthetic),
                "split_spec": store.split_spec,
                "labels": store.label_set.to_dict(),
            },
            "split": {"train": s.train_ids, "val": s.val_ids},
        }
        run_info.update({
            "status": "running",
            "updated": timestamp(),
            "config": cfg.to_dict(),
            "resolved": {
                "lr": s.schedule.lr, "weight_decay": s.schedule.weight_decay, "steps_per_epoch": s.schedule.steps_per_epoch,
                "total_steps": s.schedule.total_steps, "warmup_steps": s.schedule.warmup_steps, "device": str(self.device),
                "world_size": dist.world, "precision": "bf16 autocast" if s.amp else "fp32", "train_slices": s.num_items,
                "trainable_parameters": int(sum(p.numel() for p in s.trained)),
                "ddp": "DistributedDataParallel" if dist.active else None,
            },
            "versions": versions(),
        })
        run_info.pop("error", None)
        run_info.setdefault("command", self.command)
        run_info.setdefault("resumed", [])
        if self.resume is not None:
            run_info["resumed"].append({"at": timestamp(), "epoch": s.progress.epoch, "step": s.progress.global_step, "command": self.command})
        return run_info

    # -- training --------------------------------------------------------------
    def train_epoch(self) -> EpochStats:
        """The epoch's remaining steps; stops (:meth:`interrupt`) after a step when asked to."""
        from torch.utils.data import DataLoader

        cfg, dist, s = self.cfg, self.dist, self.state
        p = s.progress
        epoch, start = p.epoch, p.step_in_epoch
        set_epoch = getattr(s.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        batches = epoch_batches(s.num_items, cfg.batch_size, cfg.seed, epoch, dist.rank, dist.world, cfg.max_steps)
        loader = DataLoader(
            s.dataset,
            batch_sampler=batches[start:],
            collate_fn=s.step.collate,
            num_workers=cfg.workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch),
        )
        s.net.train()
        t0 = time.perf_counter() - p.seconds
        with progress_bar(self.quiet, fields=("loss {task.fields[loss]}", "{task.fields[rate]} slices/s")) as bar:
            task = bar.add_task(f"Epoch {epoch + 1}/{cfg.epochs}", total=len(batches), completed=start, loss="-", rate="-")
            for i, batch in enumerate(loader, start=start):
                value, n, wants_stop = self.train_step(batch, epoch, i)
                p.global_step += 1
                p.step_in_epoch = i + 1
                p.loss_sum += value * n
                p.loss_n += n
                p.items += len(batches[i])
                p.seconds = time.perf_counter() - t0
                rate = p.items * dist.world / max(p.seconds, 1e-9)
                bar.update(task, completed=i + 1, loss=f"{p.loss_sum / max(p.loss_n, 1):.4f}", rate=f"{rate:.1f}")
                if wants_stop and i + 1 < len(batches):
                    self.interrupt()  # mid-epoch: the state after this step
        loss_sum, loss_n, items = dist.sum([p.loss_sum, p.loss_n, p.items])
        seconds = time.perf_counter() - t0
        p.next_epoch()
        return EpochStats(loss=loss_sum / max(loss_n, 1), rate=items / max(seconds, 1e-9), seconds=seconds)

    def train_step(self, batch: Any, epoch: int, i: int) -> tuple[float, int, bool]:
        """Forward, backward, clipping and the optimiser step; returns (loss, its item count, whether any process wants to stop)."""
        s, cfg = self.state, self.cfg
        with self.autocast():
            loss, n = s.step.loss(batch, self.device)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = float(loss.detach())
        bad, wants_stop = self.dist.any([not math.isfinite(value), self.stop_wanted(s.progress.global_step + 1)])
        if bad:
            raise DataError(f"the training loss is not finite in epoch {epoch + 1}, step {i + 1}; lower --lr or check the data")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(s.trained, cfg.grad_clip)
        s.optimizer.step()
        s.scheduler.step()
        return value, n, wants_stop

    def autocast(self) -> AbstractContextManager[Any]:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.state.amp else contextlib.nullcontext()

    def stop_wanted(self, steps_done: int) -> bool:
        """Ctrl-C/SIGTERM on this process, or ``stop_after_steps`` reached."""
        return self.stop.requested or (self.stop_after_steps is not None and steps_done >= self.stop_after_steps)

    # -- an epoch's end ------------------------------------------------------------
    def on_epoch_end(self, stats: EpochStats) -> None:
        """Validate on every process, record and save on rank 0, report, and stop here when asked to."""
        s, dist = self.state, self.dist
        val = self.validate()
        record = dist.on_main(lambda: self.save_epoch(stats, val))
        if not dist.main:  # keep the summary's bookkeeping in step with rank 0
            s.history.append(record)
            if record["best"]:
                s.progress.best = {"epoch": record["epoch"]}
        if self.on_epoch is not None and dist.main:
            self.on_epoch(record, self.summary())
        if dist.any([self.stop_wanted(s.progress.global_step)])[0] and s.progress.epoch < self.cfg.epochs:
            self.interrupt(saved=True)  # resume.pt of this epoch's end is already written

    def validate(self) -> dict[str, Any] | None:
        """Validation on every process: each takes its share of the cases, the Dice sums are added up."""
        cfg, dist, s = self.cfg, self.dist, self.state
        if not s.val_ids:
            return None
        mine = s.val_ids[dist.rank :: dist.world]
        s.net.eval()
        with progress_bar(quiet=self.quiet, transient=True) as bar:
            total = sum(len(validation_slices(s.store.num_slices(c), cfg.val_slices)) for c in mine)
            task = bar.add_task(f"Validating epoch {s.progress.epoch}", total=total)
            dice, n = accumulate_dice(s.step, s.store, mine, self.device, max_slices=cfg.val_slices,
                                      batch_size=max(1, cfg.batch_size), on_batch=lambda k: bar.advance(task, k))
        if dist.active:
            k = len(dice.sums)
            merged = dist.sum([*map(float, dice.sums), *map(float, dice.counts), float(n)])
            dice.sums = np.asarray(merged[:k])
            dice.counts = np.asarray(merged[k : 2 * k]).round().astype(np.int64)
            n = round(merged[-1])
        return validation_result(dice, n)

    def save_epoch(self, stats: EpochStats, val: dict[str, Any] | None) -> dict[str, Any]:
        """Rank 0: the epoch's metrics record, last.pt (and best.pt when it improved), resume.pt, curves and run.json."""
        cfg, s = self.cfg, self.state
        p = s.progress
        per_organ = {k: _finite(v) for k, v in (val or {}).get("per_organ", {}).items()}
        mean = _finite(val["mean"]) if val else None
        record: dict[str, Any] = {
            "epoch": p.epoch,
            "step": p.global_step,
            "train_loss": stats.loss,
            "lr": float(s.scheduler.get_last_lr()[0]),
            "val_mean_dice": mean,
            "val_dice": per_organ,
            "val_slices": int(val["slices"]) if val else 0,
            "slices_per_s": stats.rate,
            "epoch_time_s": stats.seconds,
            "time": timestamp(),
        }
        # best: highest validation mean Dice; without validation, lowest training loss
        metric, value = ("val_mean_dice", mean) if mean is not None else ("train_loss", -record["train_loss"])
        best = p.best
        improved = best is None or (best["metric"] == metric and value > best["score"]) or (best["metric"] != metric and metric == "val_mean_dice")
        if improved:
            p.best = {"epoch": p.epoch, "metric": metric, "score": value, "value": record[metric]}
        record["best"] = improved
        s.history.append(record)
        ckpt_dir = s.run_dir / CHECKPOINTS_DIR
        write_metrics(s.run_dir, s.history)
        save_torch(self.checkpoint(record), ckpt_dir / "last.pt")
        if improved:
            with atomic_path(ckpt_dir / "best.pt") as tmp:
                shutil.copyfile(ckpt_dir / "last.pt", tmp)
        self.save_resume()
        training_curves(s.history, s.run_dir / CURVES_FILE)
        self.write_status("finished" if p.epoch >= cfg.epochs else "running")
        return record

    # -- saving --------------------------------------------------------------
    def checkpoint(self, record: dict[str, Any] | None) -> dict[str, Any]:
        """best.pt/last.pt: what rebuilds the model (config + trained tensors) and where it came from."""
        s = self.state
        return {
            "format": CHECKPOINT_FORMAT,
            "model": s.model_config,
            "state_dict": s.step.trainable_state_dict(),
            "epoch": s.progress.epoch,
            "step": s.progress.global_step,
            "metrics": record,
            "seed": self.cfg.seed,
            "data_fingerprint": s.store.fingerprint,
            "window": s.store.manifest.get("window"),  # predict windows new scans the same way
            "synthetic_data": bool(s.store.synthetic),  # predict says so: a phantom-trained model is no segmenter
            "labels": s.store.label_set.to_dict(),  # predict names, colours and checks organs by it
            "created": timestamp(),
            "flaresam_version": __version__,
        }

    def save_resume(self) -> None:
        s = self.state
        save_torch(
            {
                "format": RESUME_FORMAT,
                "state_dict": s.step.trainable_state_dict(),
                "optimizer": s.optimizer.state_dict(),
                "scheduler": s.scheduler.state_dict(),
                "rng": rng_state(),
                "state": s.progress.to_dict(),
                "steps_per_epoch": s.schedule.steps_per_epoch,
                "total_steps": s.schedule.total_steps,
                "config": self.cfg.to_dict(),
            },
            resume_path(s.run_dir),
        )

    def write_status(self, status: str) -> None:
        s = self.state
        p = s.progress
        s.run_info.update({"status": status, "updated": timestamp(), "epochs_done": p.epoch, "global_step": p.global_step, "best": p.best})
        if status == "finished":
            s.run_info["finished"] = timestamp()
            s.run_info["checkpoints"] = {"best": f"{CHECKPOINTS_DIR}/best.pt", "last": f"{CHECKPOINTS_DIR}/last.pt"}
        write_run(s.run_dir, s.run_info)

    # -- stopping --------------------------------------------------------------
    def interrupt(self, saved: bool = False) -> None:
        """Save the state to resume from (unless ``saved``), mark the run interrupted and raise :class:`TrainingInterrupted`."""
        s = self.state

        def save() -> None:
            if not saved:
                self.save_resume()
            self.write_status("interrupted")

        self.dist.on_main(save)
        raise TrainingInterrupted(s.run_dir, s.progress.epoch, s.progress.global_step)

    def on_train_failed(self, exc: BaseException) -> None:
        """run.json says how the run ended (Ctrl-C twice: interrupted; an error: failed)."""
        s = self.state
        if self.dist.main and (s.run_dir / RUN_FILE).exists():
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            s.run_info.update({"status": status, "updated": timestamp(), "error": f"{type(exc).__name__}: {exc}"})
            write_run(s.run_dir, s.run_info)

    def summary(self) -> dict[str, Any]:
        s = self.state
        p, hist = s.progress, s.history
        best = p.best
        best_record = next((r for r in hist if best and r["epoch"] == best.get("epoch")), None)
        return {
            "run_dir": str(s.run_dir),
            "status": "finished" if p.epoch >= self.cfg.epochs else "running",
            "model": self.cfg.model,
            "epochs": p.epoch,
            "steps": p.global_step,
            "best": best_record,
            "last": hist[-1] if hist else None,
            "labels": s.store.label_set.to_dict(),
            "checkpoints": {
                "best": str(s.run_dir / CHECKPOINTS_DIR / "best.pt"),
                "last": str(s.run_dir / CHECKPOINTS_DIR / "last.pt"),
            },
        }


# ---------------------------------------------------------------------------
# helpers


def _prepared_store(data: str, dist: Dist, quiet: bool) -> PreparedStore:
    """The prepared store of ``data`` (rank 0 prepares a raw dataset once; every process opens it)."""
    from flaresam.data.store import PreparedStore, ensure_prepared

    def prepare() -> str:
        if not Path(data).exists():
            raise DataError(f"--data {data}: no such folder")
        return str(ensure_prepared(data, quiet=quiet).root)

    root = dist.on_main(prepare)
    return PreparedStore(root)


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
