"""`--budget`: settings that scale every system of an experiment alike, merged over its config.

Plain data, apart from the experiments that apply them, so that the command line can name the
budgets in its help without importing torch.
"""

from __future__ import annotations

BUDGETS: dict[str, dict] = {
    # Every system trained and evaluated alike on 2 CPU cores: 11 systems of table2 in an afternoon.
    "cpu": {
        "data": {"train_per_direction": 2000, "seed_per_direction": 32, "valid_per_direction": 50,
                 "test_per_direction": 100, "ood_per_direction": 0},
        "training": {"max_steps": 48, "micro_batch": 8, "grad_accum": 2, "checkpoint_every": 16},
    },
    # The analyses' (pairs, transfer, family: 6, 4 and 8 trainings of their own) on 2 CPU cores: the cpu
    # budget's data and decoding, a third of its steps, 50 test segments per direction, no validation.
    "cpu-small": {
        "data": {"train_per_direction": 2000, "seed_per_direction": 32, "valid_per_direction": 0,
                 "test_per_direction": 50, "ood_per_direction": 0},
        "training": {"max_steps": 16, "micro_batch": 8, "grad_accum": 2, "checkpoint_every": 8},
    },
    # The verdict's: the cpu budget's training and valid, every test segment of the corpus and 300
    # out-of-domain segments per direction (3,006 test + 1,200 OOD on the embedded 4 directions).
    "verdict": {
        "data": {"train_per_direction": 2000, "seed_per_direction": 32, "valid_per_direction": 50,
                 "test_per_direction": None, "ood_per_direction": 300},
        "training": {"max_steps": 48, "micro_batch": 8, "grad_accum": 2, "checkpoint_every": 16},
    },
    # The paper's setting (Sec. 4.1): 200k random pairs and 1k seeds per direction, batch 64, 3 epochs.
    "paper": {
        "data": {"train_per_direction": 200000, "seed_per_direction": 1000, "sample": "random",
                 "valid_per_direction": 200, "test_per_direction": None},
        "training": {"lr": 1.0e-4, "epochs": 3.0, "max_steps": None, "micro_batch": 8, "grad_accum": 8,
                     "checkpoint_every": 500},
    },
}  # fmt: skip
