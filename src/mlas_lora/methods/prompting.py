"""0-shot and 5-shot in-context translation with the untuned student (Table 1's first two rows), and
the teacher 0-shot with the same prompt (the ceiling a transfer from it could reach)."""

from __future__ import annotations

from mlas_lora.translation.baselines import in_context_requests, zero_shot_requests


class ZeroShot:
    """The untuned student, asked to translate with the chat prompt of prompting.py."""

    name = "zero-shot"
    trains = False

    def problems(self, config) -> list[str]:
        return []

    def model(self, config) -> str:
        """The model that translates: the untuned student."""
        return config.models.student

    def requests(self, examples, splits, config):
        return zero_shot_requests(examples)


class InContext:
    """The untuned student with `data.shots` demonstrations from the direction's training split."""

    name = "in-context"
    trains = False
    reads = ("train",)  # the splits its prompt reads besides the segment: a rewritten one translates again

    def problems(self, config) -> list[str]:
        return (
            []
            if config.data.shots >= 1
            else [f"in-context: data.shots must be >= 1, got {config.data.shots}"]
        )

    def model(self, config) -> str:
        return config.models.student

    def requests(self, examples, splits, config):
        train = splits.train.get(examples[0].pair, [])
        return in_context_requests(examples, train, shots=config.data.shots, seed=config.seed)


class Teacher(ZeroShot):
    """The teacher (`models.teacher`), 0-shot with the student's prompt and decoding."""

    name = "teacher"

    def model(self, config) -> str:
        return config.models.teacher


METHODS = (ZeroShot(), InContext(), Teacher())
