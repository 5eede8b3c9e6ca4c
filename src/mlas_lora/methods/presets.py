"""Named systems: a method plus the settings it changes (data, not code).

A config's `systems:` may name any of these; a mapping there may start from one (`preset:`) and
change more. The ablations follow the paper's Section 4.4 (Table 2) at the total rank of MLAS-LoRA
(r_gen + r_spe per sample) and its budget; where the paper is silent our reading is said beside them.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "zero-shot": {"method": "zero-shot"},
    "in-context": {"method": "in-context"},
    "lora": {"method": "lora"},
    "mlas-lora": {"method": "mlas-lora"},
    "mlas-lora-add": {"method": "mlas-lora", "lora": {"init_mode": "add"}},
    "mlas-lora-residual": {"method": "mlas-lora", "lora": {"init_mode": "residual"}},
    # General + per-pair LoRAs, randomly initialised: the architecture without the teacher. Not the
    # paper's -M-i, which has no general LoRA.
    "mlas-lora-random": {"method": "mlas-lora", "lora": {"init": "random"}},
    # The teacher itself, 0-shot with the student's prompt: the ceiling of what transfer could reach.
    "teacher": {"method": "teacher"},
    # LoRA at MLAS-LoRA's total trainable parameters (rank r_gen + P x r_spe, one shared LoRA), beside
    # `lora` at the rank one pair's sample sees (r_gen + r_spe): the two budget rules, side by side.
    "lora-total": {"method": "lora", "options": {"rank": "total"}},
    # Controls for "teacher knowledge" against "SVD initialisation" (the verdict experiment):
    # `pissa` is `lora` started from the SVD of the student's own weights (PEFT's PiSSA: principal
    # factors trained, the residual frozen, the function unchanged at step 0); `mlas-pissa` is
    # MLAS-LoRA (general + per-pair, init mode and scale as configured) with every factor from the
    # student's own SVD instead of a teacher submatrix.
    "pissa": {"method": "lora", "options": {"init": "pissa"}},
    "mlas-pissa": {"method": "mlas-lora", "lora": {"init": "student"}},
}

ABLATIONS: dict[str, dict] = {
    # -R-i: one LoRA for all pairs, random init. The paper's Table 1 LoRA row equals this row, so it
    # is the `lora` method (PEFT), not a routed copy of it.
    "R-i": {"method": "lora"},
    # -R-a: one LoRA initialised from the relevant (Eq. 1) teacher layers without the general /
    # specific split: every neuron a candidate, ranked by its awareness averaged over pairs.
    "R-a": {"method": "mlas-lora", "lora": {"structure": "shared"}, "transfer": {"general_from": "all"}},
    # -R-s: one LoRA from randomly selected teacher layers (seeded; never the relevant set itself),
    # no split. Our reading: neurons ranked by awareness as in -R-a, so only the layer choice changes.
    "R-s": {
        "method": "mlas-lora",
        "lora": {"structure": "shared"},
        "transfer": {"layers": "random", "general_from": "all"},
    },
    # -M-i: one LoRA per pair, random init, and no general LoRA.
    "M-i": {"method": "mlas-lora", "lora": {"structure": "per-pair", "init": "random"}},
    # -Ms-a: per-pair LoRAs from random teacher layers, no split: pair i's init from every neuron,
    # ranked by pair i's awareness (our reading of "no split" for a per-pair LoRA).
    "Ms-a": {
        "method": "mlas-lora",
        "lora": {"structure": "per-pair"},
        "transfer": {"layers": "random", "pair_from": "all"},
    },
    # -Ms-spe: per-pair LoRAs from the specific neurons of random layers. Our reading: "randomly
    # selected" is the layers; the neurons are ranked by awareness as in -Mr-spe, so -Ms-* and -Mr-*
    # differ in the layer choice alone (transfer.order: random draws the neurons at random too).
    "Ms-spe": {
        "method": "mlas-lora",
        "lora": {"structure": "per-pair"},
        "transfer": {"layers": "random", "pair_from": "specific"},
    },
    # -Ms-gen: per-pair LoRAs from the general neurons of random layers, ranked by the pair's awareness.
    "Ms-gen": {
        "method": "mlas-lora",
        "lora": {"structure": "per-pair"},
        "transfer": {"layers": "random", "pair_from": "general"},
    },
    # -Mr-a: per-pair LoRAs from the relevant layers, no split (every neuron, ranked by the pair's).
    "Mr-a": {"method": "mlas-lora", "lora": {"structure": "per-pair"}, "transfer": {"pair_from": "all"}},
    # -Mr-spe: per-pair LoRAs from the relevant layers' specific neurons only: MLAS-LoRA's pair inits
    # without its general LoRA (the rank of the general LoRA goes to each pair's).
    "Mr-spe": {
        "method": "mlas-lora",
        "lora": {"structure": "per-pair"},
        "transfer": {"pair_from": "specific"},
    },
    # -Mr-gen: per-pair LoRAs from the relevant layers' general neurons only, ranked by the pair's
    # awareness (our reading: the paper does not say which ranking).
    "Mr-gen": {
        "method": "mlas-lora",
        "lora": {"structure": "per-pair"},
        "transfer": {"pair_from": "general"},
    },
}

BASELINES: dict[str, dict] = {
    # MELoRA as its official code runs an LLM (ChasonShi/MELoRA llama_finetune.sh: 8 mini-LoRAs of rank
    # 1 and alpha 16 each on q and v, dropout 0.05, lr 3e-4): 67,584 parameters on Qwen2.5-0.5B.
    "melora": {
        "method": "melora",
        "options": {"n": 8, "r": 1, "alpha": 16.0, "lr": 3.0e-4},
        "lora": {"targets": ["q", "v"], "dropout": 0.05},
    },
    # MELoRA sized to MLAS-LoRA's trainable parameters (mini rank r_gen + P r_spe, n = 8, every
    # lora.target, Table 1's scaling, training.lr): the first version's row.
    "melora-matched": {"method": "melora"},
}

DISTILL: dict[str, dict] = {
    # Beyond the paper: the teacher's knowledge moved through its outputs, beside (or on top of)
    # MLAS-LoRA's move through its weights. `-seqkd`: trained on the teacher's greedy translations of
    # the sources read (sequence-level KD, Kim and Rush 2016); `-kd`: the references' cross-entropy
    # and the teacher's next-token distributions, half and half (forward KL at temperature 1, the
    # word-level KD of Kim and Rush); `-seqkd-kd`: both. Any method takes either setting.
    "lora-seqkd": {"method": "lora", "data": {"targets": "teacher"}},
    "mlas-lora-seqkd": {"method": "mlas-lora", "data": {"targets": "teacher"}},
    "lora-kd": {"method": "lora", "training": {"distill": {"weight": 0.5}}},
    "mlas-lora-kd": {"method": "mlas-lora", "training": {"distill": {"weight": 0.5}}},
    "mlas-lora-seqkd-kd": {
        "method": "mlas-lora",
        "data": {"targets": "teacher"},
        "training": {"distill": {"weight": 0.5}},
    },
}

PRESETS.update(BASELINES)
PRESETS.update(ABLATIONS)
PRESETS.update(DISTILL)

TABLE2 = ("mlas-lora", *ABLATIONS)
"""Table 2's rows: MLAS-LoRA and the ten ablations."""
