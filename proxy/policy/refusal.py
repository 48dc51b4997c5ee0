"""How a policy refusal reads: ComfyUI's 400 shape (isolation's :class:`PromptRejected`), with
a message the stock frontend shows well.

The frontend's error dialog prints ``error.message: error.details`` and then, per node in
``node_errors``, ``class_type:`` and ``- message: details``; it also outlines those nodes in
red. So the message is a short headline and the details list every problem (API clients read
them there too).
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.comfy.violations import PromptRejected, Violation, describe_violation

HEADLINE = "Prompt refused by the workflow policy"


class PolicyRejected(PromptRejected):
    """A prompt refused by the workflow policy; ``error_type`` is the first violation's."""

    def __init__(self, violations: Sequence[Violation]) -> None:
        super().__init__(violations)
        count = len(violations)
        self.message = HEADLINE if count == 1 else f"{HEADLINE} ({count} problems)"
        self.args = (self.message,)
        self.details = "\n".join(describe_violation(v, input_word="input ") for v in violations)


__all__ = ["HEADLINE", "PolicyRejected"]
