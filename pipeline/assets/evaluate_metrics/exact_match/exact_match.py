"""Exact match as an `evaluate` metric module, kept in the repo so it loads offline.

Strings are compared after stripping surrounding whitespace (and, optionally, case).
"""

import datasets
import evaluate

_DESCRIPTION = "Share of predictions equal to their reference after stripping whitespace."
_KWARGS = """
Args:
    predictions: list of generated strings.
    references: list of reference strings.
    ignore_case: compare case-insensitively (default False).
Returns:
    exact_match: share in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, ignore_case=False):
        def norm(s):
            s = s.strip()
            return s.lower() if ignore_case else s

        hits = [norm(p) == norm(r) for p, r in zip(predictions, references, strict=True)]
        return {"exact_match": sum(hits) / len(hits) if hits else 0.0}
