"""The experiment config: what `mlas-lora run CONFIG.yaml` reads (see configs/ for examples)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from mlas_lora.adapters.structure import STRUCTURES
from mlas_lora.awareness.classify import lambda_problem
from mlas_lora.config import hashed_dict
from mlas_lora.errors import MlasLoraError
from mlas_lora.languages import Direction
from mlas_lora.models.arch import PROJECTIONS
from mlas_lora.training.config import TrainingConfig
from mlas_lora.transfer.plan import InitPlan
from mlas_lora.translation.generate import GenerationConfig

TARGETS = ("reference", "teacher", "mixed")


@dataclass
class TeacherFilter:
    """Which teacher translations are not used as training targets (`data.teacher_filter`): a dropped
    one leaves its row's reference (the trainer reads the same rows), a dropped monolingual row goes."""

    empty: bool = True
    """Drop an empty translation."""
    copy: bool = True
    """Drop a copy of the source (the same text, whitespace and case aside)."""
    length_ratio: list[float] = field(default_factory=lambda: [0.25, 4.0])
    """Drop a translation whose length in characters over its source's is outside [low, high]."""

    def problems(self) -> list[str]:
        band = self.length_ratio
        if len(band) != 2 or not 0 <= band[0] < band[1] or band[1] != band[1] or band[1] == float("inf"):
            return [f"data.teacher_filter.length_ratio must be [low, high] with 0 <= low < high, got {band}"]
        return []


