"""Fine-tuning loop (Sec. 4.1, Eq. 9): AdamW, warmup + linear decay, gradient accumulation, resume.

For the routed MLAS-LoRA student, `route(pair_ids)` tells every LoRA layer which pair each row
of the micro-batch belongs to, so only the general LoRA and that pair's LoRA see the sample.
The loss is the next-token cross-entropy on target tokens only (mean over the micro-batch's
target tokens), with logits computed at the target-predicting positions only (`training.loss`);
with `training.distill` on, a frozen teacher's divergence on the same batch is mixed in
(`training.distill`, beyond the paper).
Checkpoints hold the adapters (safetensors, written by `save_adapters`) and the training state
(optimizer, scheduler, RNG, data position) apart, as torchtune does; a resumed run rebuilds the seeded data
order and continues from the exact micro-batch it stopped at.

Data-parallel under `accelerate launch` (DDP): the global batch stays micro_batch x grad_accum
whatever the number of processes N. Of each step's grad_accum micro-batches, process i runs
i, i + N, ... (so grad_accum >= N; it need not divide), scaling its losses by N / grad_accum so
that DDP's average over processes is the one-process mean; gradients are synchronised once per
step (`no_sync` before the process's last micro-batch). Every process routes its own rows. A pair
absent from a step on every process keeps grad None (DDP with `find_unused_parameters` leaves a
parameter unused everywhere untouched), so AdamW skips it as in one process. The main process
writes the checkpoints and the log; every process resumes from the same checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from safetensors import SafetensorError
from transformers import get_linear_schedule_with_warmup

from mlas_lora.data.records import Example
from mlas_lora.distributed import all_reduce_sum_, barrier, is_main_process, rank_and_size
from mlas_lora.errors import MlasLoraError
from mlas_lora.progress import progress_bar
from mlas_lora.stage_files import write_json_atomic
from mlas_lora.training.config import TrainingConfig
from mlas_lora.training.data import Feature, collate, epoch_batches, featurize, width_multiple
from mlas_lora.training.distill import distill_loss
from mlas_lora.training.loss import IGNORE, predicting_positions

Route = Callable[[torch.Tensor], contextlib.AbstractContextManager]


@dataclass
class TrainResult:
    steps: int
    seconds: float
    loss_per_pair: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    peak_rss_mb: float | None = None
    """The process's peak resident memory so far (teacher included under token distillation)."""