@dataclass
class DataConfig:
    """Which parallel data, which directions, and how much of each split."""

    corpus: str = "embedded"
    """'embedded' (built by `mlas-lora data build`), a folder of {split}.{src}-{tgt}.tsv files, or a
    reader spec template such as `hf:wmt18:{xx}-en:{split}` (fields: src, tgt, xx, split)."""
    split_names: dict[str, str] = field(default_factory=dict)
    """Names of the splits in that corpus, e.g. {dev: validation}; an empty name skips the split."""
    directions: list[str] = field(default_factory=lambda: ["en-cs", "en-de", "en-et", "en-fi"])
    train_per_direction: int | None = None
    """Training pairs per direction (None = all)."""
    seed_per_direction: int = 1000
    """Seed sentences per direction for awareness scoring (the dev split; the paper used 1,000)."""
    valid_per_direction: int = 0
    """Validation segments per direction, for choosing hyper-parameters (0 = none): carved from the
    dev split of `corpus`, disjoint from the seed sentences, >= min_test_words English words."""
    test_per_direction: int | None = None
    ood_per_direction: int | None = 0
    """Out-of-domain test segments per direction (0 = skip, None = all)."""
    min_test_words: int = 4
    """Valid, test and OOD segments keep those whose English side has at least this many words."""
    shots: int = 5
    sample: str = "random"
    """How a split larger than its `*_per_direction` is cut: 'random' (uniform, seeded by `seed`, read
    as a stream: the paper's random 200k pairs and 1k seeds) or 'first' (the first N rows). The
    embedded corpus keeps its own seeded subset (`load_embedded`) for train, dev, test and ood."""
    seed: int = 0
    """Seed of the random samples; both directions of a language pair draw the same rows."""
    test_corpus: str | None = None
    """Where the test split comes from, if not from `corpus` (same forms as `corpus`), e.g. FLORES-200
    devtest while training on WMT18 (the paper's A.5 check). Train, dev, valid and ood stay in `corpus`."""
    test_split: str = "test"
    """The test split's name in `test_corpus` (FLORES-200: devtest)."""
    train_directions: list[str] | None = None
    """The directions trained systems learn from (train split and seed sentences); null: all of
    `directions`. Only `directions` are evaluated, so these may be others (the verdict's unseen
    directions) or a subset (Fig. 2: train on one direction, test on every one). A training's key
    names these alone, so it is shared with a run whose `directions` are these."""
    targets: str = "reference"
    """What trained systems learn to write (beyond the paper): 'reference' (the corpus's translations),
    'teacher' (the teacher's greedy translations of the training sources the trainer reads, with the
    evaluation prompt: sequence-level distillation, Kim and Rush 2016) or 'mixed' (the teacher's for a
    seeded `teacher_share` of those rows, the references for the rest). A system may set it."""
    teacher_share: float = 0.5
    """targets 'mixed': the share of the rows read whose target is the teacher's."""
    teacher_filter: TeacherFilter | None = None
    """Teacher translations to leave out (empty, copies, length ratio off a band); null: use them all.
    What it dropped is counted in train-<system>/targets.json and in the report."""
    monolingual: dict[str, str] = field(default_factory=dict)
    """{direction: file}: source-only text, one sentence a line, whose teacher translations are added
    to that trained direction's training rows (e.g. new UI strings without translations)."""

    EVAL_FIELDS: ClassVar[tuple[str, ...]] = (
        "valid_per_direction",
        "test_per_direction",
        "ood_per_direction",
        "min_test_words",
        "shots",
        "test_corpus",
        "test_split",
    )
    """The settings only evaluation reads: changing them re-runs no training stage."""
    TARGET_FIELDS: ClassVar[tuple[str, ...]] = ("targets", "teacher_share", "teacher_filter", "monolingual")
    """The settings of the training targets (beyond the paper): only trained systems read them (a
    system may set them), and a training's key holds them only where they act."""

    @property
    def teacher_targets(self) -> bool:
        """Whether the teacher translates anything the trainer reads (its targets or monolingual text)."""
        return self.targets != "reference" or bool(self.monolingual)

    def train_settings(self) -> dict:
        """The settings a training stage reads: all but the evaluation-only ones (EVAL_FIELDS); a
        field added later enters only when set, so the keys of earlier runs stay valid."""
        out = {k: v for k, v in asdict(self).items() if k not in self.EVAL_FIELDS + self.TARGET_FIELDS}
        if out["train_directions"] is not None:  # trained on these whatever is evaluated: one key
            out["directions"] = out["train_directions"]
        del out["train_directions"]
        return out | self.target_settings()

    def target_settings(self) -> dict:
        """The target settings where they act (none by default: the keys of earlier runs stay valid)."""
        out: dict = {}
        if self.targets != "reference":
            out["targets"] = self.targets
        if self.targets == "mixed":
            out["teacher_share"] = self.teacher_share
        if self.monolingual:
            out["monolingual"] = dict(sorted(self.monolingual.items()))
        if self.teacher_targets and self.teacher_filter is not None:
            out["teacher_filter"] = asdict(self.teacher_filter)
        return out

    @property
    def trained_directions(self) -> list[str]:
        return list(self.directions if self.train_directions is None else self.train_directions)

    def problems(self) -> list[str]:
        from mlas_lora.data.readers import template_problem
        from mlas_lora.data.sampling import SAMPLING

        out = []
        if self.sample not in SAMPLING:
            out.append(f"data.sample: {self.sample!r} (known: {', '.join(SAMPLING)})")
        for name in ("corpus", "test_corpus"):
            value = getattr(self, name)
            if value is not None and "{" in value and (problem := template_problem(value)):
                out.append(f"data.{name}: template {problem}")
        for name in ("train_per_direction", "test_per_direction", "ood_per_direction"):
            value = getattr(self, name)
            if value is not None and value < 0:
                out.append(f"data.{name} must be >= 0 (or null: all), got {value}")
        if self.seed_per_direction < 1:
            out.append(f"data.seed_per_direction must be >= 1, got {self.seed_per_direction}")
        if self.shots < 0 or self.min_test_words < 0:
            out.append("data.shots and data.min_test_words must be >= 0")
        if not isinstance(self.valid_per_direction, int) or self.valid_per_direction < 0:
            out.append(f"data.valid_per_direction must be an int >= 0, got {self.valid_per_direction!r}")
        for d in self.directions:
            try:
                Direction.parse(d)
            except MlasLoraError as err:
                out.append(f"data.directions: {err}")
        if not self.directions:
            out.append("data.directions: at least one direction is needed")
        if self.train_directions is not None and not self.train_directions:
            out.append("data.train_directions must be non-empty (or null: data.directions)")
        for d in self.train_directions or ():
            try:
                Direction.parse(d)
            except MlasLoraError as err:
                out.append(f"data.train_directions: {err}")
        return out + self._target_problems()

    def _target_problems(self) -> list[str]:
        out = []
        if self.targets not in TARGETS:
            out.append(f"data.targets: {self.targets!r} (known: {', '.join(TARGETS)})")
        if not 0 <= self.teacher_share <= 1:
            out.append(f"data.teacher_share must be in [0, 1], got {self.teacher_share}")
        for direction, path in self.monolingual.items():
            try:
                Direction.parse(direction)
            except MlasLoraError as err:
                out.append(f"data.monolingual: {err}")
                continue
            if direction not in self.trained_directions:
                out.append(
                    f"data.monolingual: {direction} is not a trained direction ({', '.join(self.trained_directions)})"
                )
            if not isinstance(path, str) or not path:
                out.append(f"data.monolingual.{direction}: a file path, got {path!r}")
        return out


@dataclass
class ModelsConfig:
    teacher: str = "qwen2.5-coder-1.5b-instruct"
    student: str = "qwen2.5-coder-0.5b-instruct"
    dtype: str = "auto"
    """'auto' (bfloat16 where the CPU supports it), 'bfloat16', 'float32' or 'float16'."""

    def problems(self) -> list[str]:
        from mlas_lora.models.loading import DTYPES

        if self.dtype == "auto" or self.dtype in DTYPES:
            return []
        return [f"models.dtype: {self.dtype!r} (known: auto, {', '.join(DTYPES)})"]


MERGE_MODES = ("none", "weights")


@dataclass
class EvaluationConfig:
    metrics: list[str] = field(default_factory=lambda: ["bleu", "chrf", "meteor"])
    comet_model: str | None = None
    """A local COMET checkpoint (.ckpt, or a folder with checkpoints/model.ckpt): needed by `comet` in
    metrics, and checked before a run's first stage (with unbabel-comet installed)."""
    bootstrap_samples: int = 1000
    baseline_for_significance: str | None = "auto"
    """The system every trained system is bootstrapped against (a system of the config); `auto`: `lora`
    where the config has it, else none; null: none."""

    def significance_baseline(self, systems: list[str]) -> str | None:
        """The baseline system name, resolved against the config's system names."""
        if self.baseline_for_significance == "auto":
            return "lora" if "lora" in systems else None
        return self.baseline_for_significance

    merge: str = "none"
    """How a trained system is run while its test sets are translated: 'none' (adapters unmerged:
    exactly the trained function, the default) or 'weights' (each pair's update merged into the base
    weights in their own dtype, at the base model's speed; in bfloat16 a small update is partly
    rounded away, so the evaluated model is not the trained one: the default before it was measured)."""

    def problems(self) -> list[str]:
        known = {"bleu", "chrf", "meteor", "comet"}
        out = [
            f"evaluation.metrics: unknown metric {m!r} (known: {sorted(known)})"
            for m in self.metrics
            if m not in known
        ]
        if "comet" in self.metrics and not self.comet_model:
            out.append(
                "evaluation.metrics asks for comet but evaluation.comet_model is not set: give a local "
                "COMET checkpoint (e.g. Unbabel/wmt22-comet-da, the folder with checkpoints/model.ckpt) "
                "or leave comet out of the metrics"
            )
        if self.merge not in MERGE_MODES:
            out.append(f"evaluation.merge: {self.merge!r} (known: {', '.join(MERGE_MODES)})")
        if self.bootstrap_samples < 1:
            out.append(f"evaluation.bootstrap_samples must be >= 1, got {self.bootstrap_samples}")
        return out