def peak_rss_mb() -> float | None:
    """The peak resident set size of this process in MiB (None where `resource` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if platform.system() == "Darwin" else 1024), 1)


def total_steps(n_micro_per_epoch: int, config: TrainingConfig) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.epochs * n_micro_per_epoch / config.grad_accum))


STATE = "training_state.pt"


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """`checkpoints/step-NNNNNN` folders that were written completely, oldest first (a save writes
    `step-N.tmp` and renames it only when adapters and training state are both on disk); an older
    one may have had its training state dropped since (`keep_states`)."""
    found = (out_dir / "checkpoints").glob("step-*")
    return sorted(p for p in found if p.name[5:].isdigit() and (p / "adapters").is_dir())


def resumable_checkpoints(out_dir: Path) -> list[Path]:
    """The complete checkpoints that still hold their training state, oldest first."""
    return [p for p in complete_checkpoints(Path(out_dir)) if (p / STATE).is_file()]


def drop_old_states(out_dir: Path, keep: int) -> None:
    """Delete the training state of all but the newest `keep` resumable checkpoints (`keep_states`):
    their adapters stay for `curve`; a resume reads a newer state."""
    for old in resumable_checkpoints(out_dir)[:-keep]:
        (old / STATE).unlink()


def newest_checkpoint(out_dir: Path) -> Path | None:
    """The newest checkpoint a resume can start from (adapters and training state)."""
    found = resumable_checkpoints(Path(out_dir))
    return found[-1] if found else None


def remove_partial_checkpoints(out_dir: Path) -> None:
    """Delete `step-N.tmp` folders that a killed save left behind."""
    for path in (Path(out_dir) / "checkpoints").glob("step-*.tmp"):
        shutil.rmtree(path, ignore_errors=True)


def _sum_over_processes(values: list[float]) -> list[float]:
    """The element-wise sums over all processes (float64); `values` as they are in one process."""
    if rank_and_size()[1] == 1:
        return values
    summed = torch.tensor(values, dtype=torch.float64)
    all_reduce_sum_([summed])
    return summed.tolist()


class _PairLoss:
    """Running mean loss per pair, for the progress bar and the log."""

    def __init__(self, pairs: list[str]):
        self.pairs, self.sum, self.count = pairs, [0.0] * len(pairs), [0] * len(pairs)

    def add(self, pair_ids: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> None:
        for p, s, c in zip(pair_ids.tolist(), sums.tolist(), counts.tolist(), strict=True):
            self.sum[p] += s
            self.count[p] += c

    def means(self) -> dict[str, float]:
        return {p: self.sum[i] / self.count[i] for i, p in enumerate(self.pairs) if self.count[i]}

    def sum_across_processes(self) -> None:
        self.sum, self.count = (
            _sum_over_processes(self.sum),
            [int(c) for c in _sum_over_processes(self.count)],
        )

    def reset(self) -> None:
        self.sum, self.count = [0.0] * len(self.pairs), [0] * len(self.pairs)


class Trainer:
    """Owns the optimizer, the schedule, the data position and the checkpoints of one run."""

    def __init__(
        self,
        model,
        tokenizer,
        examples: list[Example],
        pairs: list[str],
        config: TrainingConfig,
        out_dir: Path,
        route: Route | None,
        save_adapters: Callable[[Path], None],
        load_adapters: Callable[[Path], None],
        bf16: bool = False,
        update_norms: Callable[[], dict[str, float]] | None = None,
        after_step: Callable[[int, int], None] | None = None,
        teacher=None,
    ):
        """`update_norms`, if given, is called after every optimizer step and its {name: ||Delta W|| /
        ||W||} goes into that step's history record (`adapters.update_norms`). `after_step(step,
        total)`, if given, runs after every optimizer step (the gradients still set) and before that
        step's checkpoint: a method's own schedule, e.g. AFLoRA freezing its matrices. `teacher`, with
        `config.distill` on, is the frozen model whose logits on the same batch the loss distils
        (training/distill.py); it is never trained nor wrapped by accelerate."""
        if not examples:
            raise MlasLoraError("no training examples")
        self.config, self.out_dir, self.route, self.pairs = config, Path(out_dir), route, pairs
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.save_adapters, self.load_adapters = save_adapters, load_adapters
        self.update_norms, self.after_step = update_norms, after_step
        self.teacher = teacher if config.distill.enabled else None
        if self.teacher is not None:
            self.teacher.requires_grad_(False).eval()
        self.rank, self.processes = rank_and_size()  # sets up the process group under a launcher
        if config.grad_accum < self.processes:
            raise MlasLoraError(
                f"training.grad_accum ({config.grad_accum}) must be >= the number of processes "
                f"({self.processes}): each process runs some of a step's micro-batches"
            )
        # The bf16 autocast is ours (`_forward`), not accelerate's mixed precision: accelerate keeps it in a
        # process-wide state that refuses another value later in the process (a float32 full-ft after
        # a bf16 LoRA in one experiment), and `prepare` would wrap the model's forward in an autocast
        # for good, so that a model trained in this process decoded differently from the same model
        # loaded from its checkpoint. Translation applies the same autocast (GenerationConfig.precision).
        self.bf16 = bf16
        self.accelerator = Accelerator(
            mixed_precision="no",
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.width_multiple = width_multiple(self.accelerator.device)  # 8 on a GPU, else exact widths
        self.features: list[Feature] = featurize(tokenizer, examples, pairs, config.max_tokens)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise MlasLoraError("the model has no trainable parameters")
        self.n_micro = len(
            epoch_batches(self.features, config.micro_batch, config.seed, 0, config.mixed_pairs)
        )
        self.steps = total_steps(self.n_micro, config)
        optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = get_linear_schedule_with_warmup(
            optimizer, int(config.warmup_ratio * self.steps), self.steps
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = scheduler
        self.step, self.history = 0, []
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    def _micro_batch(self, index: int) -> list[Feature]:
        epoch, within = divmod(index, self.n_micro)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            c = self.config
            self._epoch_cache = (
                epoch,
                epoch_batches(self.features, c.micro_batch, c.seed, epoch, c.mixed_pairs),
            )
        return [self.features[i] for i in self._epoch_cache[1][within]]

    def _forward(self, batch: dict[str, torch.Tensor]):
        device = self.accelerator.device
        route = self.route(batch["pair_ids"].to(device)) if self.route else contextlib.nullcontext()
        labels = batch["labels"].to(device)
        keep = predicting_positions(labels != IGNORE)
        with route, torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                logits_to_keep=keep,
            )
        return distill_loss(out.logits, self._teacher_logits(batch, keep), labels, self.config.distill)

    @torch.no_grad()
    def _teacher_logits(self, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor | None:
        """The teacher's logits at the student's target-predicting positions (None without a teacher)."""
        if self.teacher is None:
            return None
        device = next(self.teacher.parameters()).device
        return self.teacher(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            logits_to_keep=keep.to(device),
        ).logits.to(self.accelerator.device)

    def train_step(self, tracker: _PairLoss) -> float:
        self.optimizer.zero_grad(set_to_none=True)  # pairs absent from this step keep grad None
        total, accum = 0.0, self.config.grad_accum
        micro = self._step_micro_batches(self.step)
        step_tokens = (
            sum(_target_tokens(f) for batch in micro for f in batch) if self.config.group_by_length else 0
        )
        mine = range(self.rank, accum, self.processes)  # this process's micro-batches of the step
        for k in mine:
            batch = collate(micro[k], self.pad_id, self.width_multiple)
            sync = contextlib.nullcontext() if k == mine[-1] else self.accelerator.no_sync(self.model)
            with sync:
                loss, sums, counts = self._forward(batch)
                if step_tokens:  # every target token of the step weighs alike, whatever its micro-batch
                    share = counts.sum().item() / step_tokens
                    self.accelerator.backward(loss * share * self.processes)
                    total += loss.item() * share
                else:
                    self.accelerator.backward(loss / (accum / self.processes))
                    total += loss.item() / accum
            tracker.add(batch["pair_ids"], sums, counts)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return _sum_over_processes([total])[0]

    def _step_micro_batches(self, step: int) -> list[list[Feature]]:
        """The grad_accum micro-batches of optimizer step `step`; with `group_by_length`, the same examples
        sorted by length (ties in their shuffled order) and cut into micro-batches of the same sizes."""
        accum = self.config.grad_accum
        micro = [self._micro_batch(step * accum + k) for k in range(accum)]
        if not self.config.group_by_length:
            return micro
        ordered = sorted((f for batch in micro for f in batch), key=lambda f: len(f.input_ids))
        out, start = [], 0
        for batch in micro:
            out.append(ordered[start : start + len(batch)])
            start += len(batch)
        return out

    def save_checkpoint(self) -> Path:
        """Adapters + training state in `checkpoints/step-N/`, written to a temp dir then renamed
        (by the main process; the others wait for it)."""
        final = self.out_dir / "checkpoints" / f"step-{self.step:06d}"
        if is_main_process():
            self._write_checkpoint(final)
        barrier()
        return final

    def _write_checkpoint(self, final: Path) -> None:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "history": self.history,
        }
        try:
            (tmp / "adapters").mkdir(parents=True)
            self.save_adapters(tmp / "adapters")
            torch.save(state, tmp / STATE)  # a full disk: RuntimeError "unexpected pos", no file named
        except (OSError, RuntimeError, SafetensorError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise MlasLoraError(
                f"{tmp}: the checkpoint of step {self.step} could not be written ({type(err).__name__}: "
                f"{first}); is the disk full? Earlier checkpoints are kept: free space and run again to resume"
            ) from None
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        keep = self.config.keep_checkpoints
        if keep is not None:
            for old in complete_checkpoints(self.out_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        drop_old_states(self.out_dir, self.config.keep_states)

    def load_checkpoint(self, path: Path) -> None:
        if not (path / STATE).is_file():
            raise MlasLoraError(
                f"{path}: no {STATE} (adapters only: older checkpoints drop their training state, "
                f"training.keep_states); resume from {newest_checkpoint(path.parent.parent)}"
            )
        self.load_adapters(path / "adapters")
        try:  # weights_only: tensors and plain containers only; a crafted pickle runs no code
            state = torch.load(path / STATE, weights_only=True)
        except Exception as err:  # noqa: BLE001 - truncated, empty or foreign file
            raise MlasLoraError(
                f"{path / STATE}: unreadable training state ({type(err).__name__}); delete {path} "
                "to resume from the newest one before it that keeps its training state (training.keep_states)"
            ) from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step, self.history = state["step"], state["history"]

    def fit(
        self,
        resume: str | None = "auto",
        progress: bool = True,
        stop_after: int | None = None,
        desc: str = "train",
    ) -> TrainResult:
        """Train to `self.steps` optimizer steps (or stop early after `stop_after`, for tests); `desc`
        labels the progress bar (the pipeline's `train SYSTEM`: which of a run's trainings this is)."""
        main = is_main_process()
        if main:
            remove_partial_checkpoints(self.out_dir)
        if resume:
            path = newest_checkpoint(self.out_dir) if resume == "auto" else Path(resume)
            if path is not None:
                self.load_checkpoint(path)
        tracker, start = _PairLoss(self.pairs), time.perf_counter()
        bar = progress_bar(
            desc=desc, total=self.steps, initial=self.step, unit="step", show=progress and main
        )
        while self.step < self.steps and (stop_after is None or self.step < stop_after):
            loss = self.train_step(tracker)
            if not math.isfinite(loss):  # every later step would be NaN too: stop before a checkpoint
                raise MlasLoraError(
                    f"training stopped at step {self.step}: the loss is {loss}, not a finite number; the "
                    f"checkpoints in {self.out_dir / 'checkpoints'} are from before it. Lower training.lr, "
                    "or check the initial adapters (e.g. lora.teacher_scale) and the training data"
                )
            if self.after_step is not None:
                self.after_step(self.step, self.steps)
            record = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0]}
            if self.update_norms is not None:
                record["update_norm"] = self.update_norms()
            self.history.append(record)
            bar.set_postfix({p: f"{v:.3f}" for p, v in tracker.means().items()})
            bar.update(1)
            if self.step % self.config.checkpoint_every == 0 or self.step == self.steps:
                self.save_checkpoint()
        bar.close()
        tracker.sum_across_processes()
        result = TrainResult(
            self.step, time.perf_counter() - start, tracker.means(), self.history, peak_rss_mb()
        )
        if main:
            write_json_atomic(self.out_dir / "train_log.json", result.__dict__)
        return result


def _target_tokens(feature: Feature) -> int:
    """Target tokens of one example: the positions the loss reads (labels after the first)."""
    return sum(1 for label in feature.labels[1:] if label != IGNORE)