@dataclass
class AwarenessConfig:
    """Eq. (1)-(2) and the general/specific split (Sec. 3.1)."""

    batch_size: int = 8
    lam: float | str = 0.2
    """lambda: a neuron is specific to pair i when its normalised score share exceeds this. 'auto'
    scales the paper's 0.2 (set for 14 pairs) to the number of pairs (awareness.classify.auto_lambda)."""
    selection: str = "mean"
    """Layer selection over pairs: 'mean' of R over pairs."""
    relevance_reading: str = "source"
    """Which tokens Eq. (1) averages over: 'source' (the source segment in the translation prompt, the
    paper's "forward pass of a source sentence"), 'prompt' (the whole prompt) or 'all' (prompt and
    reference target, this project's reading before the paper's became the default)."""
    normalize: str = "tokens"
    """How each pair's Phi is made comparable before the shares of Sec. 3.1: 'tokens' (mean per scored
    token), 'total' (every pair the same total per matrix side) or 'none' (raw sums)."""
    max_tokens: int = 256
    """Seed sentences are cut to this many tokens (prompt end + target start), as training cuts them."""

    def problems(self) -> list[str]:
        from mlas_lora.awareness.classify import NORMALIZATIONS
        from mlas_lora.awareness.layer_relevance import READINGS

        out = []
        if problem := lambda_problem(self.lam):
            out.append(f"awareness.lam {problem}")
        if self.selection not in ("mean",):
            out.append(f"awareness.selection: {self.selection!r} (known: mean)")
        if self.relevance_reading not in READINGS:
            out.append(
                f"awareness.relevance_reading: {self.relevance_reading!r} (known: {', '.join(READINGS)})"
            )
        if self.normalize not in NORMALIZATIONS:
            out.append(f"awareness.normalize: {self.normalize!r} (known: {', '.join(NORMALIZATIONS)})")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 2:
            out.append(f"awareness.max_tokens must be an int >= 2, got {self.max_tokens!r}")
        return out


LORA_INITS = ("teacher", "random", "student")


@dataclass
class LoraSettings:
    """The `lora:` section: the general and specific LoRAs (Eq. 7-9); not PEFT's LoraConfig."""

    r_gen: int = 8
    r_spe: int = 8
    alpha_gen: float = 16.0
    alpha_spe: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    init_mode: str = "add"
    """'add' (literal Eq. 9: W + teacher factors) or 'residual' (function-preserving at step 0).
    'add' became the default after the first measured runs, where it matched or slightly led residual
    (chrF++ 27.78 vs 27.77 in the demo, 29.85 vs 29.54 in embedded-4dir at 150 segments); the later runs
    (docs/results-archive.md) put residual slightly ahead (28.03 vs 27.55; 29.48 vs 29.33 at 300 segments). All
    within noise, so no mode is better on our data; the default was not changed."""
    teacher_scale: float = 1.0
    """The initial update of each LoRA is teacher_scale x the rank-r SVD of its teacher submatrix:
    A = V_r^T, B = U_r S_r teacher_scale / (alpha / r) (Eq. 8 with one constant in B)."""
    fill_rule: str = "ranked"
    """How a pair whose specific neurons are too few fills its rows / columns: 'ranked' (the best of
    its own ranking, often the general init's neurons) or 'exclude-general' (the best of those the
    general init of that matrix did not choose). To be chosen on the validation split."""
    structure: str = "mlas"
    """Which LoRAs the routed student has (adapters/structure.py): 'mlas' (general r_gen + per-pair
    r_spe), 'shared' (one LoRA of rank r_gen + r_spe) or 'per-pair' (rank r_gen + r_spe each, no
    general LoRA): the -R-* and -M-* ablations."""
    init: str = "teacher"
    """'teacher' (SVD of teacher submatrices, Eq. 7-8), 'random' (PEFT's: A kaiming, B = 0) or
    'student' (the control `mlas-pissa`: the SVD of the student's own weight at each routed
    projection, the general LoRA its top r_gen components and every pair's LoRA the next r_spe, set
    by init_mode and teacher_scale as teacher factors are: the teacher replaced by the student)."""

    def problems(self) -> list[str]:
        from mlas_lora.transfer.extract import FILL_RULES

        out = [
            f"lora.targets: unknown projection {t!r} (known: {PROJECTIONS})"
            for t in self.targets
            if t not in PROJECTIONS
        ]
        if self.init_mode not in ("add", "residual"):
            out.append(f"lora.init_mode: {self.init_mode!r} (known: add, residual)")
        if self.r_gen < 1 or self.r_spe < 1:
            out.append("lora.r_gen and lora.r_spe must be >= 1")
        if not 0 <= self.dropout < 1:
            out.append(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.alpha_gen <= 0 or self.alpha_spe <= 0:
            out.append("lora.alpha_gen and lora.alpha_spe must be > 0")
        if self.teacher_scale < 0:
            out.append(f"lora.teacher_scale must be >= 0, got {self.teacher_scale}")
        if self.fill_rule not in FILL_RULES:
            out.append(f"lora.fill_rule: {self.fill_rule!r} (known: {', '.join(FILL_RULES)})")
        if self.structure not in STRUCTURES:
            out.append(f"lora.structure: {self.structure!r} (known: {', '.join(STRUCTURES)})")
        if self.init not in LORA_INITS:
            out.append(f"lora.init: {self.init!r} (known: {', '.join(LORA_INITS)})")
        return out


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    output_dir: str = "runs/experiment"
    cells: str | None = field(default=None, metadata={"hashed": False})
    """A folder of finished hypothesis cells written by `mlas-lora cells export` (experiments/cells.py),
    relative to the current folder as output_dir is: a cell the run folder lacks is taken from there,
    if made under the same key from the same segments, instead of being translated (and its system
    trained) again. Where the cells lie changes no result: no key or config hash holds it."""
    seed: int = 0
    systems: list[str | dict] = field(default_factory=lambda: ["zero-shot", "in-context"])
    """Each a preset or method name (`lora`, `mlas-lora-residual`, `Mr-spe`; methods/presets.py) or a
    mapping {name, method or preset, and the sections it changes: lora, training, awareness, transfer},
    e.g. {name: mlas-r4, method: mlas-lora, lora: {r_spe: 4}}. Checked by experiments/systems.py."""
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    awareness: AwarenessConfig = field(default_factory=AwarenessConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    transfer: InitPlan = field(default_factory=InitPlan)
    """Which teacher layers and neurons the inits are cut from (transfer/plan.py; ablations)."""
    options: dict = field(default_factory=dict)
    """Settings of one method that no other reads (e.g. MELoRA's number of mini-LoRAs), given per
    system; the method checks them against its own dataclass (`methods.base.method_options`)."""

    def __post_init__(self):
        for name in ("output_dir", "cells"):
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("~"):  # not a folder named ~
                setattr(self, name, os.path.expanduser(value))

    def problems(self) -> list[str]:
        out = []
        if not self.output_dir.strip():
            out.append("output_dir is empty (the run would write into the current folder): name a folder")
        if self.cells is not None and not self.cells.strip():
            out.append("cells is empty: name the folder of exported cells, or leave it out")
        return out

    def key_tree(self) -> dict:
        """The config as a tree less the distillation settings where they do not act: what a key of
        the whole config hashes (`mlas-lora curve`), so it stays that of runs made before them."""
        tree = hashed_dict(self)
        if not self.training.distill.enabled:
            del tree["training"]["distill"]
        acting = self.data.target_settings()
        for name in DataConfig.TARGET_FIELDS:
            if name not in acting:
                del tree["data"][name]
        return tree
